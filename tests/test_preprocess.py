"""ControlNet control images as AUTOMATIC1111's ControlNet extension makes them (sdjax.preprocess): its
preprocessors (canny, invert), resize modes, Pixel Perfect and the Hires fix's soft weights after canny."""
import numpy as np
import pytest

from sdjax.preprocess import ControlUnit, fit, pixel_perfect_resolution, preprocess, resize_map


def step_picture(height: int, width: int, column: int, dark: int = 0, light: int = 255) -> np.ndarray:
    """An RGB picture dark left of ``column`` and light from it on: one vertical edge."""
    picture = np.full((height, width, 3), dark, np.uint8)
    picture[:, column:] = light
    return picture


def test_canny_finds_the_edges_at_the_processor_resolution():
    """Module canny: white-on-black RGB edges of the picture resized so its short side is Processor Res,
    along the one step of a step picture (at its place, scaled), none elsewhere; the thresholds decide
    whether a weak step is an edge; at the picture's own short side (a multiple of 64) it is cv2.Canny of
    the picture itself."""
    import cv2   # (OpenCV: the test extra's opencv-python-headless)
    picture = step_picture(64, 96, column=40)
    edges = preprocess(picture, "canny", 64, 100, 200)
    assert edges.shape == (64, 96, 3) and edges.dtype == np.uint8
    assert (edges[..., 0] == edges[..., 1]).all() and (edges[..., 0] == edges[..., 2]).all()
    assert set(np.unique(edges)) == {0, 255}
    columns = np.flatnonzero(edges[..., 0].any(axis=0))
    assert set(columns) <= {39, 40} and len(columns) >= 1   # (the step, one pixel wide, on either side of it)
    assert (edges[:, columns, 0] == 255).all()   # (down the whole height)
    np.testing.assert_array_equal(edges[..., 0], cv2.Canny(picture, 100, 200))
    big = preprocess(picture, "canny", 128, 100, 200)   # (twice the short side: twice the size, the step at 80)
    assert big.shape == (128, 192, 3)
    assert set(np.flatnonzero(big[..., 0].any(axis=0))) <= {78, 79, 80, 81}
    odd = preprocess(step_picture(50, 70, column=35), "canny", 64)   # (k = 1.28: round(50k) x round(70k))
    assert odd.shape == (64, 90, 3)
    weak = step_picture(64, 64, column=32, dark=100, light=130)   # (a gradient between the two thresholds' sets)
    assert preprocess(weak, "canny", 64, 20, 40).any() and not preprocess(weak, "canny", 64, 100, 200).any()


def test_invert_and_none():
    """Module invert: 255 minus each value (a black drawing on white made white on black); none: as given."""
    picture = np.random.default_rng(0).integers(0, 256, (5, 7, 3), np.uint8)
    np.testing.assert_array_equal(preprocess(picture, "invert"), 255 - picture.astype(np.int32))
    assert preprocess(picture, "none") is picture
    with pytest.raises(ValueError, match="preprocessor 'depth': sdjax has none, canny, invert"):
        preprocess(picture, "depth")


def blocks(height: int, width: int) -> np.ndarray:
    """A picture of three vertical bands, red | green | blue, a gray frame one pixel wide around it."""
    picture = np.zeros((height, width, 3), np.uint8)
    third = width // 3
    picture[:, :third, 0] = picture[:, third:2 * third, 1] = picture[:, 2 * third:, 2] = 255
    picture[[0, -1]] = picture[:, [0, -1]] = 90
    return picture


