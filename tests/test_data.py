"""Fine-tuning data: folder/TFDS loading, validation, preprocessing, deterministic sharded batches."""

import io
import re
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdjax.training import data
from sdjax.training.data import (BatchIterator, DataError, epoch_permutation, iterate_batches,
                                 load_captioned_images, parse_tfds_source, preprocess_image,
                                 to_rgb, write_captioned_folder)

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def _solid(color, size=(40, 30)):
    return Image.new("RGB", size, color)


def _distinct_items(n, size=(40, 30)):
    """n small images, each a distinct colour with a diagonal stripe (so crops/flips show)."""
    items = []
    for i in range(n):
        pixels = np.zeros((size[1], size[0], 3), np.uint8)
        pixels[...] = ((37 * i) % 256, (91 * i + 40) % 256, (151 * i + 80) % 256)
        for x in range(size[0]):
            pixels[(x * size[1]) // size[0], x] = 255
        items.append((Image.fromarray(pixels), f"example {i}, colour {i}"))
    return items


@pytest.fixture
def folder(tmp_path):
    return write_captioned_folder(tmp_path / "ds", _distinct_items(10))


def _write_csv(root, text):
    (root / "image_captions.csv").write_text(text, encoding="utf-8")


# ------------------------------------------------------------------------------------ loading


def test_load_folder_layout(folder):
    ds = load_captioned_images(folder)
    assert len(ds) == 10 and ds.skipped == []
    assert ds.captions[3] == "example 3, colour 3"
    assert ds.names[0] == "000000.png"
    image, caption = ds[2]
    assert image.mode == "RGB" and image.size == (40, 30) and caption == "example 2, colour 2"
    assert np.asarray(ds.get_image(-1))[29, 0].tolist() == [(37 * 9) % 256, (91 * 9 + 40) % 256,
                                                          (151 * 9 + 80) % 256]
    with pytest.raises(IndexError):
        ds.get_image(10)
    assert load_captioned_images(str(folder)).fingerprint == ds.fingerprint


def test_captions_with_commas_quotes_and_newlines(tmp_path):
    captions = ['a red, square', 'she said "hi", then left', 'two\nlines, too', "  padded  "]
    root = write_captioned_folder(tmp_path / "ds", [(_solid(RED), c) for c in captions])
    assert load_captioned_images(root).captions == [c.strip() for c in captions]
    # A hand-written file (BOM, CRLF, case/space in header, blank lines) reads the same.
    (root / "image_captions.csv").write_bytes(
        '\ufeffFilename, Caption\r\n000000.png,"a red, square"\r\n\r\n'
        '000001.png,"say ""cheese"", please"\r\n'.encode("utf-8"))
    assert load_captioned_images(root).captions == ["a red, square", 'say "cheese", please']
    # A space before the opening quote (as people type it) still quotes the caption.
    _write_csv(root, 'filename,caption\n000000.png, "a red, square"\n000001.png, a plain one\n')
    assert load_captioned_images(root).captions == ["a red, square", "a plain one"]


@pytest.mark.parametrize("rows, line", [
    # An unclosed quote would otherwise make every later row part of this caption.
    ('000000.png,a cat\n000001.png,"oops, unclosed\n000000.png,a dog\n000001.png,a bird\n', 3),
    ('000000.png,a cat\n000001.png,"unclosed at the end', 3),
    ('000000.png,"a 12" vinyl record, black\n000001.png,fine\n', 2),   # text after the closing quote
])
def test_malformed_quotes_are_an_error_naming_the_row(tmp_path, rows, line):
    root = write_captioned_folder(tmp_path / "ds", [(_solid(RED), "a"), (_solid(BLUE), "b")])
    _write_csv(root, "filename,caption\n" + rows)
    with pytest.raises(DataError, match=rf"image_captions.csv: the row starting on line {line} is malformed CSV"):
        load_captioned_images(root)


def test_subfolders_and_jpeg(tmp_path):
    root = write_captioned_folder(tmp_path / "ds", [(_solid(BLUE), "blue")], image_format="jpeg")
    (root / "train_images" / "sub").mkdir()
    _solid(GREEN).save(root / "train_images" / "sub" / "g.png")
    _write_csv(root, "filename,caption\n000000.jpg,blue\nsub/g.png,green\n./sub/../sub/g.png,again\n")
    ds = load_captioned_images(root)
    assert ds.names == ["000000.jpg", "sub/g.png", "./sub/../sub/g.png"]
    assert np.abs(np.asarray(ds.get_image(0)).astype(int) - BLUE).max() < 8
    with pytest.raises(ValueError, match="image_format='webp': use 'png' or 'jpeg'"):   # was a KeyError
        write_captioned_folder(tmp_path / "webp", [(_solid(BLUE), "blue")], image_format="webp")
    assert not (tmp_path / "webp").exists()


# ------------------------------------------------------------------------------ preprocessing


def test_preprocess_shape_range_and_centre_crop():
    # Wide 80x40: left half red, right half blue. Resize to 40x20, centre crop keeps original
    # columns 20..60, so the crop's left half is red and its right half blue.
    wide = np.zeros((40, 80, 3), np.uint8)
    wide[:, :40] = RED
    wide[:, 40:] = BLUE
    out = preprocess_image(Image.fromarray(wide), resolution=20)
    assert out.shape == (20, 20, 3) and out.dtype == np.float32
    assert out.min() >= -1.0 and out.max() <= 1.0
    np.testing.assert_allclose(out[10, 3], [1, -1, -1], atol=0.05)
    np.testing.assert_allclose(out[10, 16], [-1, -1, 1], atol=0.05)
    # Tall: top half red, bottom half blue -> crop's top is red, bottom blue.
    out = preprocess_image(Image.fromarray(wide.transpose(1, 0, 2).copy()), resolution=20)
    np.testing.assert_allclose(out[3, 10], [1, -1, -1], atol=0.05)
    np.testing.assert_allclose(out[16, 10], [-1, -1, 1], atol=0.05)
    # Shorter side already at the resolution: no resampling, the crop is exact.
    stripes = np.zeros((20, 60, 3), np.uint8)
    stripes[:, :20], stripes[:, 20:40], stripes[:, 40:] = RED, GREEN, BLUE
    out = preprocess_image(Image.fromarray(stripes), resolution=20)
    assert (out == np.array([-1, 1, -1], np.float32)).all()
    # Non-square sizes and upscaling.
    assert preprocess_image(_solid(RED, (40, 30)), resolution=16).shape == (16, 16, 3)
    assert preprocess_image(_solid(RED, (7, 9)), resolution=32).shape == (32, 32, 3)
    with pytest.raises(ValueError, match="rng"):
        preprocess_image(_solid(RED), resolution=16, center_crop=False)


@pytest.mark.parametrize("size, resolution", [((640, 480), 64), ((333, 517), 48), ((90, 100), 90),
                                              ((7, 9), 32)])
def test_preprocess_equals_resize_then_crop(size, resolution):
    """The crop is resampled from its box in the source: the same as resizing the shorter side to
    the resolution and then cropping, up to rounding."""
    rng = np.random.default_rng(size[0])
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    w, h = size
    scale = resolution / min(w, h)
    resized = image.resize((round(w * scale), round(h * scale)), resample=Image.Resampling.BICUBIC)
    W, H = resized.size
    for center in (True, False):
        draw = np.random.default_rng(1)
        out = preprocess_image(image, resolution=resolution, center_crop=center, rng=draw)
        draw = np.random.default_rng(1)
        top, left = ((H - resolution) // 2, (W - resolution) // 2) if center else \
            (int(draw.integers(0, H - resolution + 1)), int(draw.integers(0, W - resolution + 1)))
        expected = np.asarray(resized.crop((left, top, left + resolution, top + resolution)), np.float32)
        np.testing.assert_allclose((out + 1) * 127.5, expected, atol=2.01)


def test_large_jpegs_decode_at_a_reduced_scale_for_training(tmp_path):
    # 400x300 JPEG for 40 px training: libjpeg's 1/2 scale (200x150) keeps twice 40 on both sides;
    # 1/4 (100x75) would not. A PNG has no reduced decoding.
    y, x = np.mgrid[0:300, 0:400]
    smooth = np.stack([x * 255 // 400, y * 255 // 300, (x + y) * 255 // 700], -1).astype(np.uint8)
    root = write_captioned_folder(tmp_path / "ds", [(Image.fromarray(smooth), "j")], image_format="jpeg")
    write_captioned_folder(tmp_path / "png", [(Image.fromarray(smooth), "p")])
    jpeg, png = load_captioned_images(root), load_captioned_images(tmp_path / "png")
    assert jpeg.get_image(0).size == png.get_image(0).size == (400, 300)
    assert jpeg.get_image(0, min_side=40).size == (200, 150)
    assert jpeg.get_image(0, min_side=30).size == (100, 75)
    assert png.get_image(0, min_side=40).size == (400, 300)
    # The batches use it, and the pixels stay those of the full decode (to JPEG's few levels).
    batch = next(iterate_batches(jpeg, resolution=40, batch_size_per_process=1))
    full = preprocess_image(jpeg.get_image(0), resolution=40)
    np.testing.assert_allclose(batch["pixel_values"][0], full, atol=6 / 127.5)


def test_preprocess_a_very_long_image_resamples_only_the_crop():
    # Resizing all of it to 512 px high first would need a 102400000 x 512 image (over 200 GB).
    out = preprocess_image(_solid(RED, (200_000, 1)), resolution=512)
    assert out.shape == (512, 512, 3)
    np.testing.assert_allclose(out[256, 256], [1, -1, -1], atol=1e-6)


def test_image_modes_become_rgb(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))           # fully transparent black -> white
    rgba.putpixel((1, 0), (0, 0, 255, 128))        # half transparent blue -> light blue
    gray16 = Image.fromarray(np.array([[0, 32896, 65535, 1000]], np.uint16))
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 255, 0, 10, 20, 30] + [0] * 762)
    palette.putpixel((1, 1), 1)
    palette_transparent = palette.copy()
    palette_transparent.info["transparency"] = 1
    cases = {
        "rgba": (rgba, {(0, 0): (255, 255, 255), (1, 0): (127, 127, 255), (2, 2): RED}),
        "gray": (Image.new("L", (4, 4), 77), {(0, 0): (77, 77, 77)}),
        "gray_alpha": (Image.new("LA", (4, 4), (50, 0)), {(0, 0): (255, 255, 255)}),
        "gray16": (gray16, {(0, 0): (0, 0, 0), (1, 0): (128, 128, 128), (2, 0): (255,) * 3,
                            (3, 0): (4, 4, 4)}),
        "palette": (palette, {(0, 0): GREEN, (1, 1): (10, 20, 30)}),
        "palette_transparent": (palette_transparent, {(0, 0): GREEN, (1, 1): (255, 255, 255)}),
        "bilevel": (Image.new("1", (4, 4), 1), {(0, 0): (255, 255, 255)}),
    }
    root = write_captioned_folder(tmp_path / "ds", [(im, name) for name, (im, _) in cases.items()])
    # CMYK has no PNG form: store it as JPEG next to the others.
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(root / "train_images" / "cmyk.jpg")
    with open(root / "image_captions.csv", "a", encoding="utf-8") as f:
        f.write("cmyk.jpg,cmyk\n")
    ds = load_captioned_images(root)
    with Image.open(root / "train_images" / "000003.png") as stored:
        assert stored.mode.startswith("I")  # really stored as 16-bit
    for i, (name, (_, expected)) in enumerate(cases.items()):
        image = ds.get_image(i)
        assert image.mode == "RGB", name
        for xy, rgb in expected.items():
            assert np.abs(np.subtract(image.getpixel(xy), rgb)).max() <= 1, (name, xy)
    cmyk = ds.get_image(len(cases))
    assert cmyk.mode == "RGB" and np.abs(np.subtract(cmyk.getpixel((4, 4)), RED)).max() < 10
    # to_rgb leaves RGB alone and handles in-memory float images.
    red = _solid(RED)
    assert to_rgb(red) is red
    assert to_rgb(Image.fromarray(np.full((2, 2), 0.5, np.float32))).getpixel((0, 0)) == (128,) * 3


# ------------------------------------------------------------------------------ bad rows


def _bad_folder(tmp_path):
    root = write_captioned_folder(tmp_path / "ds", [(_solid(RED), "ok one"), (_solid(BLUE), "ok")])
    images = root / "train_images"
    _solid(GREEN).save(images / "good.png")
    png = io.BytesIO()
    _solid(GREEN, (64, 64)).save(png, format="PNG")
    (images / "truncated.png").write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    (images / "not_an_image.png").write_text("hello")
    (images / "adir").mkdir()
    _solid(RED).save(tmp_path / "outside.png")  # exists, but outside train_images/
    _write_csv(root, "\n".join([
        "filename,caption",
        '000000.png,"a caption that spans',
        'two lines"',                                  # row 1, lines 2-3
        "missing.png,a cat",                           # row 2, line 4
        "truncated.png,a dog",                         # row 3
        "not_an_image.png,a bird",                     # row 4
        "good.png,",                                   # row 5
        'good.png,"   "',                              # row 6
        "../outside.png,escape",                       # row 7
        f"{tmp_path / 'outside.png'},absolute",        # row 8
        "good.png,a red, square,unquoted",             # row 9
        "good.png",                                    # row 10
        ",no file",                                    # row 11
        "adir,a folder",                               # row 12
        "sub/../../outside.png,sneaky",                # row 13
        "000001.png,ok",                               # row 14
    ]) + "\n")
    return root


_EXPECTED_BAD = {  # row: (filename, words in the reason)
    2: ("missing.png", "file not found"),
    3: ("truncated.png", "unreadable image"),
    4: ("not_an_image.png", "unreadable image"),
    5: ("good.png", "empty caption"),
    6: ("good.png", "empty caption"),
    7: ("../outside.png", "outside train_images"),
    8: ("outside.png", "absolute path"),
    9: ("good.png", "expected 2 columns"),
    10: ("good.png", "found 1"),
    11: ("", "empty filename"),
    12: ("adir", "not a file"),
    13: ("sub/../../outside.png", "outside train_images"),
}


def test_every_bad_row_is_listed_in_one_error(tmp_path):
    root = _bad_folder(tmp_path)
    with pytest.raises(DataError) as info:
        load_captioned_images(root)
    message = str(info.value)
    assert f"{len(_EXPECTED_BAD)} bad rows of 14" in message and "skip_bad_rows" in message
    assert [b.row for b in info.value.bad_rows] == sorted(_EXPECTED_BAD)
    for bad in info.value.bad_rows:
        filename, reason = _EXPECTED_BAD[bad.row]
        assert filename in bad.name and reason in bad.reason, bad
        assert str(bad) in message
    lines = {b.row: b.line for b in info.value.bad_rows}
    assert lines[2] == 4 and lines[13] == 15  # line numbers count the two-line caption


def test_skip_bad_rows(tmp_path):
    with pytest.warns(UserWarning, match=rf"image_captions.csv: skipped {len(_EXPECTED_BAD)} bad rows of "):
        ds = load_captioned_images(_bad_folder(tmp_path), skip_bad_rows=True)
    assert ds.names == ["000000.png", "000001.png"]
    assert ds.captions == ["a caption that spans\ntwo lines", "ok"]
    assert len(ds.skipped) == len(_EXPECTED_BAD)
    assert {b.row for b in ds.skipped} == set(_EXPECTED_BAD)


def test_no_validate_images_defers_decoding(tmp_path):
    root = write_captioned_folder(tmp_path / "ds", [(_solid(RED), "a")])
    (root / "train_images" / "000000.png").write_text("not a png")
    ds = load_captioned_images(root, validate_images=False)
    with pytest.raises(DataError, match="000000.png"):
        ds.get_image(0)


def test_folder_level_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_captioned_images(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="not a folder"):
        load_captioned_images(tmp_path / "file")
    root = tmp_path / "ds"
    (root / "train_images").mkdir(parents=True)
    with pytest.raises(DataError, match="no image_captions.csv"):
        load_captioned_images(root)
    hf = tmp_path / "hf"   # a Hugging Face dataset folder: the imagefolder is one of its splits
    write_captioned_folder(hf / "train", [(_solid(RED), "a")])
    with pytest.raises(DataError, match=re.escape(f"no image_captions.csv (or metadata.jsonl or metadata.csv) in "
                                                  f"{hf}; {hf / 'train'} has one: pass that folder")):
        load_captioned_images(hf)
    _write_csv(root, "filename,caption\n")
    (root / "train_images").rmdir()
    with pytest.raises(DataError, match="no train_images/"):
        load_captioned_images(root)
    (root / "train_images").mkdir()
    with pytest.raises(DataError, match="no usable training examples.*no rows"):
        load_captioned_images(root)
    for text, found in [("", "an empty file"), ("file,text\na.png,x\n", "'file,text'"),
                        ("filename,caption,extra\n", "'filename,caption,extra'"),
                        ("a.png,a cat\n", "'a.png,a cat'")]:
        _write_csv(root, text)
        with pytest.raises(DataError, match="header must be 'filename,caption'") as info:
            load_captioned_images(root)
        assert found in str(info.value)
    _write_csv(root, "filename,caption\nmissing.png,x\n")
    with pytest.raises(DataError, match="no usable training examples; all 1 rows are bad"):
        load_captioned_images(root, skip_bad_rows=True)
    (root / "image_captions.csv").write_bytes(b"filename,caption\n\xff\xfe.png,x\n")
    with pytest.raises(DataError, match="not UTF-8"):
        load_captioned_images(root)


def test_caption_files_beside_the_images(tmp_path):
    """kohya_ss's layout: each image with a .txt (or .caption) of its name, subfolders included,
    hidden folders left out; an image without a caption file (or with an empty one) is a bad row
    named by its path; the same dataset as the CSV layout."""
    root = tmp_path / "kohya"
    (root / "10_style").mkdir(parents=True)
    (root / ".cache").mkdir()
    for name, color in (("a.png", RED), ("10_style/b.jpg", GREEN), ("c.PNG", BLUE), ("d.png", RED),
                        (".cache/x.png", RED)):
        _solid(color).save(root / name)
    (root / "a.TXT").write_text("a red square\n", encoding="utf-8")   # any letter case
    (root / "10_style" / "b.caption").write_text("a green\none", encoding="utf-8")
    (root / "c.txt").write_text("\ufeffblue, with a BOM", encoding="utf-8")
    (root / ".cache" / "x.txt").write_text("hidden", encoding="utf-8")
    with pytest.raises(DataError, match=r"1 bad row of 4.*\n  example 3 'd.png': no caption file \(d.txt\)"):
        load_captioned_images(root)
    (root / "d.txt").write_text("  ", encoding="utf-8")
    with pytest.raises(DataError, match=r"example 3 'd.png': empty caption"):
        load_captioned_images(root)
    (root / "d.png").unlink()
    # a symlinked folder is walked too (once, however many links lead to it)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    _solid(BLUE).save(elsewhere / "e.png")
    (elsewhere / "e.txt").write_text("linked", encoding="utf-8")
    (root / "linked").symlink_to(elsewhere)
    (elsewhere / "loop").symlink_to(root)
    # a TIFF is read; a caption file with no image sdjax reads (a GIF's, a stray note) is left out, with a warning
    _solid(GREEN).save(root / "f.tif")
    (root / "f.txt").write_text("a green tiff", encoding="utf-8")
    _solid(GREEN).save(root / "g.gif")
    (root / "g.txt").write_text("a gif", encoding="utf-8")
    (root / "10_style" / "notes.txt").write_text("about this set", encoding="utf-8")
    with pytest.warns(UserWarning, match=re.escape(f"{root}: 3 caption files without an image beside them that "
                                                   "sdjax reads (.png, .jpg, .jpeg, .webp, .bmp, .tif, .tiff), "
                                                   "left out: d.txt, g.txt, 10_style/notes.txt")):   # d.png: gone
        ds = load_captioned_images(root)
    assert ds.names == ["a.png", "c.PNG", "f.tif", "10_style/b.jpg", "linked/e.png"]   # each folder's, then below
    assert ds.captions == ["a red square", "blue, with a BOM", "a green tiff", "a green one", "linked"]
    assert ds.get_image(0).getpixel((0, 0)) == RED
    # a training run's folder inside the data (--output-dir run): its samples, its checkpoints' and
    # export's text files are not read, then or when the run resumes
    run = root / "run"
    (run / "samples").mkdir(parents=True)
    (run / "checkpoints" / "2").mkdir(parents=True)
    (run / "train_config.json").write_text('{"train_data": "..", "max_steps": 4, "output_dir": "run"}',
                                           encoding="utf-8")
    _solid(RED).save(run / "samples" / "step-000002.png")
    _solid(RED).save(run / "loss_curve.png")
    (run / "checkpoints" / "2" / "commit_success.txt").write_text("done", encoding="utf-8")
    with pytest.warns(UserWarning) as caught:
        assert load_captioned_images(root).names == ds.names
    assert [str(w.message) for w in caught if "training run" in str(w.message)] == [
        f"{run}: a training run's folder (train_config.json), left out of the data"]
    # a train_config.json that is not a run's record (another tool's) leaves its folder in the data
    (run / "train_config.json").write_text('{"epochs": 10}', encoding="utf-8")
    with pytest.raises(DataError, match="no caption file"), \
            pytest.warns(UserWarning, match="left out: .*run/checkpoints/2/commit_success.txt"):
        load_captioned_images(root)
    (run / "train_config.json").write_text('{"train_data": "..", "max_steps": 4, "output_dir": "run"}',
                                           encoding="utf-8")
    # a folder below with a caption table is what was meant: named, not read as caption files
    (root / "10_style" / "image_captions.csv").write_text("filename,caption\n", encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(f"{root / '10_style'} has one: pass that folder")):
        load_captioned_images(root)


def test_imagefolder_metadata_jsonl_and_csv(tmp_path):
    """The Hugging Face imagefolder layout diffusers' train_text_to_image.py reads: the images beside
    a metadata.jsonl (or metadata.csv) with file_name and text; the same dataset as the CSV layout."""
    import json
    root = tmp_path / "hf"
    (root / "sub").mkdir(parents=True)
    for name, color in (("a.png", RED), ("sub/b.png", GREEN), ("c.png", BLUE)):
        _solid(color).save(root / name)
    records = [{"file_name": "a.png", "text": "a red square"}, {"file_name": "sub/b.png", "text": "a green one"},
               {"file_name": "c.png", "caption": "blue, as 'caption'", "extra": 1}]
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n\n", encoding="utf-8")
    ds = load_captioned_images(root)
    assert ds.names == ["a.png", "sub/b.png", "c.png"]
    assert ds.captions == ["a red square", "a green one", "blue, as 'caption'"]
    assert ds.get_image(1).getpixel((0, 0)) == GREEN
    same = write_captioned_folder(tmp_path / "csv", [(_solid(c), t) for c, t in ((RED, "a red square"),
                                                     (GREEN, "a green one"), (BLUE, "blue, as 'caption'"))])
    np.testing.assert_array_equal(next(iterate_batches(ds, resolution=16, batch_size_per_process=3))["pixel_values"],
                                  next(iterate_batches(load_captioned_images(same), resolution=16,
                                                       batch_size_per_process=3))["pixel_values"])
    # Bad lines are bad rows, each named with its line.
    (root / "metadata.jsonl").write_text(
        '{"file_name": "a.png", "text": "ok"}\n{not json\n{"file_name": "a.png", "prompt": "x"}\n[1, 2]\n'
        '{"file_name": "gone.png", "text": "x"}\n{"file_name": "../a.png", "text": "x"}\n'
        '{"file_name": "c.png", "text": ["blue", 3]}\n', encoding="utf-8")
    with pytest.raises(DataError, match="6 bad rows of 7") as info:
        load_captioned_images(root)
    message = str(info.value)
    for expected in ("row 2 (line 2)", "not JSON", "row 3 (line 3) 'a.png': needs file_name and a caption in text "
                     "or caption; it has file_name, prompt (--caption-key / caption_key= reads the caption from "
                     "another column)", "not a JSON object", "file not found: gone.png",
                     "path resolves outside hf/", "row 7 (line 7) 'c.png': text is a list that holds something other "
                     "than text"):
        assert expected in message, (expected, message)
    # metadata.csv, as the imagefolder loader also reads it.
    (root / "metadata.jsonl").unlink()
    (root / "metadata.csv").write_text('file_name,text\na.png,"red, quoted"\nsub/b.png,green\n', encoding="utf-8")
    assert load_captioned_images(root).captions == ["red, quoted", "green"]
    (root / "metadata.csv").unlink()
    with pytest.raises(DataError, match=r"no image_captions.csv \(or metadata.jsonl or metadata.csv\)"):
        load_captioned_images(root)


def test_metadata_caption_column(tmp_path):
    """caption_key (--caption-key) picks a metadata file's caption column, as diffusers'
    --caption_column does; the default reads text, else caption. In the other folder layouts it is
    an error, not ignored."""
    import json
    root = tmp_path / "hf"
    root.mkdir()
    for name, color in (("a.png", RED), ("b.png", GREEN)):
        _solid(color).save(root / name)
    records = [{"file_name": "a.png", "text": "short", "prompt": "a red square, long"},
               {"file_name": "b.png", "text": "short too", "prompt": ["green", "a green square"]}]
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in records), encoding="utf-8")
    assert load_captioned_images(root).captions == ["short", "short too"]
    ds = load_captioned_images(root, caption_key="prompt")
    assert ds.captions == ["a red square, long", "green"]
    assert ds.caption_sets == [("a red square, long",), ("green", "a green square")]
    with pytest.raises(DataError, match=r"row 1 \(line 1\) 'a.png': needs file_name and a caption in alt; it has "
                                        r"file_name, text, prompt\n"):   # (no --caption-key hint: it was given)
        load_captioned_images(root, caption_key="alt")
    (root / "metadata.csv").write_text("file_name,prompt\na.png,red\n", encoding="utf-8")
    (root / "metadata.jsonl").unlink()
    assert load_captioned_images(root, caption_key="prompt").captions == ["red"]
    csv_layout = write_captioned_folder(tmp_path / "csv", [(_solid(RED), "red")])
    with pytest.raises(DataError, match=re.escape(f"caption key 'prompt' (--caption-key) names a column of a "
                                                  f"metadata.jsonl or metadata.csv, or a TFDS feature; "
                                                  f"{csv_layout / 'image_captions.csv'} has the header")):
        load_captioned_images(csv_layout, caption_key="prompt")
    sidecar = tmp_path / "sidecar"
    sidecar.mkdir()
    _solid(RED).save(sidecar / "a.png")
    (sidecar / "a.txt").write_text("red")
    with pytest.raises(DataError, match="has a caption file beside each image"):
        load_captioned_images(sidecar, caption_key="prompt")
    assert load_captioned_images(sidecar).captions == ["red"]


def test_several_captions_per_image(tmp_path):
    """A metadata.jsonl list of captions (diffusers' train_text_to_image reads them too) gives the
    example every non-empty one; an empty list, or one of blanks, is an empty caption."""
    root = tmp_path / "hf"
    root.mkdir()
    for name, colour in (("a.png", RED), ("b.png", GREEN), ("c.png", BLUE)):
        Image.new("RGB", (8, 8), colour).save(root / name)
    (root / "metadata.jsonl").write_text(
        '{"file_name": "a.png", "text": [" red ", "", "a red square"]}\n{"file_name": "b.png", "text": "green"}\n'
        '{"file_name": "c.png", "text": ["", " "]}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"(?s)1 bad row of 3.*row 3 \(line 3\) 'c.png': empty caption"):
        load_captioned_images(root)
    with pytest.warns(UserWarning, match=r"skipped 1 bad row of 3:\n  row 3 \(line 3\) 'c.png': empty caption"):
        ds = load_captioned_images(root, skip_bad_rows=True)
    assert ds.caption_sets == [("red", "a red square"), ("green",)]
    assert ds.captions == ["red", "green"] and ds.num_captions == 3
    assert "3 captions" in repr(ds)


def test_the_images_shorter_sides_are_measured_as_seen(tmp_path, monkeypatch):
    """Validation records each image's shorter side, for the warning about images that training
    upscales; unvalidated data has none."""
    root = tmp_path / "ds"
    items = [(Image.new("RGB", (w, h), RED), f"{w}x{h}") for w, h in ((40, 30), (64, 64), (20, 90))]
    write_captioned_folder(root, items)
    ds = load_captioned_images(root)
    assert ds.shorter_sides == [30, 64, 20]
    assert ds.smaller_than(32) == [0, 2] and ds.smaller_than(20) == []
    assert load_captioned_images(root, validate_images=False).smaller_than(32) == []
    _fake_tfds(monkeypatch, _tfds_examples())
    assert load_captioned_images("tfds:tiny_caps").shorter_sides == [30] * 4


def test_the_fingerprint_of_one_caption_per_example_is_unchanged(folder):
    """Runs saved before examples could have several captions recorded this hash; they must resume."""
    import hashlib
    ds = load_captioned_images(folder)
    before = hashlib.sha256()
    for name, caption in zip(ds.names, ds.captions):
        before.update(name.encode() + b"\0" + caption.encode() + b"\0")
    assert ds.fingerprint == before.hexdigest()[:16]
    more = data.CaptionedImages(source="x", names=ds.names, captions=[(c, "another") for c in ds.captions],
                                open_image=None)
    assert more.fingerprint != ds.fingerprint


# ------------------------------------------------------------------------------ batches


def test_epoch_order_is_deterministic_and_changes_per_epoch():
    np.testing.assert_array_equal(epoch_permutation(50, 3, 0), epoch_permutation(50, 3, 0))
    assert sorted(epoch_permutation(50, 3, 0)) == list(range(50))
    assert not np.array_equal(epoch_permutation(50, 3, 0), epoch_permutation(50, 3, 1))
    assert not np.array_equal(epoch_permutation(50, 3, 0), epoch_permutation(50, 4, 0))


def test_batches_cover_each_epoch_and_drop_the_last(folder):
    ds = load_captioned_images(folder)
    it = iterate_batches(ds, resolution=16, batch_size_per_process=3, seed=7)
    assert it.steps_per_epoch == 3  # 10 // 3: one example per epoch is left out
    batches = [next(it) for _ in range(6)]
    for epoch in (0, 1):
        seen = np.concatenate([b["indices"] for b in batches[3 * epoch: 3 * epoch + 3]])
        assert len(set(seen.tolist())) == 9
        np.testing.assert_array_equal(seen, epoch_permutation(10, 7, epoch)[:9])
        assert all(b["epoch"] == epoch for b in batches[3 * epoch: 3 * epoch + 3])
    assert [b["step"] for b in batches] == list(range(6))
    b = batches[0]
    assert b["pixel_values"].shape == (3, 16, 16, 3) and b["pixel_values"].dtype == np.float32
    assert b["captions"] == [ds.captions[i] for i in b["indices"]]
    again = iterate_batches(ds, resolution=16, batch_size_per_process=3, seed=7, num_workers=1)
    np.testing.assert_array_equal(next(again)["pixel_values"], b["pixel_values"])


def test_an_example_with_several_captions_trains_on_one_per_epoch(folder):
    """Each epoch draws one of an example's captions from (seed, epoch, index): a resume sees the
    same ones, and crops and flips are those of the same data with one caption per image."""
    ds = load_captioned_images(folder)
    several = data.CaptionedImages(
        source=ds.source, names=ds.names, open_image=ds._open_image,
        captions=[(c, c + " again", c + " once more") if i % 2 == 0 else c for i, c in enumerate(ds.captions)])
    kwargs = dict(resolution=16, batch_size_per_process=5, seed=3, center_crop=False, random_flip=True)
    one, many = iterate_batches(ds, **kwargs), iterate_batches(several, **kwargs)
    seen, batches = {i: set() for i in range(10)}, []
    for _ in range(12):   # 6 epochs
        a, b = next(one), next(many)
        batches.append(b)
        np.testing.assert_array_equal(a["pixel_values"], b["pixel_values"])
        np.testing.assert_array_equal(b["caption_picks"], many.caption_picks(b["step"]))
        assert b["captions"] == [several.caption_sets[i][p] for i, p in zip(b["indices"], b["caption_picks"])]
        for i, caption in zip(b["indices"], b["captions"]):
            seen[int(i)].add(caption)
    assert all(len(seen[i]) == 1 for i in range(1, 10, 2))
    assert all(len(seen[i]) >= 2 for i in range(0, 10, 2)), seen
    resumed = iterate_batches(several, start_step=7, **kwargs)
    assert next(resumed)["captions"] == batches[7]["captions"]
    # A run saved when sdjax trained on the first captions (its fingerprint covered only those) resumes,
    # with a warning; other data is still refused.
    saved = {**many.state(), "fingerprint": several.first_captions_fingerprint}
    assert several.first_captions_fingerprint == ds.fingerprint != several.fingerprint
    with pytest.warns(UserWarning, match=r"started when sdjax trained on the first caption .*\(20 in all\)"):
        resumed.restore(saved)
    with pytest.raises(DataError, match="the training data's file names or captions changed"):
        resumed.restore({**saved, "fingerprint": "0" * 16})
    for it in (one, many, resumed):
        it.close()


def test_processes_partition_the_global_batch(folder):
    ds = load_captioned_images(folder)
    kwargs = dict(resolution=16, seed=1, center_crop=False, random_flip=True)
    single = iterate_batches(ds, batch_size_per_process=4, **kwargs)
    hosts = [iterate_batches(ds, batch_size_per_process=2, process_index=p, process_count=2,
                             **kwargs) for p in (0, 1)]
    assert hosts[0].steps_per_epoch == single.steps_per_epoch == 2
    for _ in range(5):  # crosses epoch boundaries
        whole, parts = next(single), [next(h) for h in hosts]
        assert not set(parts[0]["indices"].tolist()) & set(parts[1]["indices"].tolist())
        np.testing.assert_array_equal(np.concatenate([p["indices"] for p in parts]),
                                      whole["indices"])
        np.testing.assert_array_equal(
            np.concatenate([p["pixel_values"] for p in parts]), whole["pixel_values"])
        assert parts[0]["captions"] + parts[1]["captions"] == whole["captions"]
    with pytest.raises(ValueError):
        iterate_batches(ds, batch_size_per_process=2, process_index=2, process_count=2, **kwargs)


def test_resume_replays_the_same_batches(folder):
    ds = load_captioned_images(folder)
    kwargs = dict(resolution=16, batch_size_per_process=4, seed=5, center_crop=False,
                  random_flip=True)
    reference = iterate_batches(ds, **kwargs)
    expected = [next(reference) for _ in range(7)]
    resumed = iterate_batches(ds, start_step=3, **kwargs)
    for want in expected[3:]:
        got = next(resumed)
        assert got["step"] == want["step"] and got["captions"] == want["captions"]
        np.testing.assert_array_equal(got["pixel_values"], want["pixel_values"])
    # Through the saved state, as a checkpoint would do.
    it = iterate_batches(ds, **kwargs)
    for _ in range(5):
        next(it)
    state = it.state()
    assert state["step"] == 5 and state["epoch"] == 2 and state["step_in_epoch"] == 1
    restored = iterate_batches(ds, **kwargs)
    restored.restore(state)
    np.testing.assert_array_equal(next(restored)["pixel_values"], expected[5]["pixel_values"])
    with pytest.raises(DataError, match="seed"):
        iterate_batches(ds, **{**kwargs, "seed": 6}).restore(state)
    with pytest.raises(DataError, match=r"saved global_batch_size=(\d+), now \d+ .*on another number of devices "
                                        r"\(one that divides \1\), choose --batch-size and --gradient-accumulation "
                                        r"whose product with the device count is \1"):
        iterate_batches(ds, **{**kwargs, "batch_size_per_process": 2}).restore(state)


def test_the_next_batch_loads_in_the_background(folder):
    ds = load_captioned_images(folder)
    kwargs = dict(resolution=16, batch_size_per_process=2, seed=5, center_crop=False, random_flip=True)
    serial = iterate_batches(ds, num_workers=1, **kwargs)
    expected = [next(serial) for _ in range(6)]
    loaded = []   # the dataset indices asked for, in order
    get_image = ds.get_image
    ds.get_image = lambda i, **kw: loaded.append(i) or get_image(i, **kw)
    with iterate_batches(ds, num_workers=2, **kwargs) as it:
        first = next(it)
        # Step 1's images load without another next().
        deadline = time.monotonic() + 30
        while len(loaded) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sorted(loaded[2:]) == sorted(it.indices_for_step(1).tolist())
        got = [first] + [next(it) for _ in range(2)]
        it.restore({"step": 5})  # the batch loaded ahead for step 3 is not used
        assert it.step == 5
        got.append(next(it))
    for want, batch in zip(expected[:3] + expected[5:], got):
        assert batch["step"] == want["step"] and batch["captions"] == want["captions"]
        np.testing.assert_array_equal(batch["pixel_values"], want["pixel_values"])


def test_a_batch_loaded_ahead_raises_its_error_at_its_own_step(folder):
    ds = load_captioned_images(folder)
    with iterate_batches(ds, resolution=16, batch_size_per_process=2, num_workers=2) as it:
        next(it)   # step 0; step 1 starts loading
        (folder / "train_images" / ds.names[int(it.indices_for_step(2)[0])]).unlink()
        next(it)   # step 1 is fine; step 2 fails in the background
        with pytest.raises(data.ImageReadError, match="cannot read image of example"):
            next(it)
        assert it.step == 2


def test_resume_notices_changed_data(tmp_path):
    """A saved position holds the dataset's size and fingerprint: 8 -> 9 rows (same steps per
    epoch at batch 4, so the order would silently change) or a changed caption stops the restore,
    naming what changed; a position saved before these were recorded still restores."""
    items = _distinct_items(9)
    kwargs = dict(resolution=16, batch_size_per_process=4, seed=5)
    it = iterate_batches(load_captioned_images(write_captioned_folder(tmp_path / "eight", items[:8])), **kwargs)
    next(it)
    state = it.state()
    assert state["num_examples"] == 8 and state["fingerprint"] == it.dataset.fingerprint
    nine = load_captioned_images(write_captioned_folder(tmp_path / "nine", items))
    with pytest.raises(DataError, match=r"saved num_examples=8, now 9 \(the training data has a different"):
        iterate_batches(nine, **kwargs).restore(state)
    recaptioned = [(image, caption) for image, caption in items[:7]] + [(items[7][0], "another caption")]
    changed = load_captioned_images(write_captioned_folder(tmp_path / "changed", recaptioned))
    with pytest.raises(DataError, match="saved fingerprint=.*file names or captions changed"):
        iterate_batches(changed, **kwargs).restore(state)
    same = iterate_batches(load_captioned_images(tmp_path / "eight"), **kwargs)
    same.restore(state)
    assert same.step == 1
    old = {k: v for k, v in state.items() if k not in ("num_examples", "fingerprint")}
    legacy = iterate_batches(load_captioned_images(tmp_path / "eight"), **kwargs)
    legacy.restore(old)
    assert legacy.step == 1


def test_micro_batches_do_not_depend_on_the_process_count(folder):
    """With gradient accumulation the global batch is [micro_batches, global micro-batch] and each
    process takes its columns of every micro-batch, so 1 process and 2 (or 4) processes train on
    the same micro-batches (a per-process [accumulation, ...] reshape of contiguous slices would
    make 1 process x 2 devices [[a, b], [c, d]] and 2 processes [[a, c], [b, d]])."""
    ds = load_captioned_images(folder)
    accum = 2
    single = iterate_batches(ds, resolution=16, batch_size_per_process=8, seed=3, micro_batches=accum)
    hosts = {n: [iterate_batches(ds, resolution=16, batch_size_per_process=8 // n, process_index=p,
                                 process_count=n, seed=3, micro_batches=accum) for p in range(n)]
             for n in (2, 4)}
    for step in range(3):   # crosses epochs (10 examples: one global batch of 8 per epoch)
        whole = single.indices_for_step(step)
        # One process: its micro-batches are the consecutive halves of the epoch order's batch.
        np.testing.assert_array_equal(whole, epoch_permutation(10, 3, step)[:8])
        micro_AM = whole.reshape(accum, -1)
        for n, processes in hosts.items():
            parts = [h.indices_for_step(step).reshape(accum, -1) for h in processes]   # [accum, 8 / accum / n]
            np.testing.assert_array_equal(np.concatenate(parts, axis=1), micro_AM, err_msg=f"{n} processes")
    with pytest.raises(ValueError, match="not a multiple of micro_batches=2"):
        iterate_batches(ds, resolution=16, batch_size_per_process=3, micro_batches=2)


def test_random_crop_and_flip_are_deterministic(tmp_path):
    # One wide image with a horizontal gradient: every crop position and flip looks different.
    gradient = np.tile(np.arange(0, 240, 3, dtype=np.uint8)[None, :, None], (20, 1, 3))
    root = write_captioned_folder(tmp_path / "ds", [(Image.fromarray(gradient), f"g{i}")
                                                    for i in range(8)])
    ds = load_captioned_images(root)
    make = lambda flip: iterate_batches(ds, resolution=20, batch_size_per_process=8, seed=3,
                                        center_crop=False, random_flip=flip)
    plain, flipped, flipped_again = make(False), make(True), make(True)
    for _ in range(2):  # two epochs
        a, b, c = next(plain), next(flipped), next(flipped_again)
        np.testing.assert_array_equal(b["pixel_values"], c["pixel_values"])
        assert len({float(x[0, 0, 0]) for x in a["pixel_values"]}) > 1  # crops vary
        was_flipped = []
        for x, y in zip(a["pixel_values"], b["pixel_values"]):
            if np.array_equal(x, y):
                was_flipped.append(False)
            else:  # the same crop, mirrored (the flip draw comes before the crop draws)
                np.testing.assert_array_equal(x[:, ::-1], y)
                was_flipped.append(True)
        assert 0 < sum(was_flipped) < 8
    # Different epochs give different crops for the same example.
    first = make(False)
    e0 = {int(i): x for i, x in zip(first.indices_for_step(0), next(first)["pixel_values"])}
    e1 = {int(i): x for i, x in zip(first.indices_for_step(1), next(first)["pixel_values"])}
    assert any(not np.array_equal(e0[i], e1[i]) for i in e0)


def test_too_few_examples_for_a_global_batch(folder):
    ds = load_captioned_images(folder)
    with pytest.raises(DataError, match="fewer than one global batch of 12"):
        BatchIterator(ds, resolution=16, batch_size_per_process=6, process_count=2)


# ------------------------------------------------------------------------------ TFDS


def _png_bytes(pixels):
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _fake_tfds(monkeypatch, examples, *, random_access=True, honour_decoders=True):
    """Installs a stand-in for tensorflow_datasets with the calls data.py makes.

    Like real TFDS, SkipDecoding turns the image into its encoded bytes, captions are bytes, and
    data_source raises NotImplementedError for datasets prepared as TFRecord.
    """
    calls = []
    module = types.ModuleType("tensorflow_datasets")

    class SkipDecoding:
        pass

    module.decode = types.SimpleNamespace(SkipDecoding=SkipDecoding)

    def materialize(decoders):
        skip = honour_decoders and isinstance((decoders or {}).get("image"), SkipDecoding)
        return [dict(ex, image=_png_bytes(ex["image"])) if skip else ex for ex in examples]

    def data_source(name, *, split=None, data_dir=None, download=True, decoders=None):
        calls.append(("data_source", name, split, data_dir, download))
        if not random_access:
            raise NotImplementedError("Random access data source for file format "
                                      "FileFormat.TFRECORD is not supported.")
        return materialize(decoders)

    def load(name, *, split=None, data_dir=None, download=True, shuffle_files=False,
             decoders=None):
        calls.append(("load", name, split, data_dir, download))
        return materialize(decoders)

    module.data_source, module.load, module.as_numpy = data_source, load, iter
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", module)
    return calls


def _tfds_examples():
    examples = []
    for i, color in enumerate([RED, GREEN, BLUE, (9, 9, 9)]):
        examples.append({"image": np.full((30, 40, 3), color, np.uint8),
                         "caption": f"colour {i}, ok".encode(),
                         "captions": {"text": [f"first {i}".encode(), b"second"]}})
    return examples


@pytest.mark.parametrize("random_access", [True, False])
def test_tfds_source(monkeypatch, tmp_path, random_access):
    calls = _fake_tfds(monkeypatch, _tfds_examples(), random_access=random_access)
    ds = load_captioned_images("tfds:tiny_caps/v1:train[:4]", data_dir=tmp_path)
    assert calls[0] == ("data_source", "tiny_caps/v1", "train[:4]", str(tmp_path), False)
    assert [c[0] for c in calls] == (["data_source"] if random_access else ["data_source", "load"])
    assert ds.captions == ["colour 0, ok", "colour 1, ok", "colour 2, ok", "colour 3, ok"]
    assert ds.get_image(1).getpixel((0, 0)) == GREEN
    nested = load_captioned_images("tfds:tiny_caps", caption_key="captions/text")
    assert nested.captions[2] == "first 2" and nested.caption_sets[2] == ("first 2", "second")
    batch = next(iterate_batches(nested, resolution=16, batch_size_per_process=4))
    assert batch["pixel_values"].shape == (4, 16, 16, 3)


def test_tfds_decoded_arrays_bad_rows_and_keys(monkeypatch):
    examples = _tfds_examples()
    examples[1] = dict(examples[1], caption=b"  ")
    examples[2] = dict(examples[2], image=np.zeros((5,), np.uint8))  # not an image
    examples.append({"image": np.full((6, 6, 1), 2000, np.uint16), "caption": np.array(b"gray16"),
                     "captions": {"text": []}})
    _fake_tfds(monkeypatch, examples, honour_decoders=False)  # images arrive as arrays
    with pytest.raises(DataError) as info:
        load_captioned_images("tfds:tiny_caps")
    assert [(b.row, b.name) for b in info.value.bad_rows] == [(1, "train[1]"), (2, "train[2]")]
    assert "empty caption" in str(info.value) and "shape (5,)" in str(info.value)
    with pytest.warns(UserWarning, match=r"TFDS 'tiny_caps' split 'train': skipped 2 bad rows of 5:"):
        ds = load_captioned_images("tfds:tiny_caps", skip_bad_rows=True)
    assert ds.captions == ["colour 0, ok", "colour 3, ok", "gray16"]
    assert ds.get_image(2).getpixel((0, 0)) == (8, 8, 8)  # 2000 / 257
    with pytest.raises(DataError, match="no feature 'img'.*; name the features with --image-key / --caption-key"):
        load_captioned_images("tfds:tiny_caps", image_key="img")
    with pytest.raises(DataError, match=r"example 4 .train\[4\].: empty caption"):
        load_captioned_images("tfds:tiny_caps", caption_key="captions/text")


def test_tfds_open_errors_are_data_errors(monkeypatch):
    _fake_tfds(monkeypatch, _tfds_examples())

    def not_found(name, **kwargs):
        raise ValueError(f"Dataset {name} not found.\nAvailable datasets:\n\t- mnist")

    monkeypatch.setattr(sys.modules["tensorflow_datasets"], "data_source", not_found)
    with pytest.raises(DataError, match="Dataset nope not found") as info:
        load_captioned_images("tfds:nope")
    assert "mnist" not in str(info.value)  # only the first line of TFDS's long listing
    # what to do: train.py downloads nothing, and which flags name the features
    assert "prepare it first with `tfds build nope`, passing its data_dir as --tfds-data-dir" in str(info.value)
    assert "--image-key 'image' and --caption-key 'caption'" in str(info.value)


def test_tfds_missing_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # makes the import fail
    with pytest.raises(ImportError, match=re.escape('pip install -e ".[tfds]" in the sdjax checkout')):
        load_captioned_images("tfds:mnist")


def test_parse_tfds_source():
    assert parse_tfds_source("tfds:mnist") == ("mnist", "train")
    assert parse_tfds_source("tfds:coco_captions/2017:validation") == ("coco_captions/2017",
                                                                      "validation")
    assert parse_tfds_source("tfds:ds/cfg:train[:10%]") == ("ds/cfg", "train[:10%]")
    assert parse_tfds_source("tfds:ds:train[10:20]+test") == ("ds", "train[10:20]+test")
    assert parse_tfds_source("tfds:ds/cfg:1.2.0") == ("ds/cfg:1.2.0", "train")
    assert parse_tfds_source("tfds:ds/cfg:1.2.0:test") == ("ds/cfg:1.2.0", "test")
    assert parse_tfds_source("tfds:huggingface:foo:train") == ("huggingface:foo", "train")
    for bad in ("tfds:", "tfds::train", "tfds:ds:"):
        with pytest.raises(DataError):
            parse_tfds_source(bad)


def test_module_constants():
    # the install command the error prints is the README's (sdjax is installed from its checkout)
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    command = 'pip install -e ".[tfds]"'
    assert data.TFDS_INSTALL_HINT.startswith(command) and f"(`{command}`)" in readme