def opencv(picture: np.ndarray, width: int, height: int) -> np.ndarray:
    """A picture of many colours resized as the extension resizes it: area averaging to shrink, bicubic to
    enlarge (OpenCV)."""
    import cv2
    shrink = width * height < picture.shape[0] * picture.shape[1]
    return cv2.resize(picture, (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)


def test_maps_keep_their_kind_when_resized():
    """resize_map: a picture of many colours by area averaging (fewer pixels) or bicubic (more); a map
    of a few flat colours keeps exactly those colours; a black-and-white map of one-pixel lines stays
    black and white with one-pixel lines at their scaled places, enlarged or shrunk; the same size is
    left as it is."""
    rng = np.random.default_rng(1)
    picture = rng.integers(0, 256, (30, 40, 3), np.uint8)
    np.testing.assert_array_equal(resize_map(picture, 20, 15), opencv(picture, 20, 15))
    np.testing.assert_array_equal(resize_map(picture, 60, 45), opencv(picture, 60, 45))
    assert resize_map(picture, 40, 30) is picture
    palette = np.array([[0, 0, 0], [200, 10, 10], [10, 200, 10], [10, 10, 200], [90, 90, 90]], np.uint8)
    segments = palette[np.repeat(np.repeat(rng.integers(0, 5, (6, 8)), 5, 0), 5, 1)]   # (30x40 in 5x5 blocks)
    for size in ((57, 43), (17, 13)):
        out = resize_map(segments, *size)
        assert out.shape == (size[1], size[0], 3)
        assert {tuple(c) for c in out.reshape(-1, 3)} <= {tuple(c) for c in palette}
    lines = np.zeros((40, 60, 3), np.uint8)
    lines[:, 20] = lines[25, :] = 255   # (a vertical line at x 20 and a horizontal one at y 25)
    for width, height in ((90, 60), (30, 20)):   # (1.5 times, half)
        out = resize_map(lines, width, height)
        assert set(np.unique(out)) == {0, 255} and (out[..., :1] == out).all()
        k = width / 60
        # (rows away from the horizontal line and the ends, which thinning shortens: one pixel of the vertical
        # line in each, at its scaled place)
        rows = [y for y in range(2, height - 2) if abs(y - 25 * k) > 3]
        for y in rows:
            assert list(np.flatnonzero(out[y, :, 0])) in ([round(20 * k)], [round(20 * k) - 1], [round(20 * k) + 1])
        for x in [x for x in range(2, width - 2) if abs(x - 20 * k) > 3]:   # (the horizontal line, alike)
            assert list(np.flatnonzero(out[:, x, 0])) in ([round(25 * k)], [round(25 * k) - 1], [round(25 * k) + 1])


def test_resize_modes_fit_the_picture_as_a1111():
    """Just Resize stretches; Crop and Resize scales by the larger ratio (each side rounded) and cuts the
    middle out, so a wide picture loses its sides; Resize and Fill scales by the smaller and centres it on
    its border's median colour. Pixel Perfect's resolution is the short side scaled so."""
    wide = blocks(40, 120)   # (to 60x60: crop scales by 1.5 to 180x60 and keeps columns 60..120: the green band)
    np.testing.assert_array_equal(fit(wide, 60, 60, "just"), resize_map(wide, 60, 60))
    cropped = fit(wide, 60, 60, "crop")
    np.testing.assert_array_equal(cropped, resize_map(wide, 180, 60)[:, 60:120])
    assert (cropped[5:-5, 5:-5, 1] > 200).all() and (cropped[5:-5, 5:-5, [0, 2]] < 50).all()   # (all green)
    filled = fit(wide, 60, 60, "fill")   # (scaled by 0.5 to 60x20, rows 20..40; the rest the frame's gray)
    np.testing.assert_array_equal(filled[20:40], resize_map(wide, 60, 20))
    assert (filled[:20] == 90).all() and (filled[40:] == 90).all()
    tall = blocks(90, 30)   # (to 48x32: crop by max(32/90, 48/30) = 1.6 -> 48x144, rows 56..88)
    np.testing.assert_array_equal(fit(tall, 48, 32, "crop"), resize_map(tall, 48, 144)[56:88])
    filled = fit(tall, 48, 32, "fill")   # (by 32/90: 11x32, columns 18..29)
    assert filled.shape == (32, 48, 3)
    np.testing.assert_array_equal(filled[:, 18:29], resize_map(tall, 11, 32))
    assert (filled[:, :18] == 90).all() and (filled[:, 29:] == 90).all()
    same = blocks(32, 48)   # (the images' own size: every mode leaves it as it is)
    for mode in ("just", "crop", "fill"):
        np.testing.assert_array_equal(fit(same, 48, 32, mode), same)
    with pytest.raises(ValueError, match="resize mode 'outer': sdjax has just, crop, fill"):
        fit(same, 48, 32, "outer")
    assert pixel_perfect_resolution((40, 120), 60, 60, "crop") == 60   # (1.5 x 40)
    assert pixel_perfect_resolution((40, 120), 60, 60, "just") == 60
    assert pixel_perfect_resolution((40, 120), 60, 60, "fill") == 20   # (0.5 x 40)


def test_a_unit_preprocesses_then_fits_and_softens_the_hires_pass_after_canny():
    """A unit's control image is its picture preprocessed at its own aspect (at Processor Res, or Pixel
    Perfect's) and then fitted by its resize mode; the Hires fix's second pass weighs a canny unit's
    residuals softly ("prompt") unless its mode already does."""
    picture = step_picture(40, 120, column=70)
    unit = ControlUnit("cn", module="canny", resize="crop", processor_res=80, low_threshold=50, high_threshold=150)
    np.testing.assert_array_equal(unit.control_image(picture, 60, 60),
                                  fit(preprocess(picture, "canny", 80, 50, 150), 60, 60, "crop"))
    perfect = ControlUnit("cn", module="canny", resize="fill", pixel_perfect=True)
    np.testing.assert_array_equal(perfect.control_image(picture, 60, 60),
                                  fit(preprocess(picture, "canny", 20), 60, 60, "fill"))
    small, large = perfect.control_images(picture, (60, 60), (90, 90))   # (the Hires fix: one map, fitted twice)
    np.testing.assert_array_equal(large, fit(preprocess(picture, "canny", 20), 90, 90, "fill"))
    np.testing.assert_array_equal(small, perfect.control_image(picture, 60, 60))
    strip = (4, 1000)   # (a picture that a fill, or Pixel Perfect's scale, leaves without pixels: said so)
    assert ControlUnit("cn", resize="fill").problem(strip, 64, 48) == ("is 1000x4: fitted to 64x48 (Resize and "
                                                                      "Fill) a side of it has no pixels")
    assert ControlUnit("cn", module="canny", pixel_perfect=True, resize="fill").problem(strip, 64, 48) == (
        "is 1000x4: at the images' scale (Pixel Perfect) canny would find its edges at 0 px")
    assert ControlUnit("cn", resize="crop").problem(strip, 64, 48) is None
    plain = ControlUnit("cn", resize="just")
    np.testing.assert_array_equal(plain.control_image(picture, 60, 60), resize_map(picture, 60, 60))
    assert [ControlUnit("cn", module=module, mode=mode).hires_mode() for module, mode in (
        ("canny", "balanced"), ("canny", "controlnet"), ("canny", "prompt"), ("none", "balanced"),
        ("invert", "balanced"))] == ["prompt", "controlnet", "prompt", "balanced", "balanced"]


def test_a_drawing_on_a_clear_canvas_gives_its_strokes(tmp_path):
    """load_picture: a picture with transparency, neither all clear nor all opaque, is read as the extension
    reads a canvas: its alpha, the strokes white on black; an opaque or all-clear one as its RGB."""
    from PIL import Image
    from sdjax.preprocess import load_picture
    drawing = np.zeros((8, 10, 4), np.uint8)   # (black strokes on a clear canvas)
    drawing[2, 1:9, 3] = drawing[3:7, 4, 3] = 255
    Image.fromarray(drawing).save(tmp_path / "drawing.png")
    got = load_picture(tmp_path / "drawing.png")
    assert got.shape == (8, 10, 3) and (got[..., 0] == drawing[..., 3]).all() and (got[..., :1] == got).all()
    opaque = np.random.default_rng(0).integers(0, 256, (8, 10, 4), np.uint8)
    for alpha, name in ((255, "opaque.png"), (0, "clear.png")):
        opaque[..., 3] = alpha
        Image.fromarray(opaque).save(tmp_path / name)
        np.testing.assert_array_equal(load_picture(tmp_path / name), opaque[..., :3])
    Image.fromarray(opaque[..., :3]).save(tmp_path / "rgb.png")
    np.testing.assert_array_equal(load_picture(tmp_path / "rgb.png"), opaque[..., :3])
