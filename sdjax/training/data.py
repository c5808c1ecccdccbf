"""Captioned images for fine-tuning: loading, validation, preprocessing and batching.

Sources (``load_captioned_images(source)``):

* a folder, the layout users prepare (``train.py --train-data DIR``)::

      DIR/
        image_captions.csv   # header "filename,caption"; quote captions that contain commas
        train_images/        # the CSV's filenames are relative to this folder (subfolders allowed)

  or the images with a ``metadata.jsonl`` / ``metadata.csv`` (the Hugging Face imagefolder
  layout), or the images each with a caption file of its name (``a.png`` + ``a.txt``, kohya_ss's).

* a TFDS dataset, ``"tfds:NAME[/CONFIG][:SPLIT]"`` (split defaults to ``train``; slices such as
  ``train[:90%]`` work). Needs the optional extra: ``pip install -e ".[tfds]"`` in the checkout.

Every row is checked when the dataset is loaded, so a bad file stops the run before any compute is
spent, with one `DataError` that lists every bad row (or, with ``skip_bad_rows=True``, the bad rows
are left out and listed in ``dataset.skipped``).

Batching (`BatchIterator`) is a pure function of (seed, step): the order of epoch ``e`` is a
permutation drawn from ``(seed, e)``, each process takes its slice of every global batch (of every
micro-batch, with gradient accumulation), and crop and flip decisions come from ``(seed, epoch,
example index)``. Resuming from a saved global step therefore replays exactly the batches (and
micro-batches) an uninterrupted run would have seen, on any number of hosts.
"""

from __future__ import annotations

import collections.abc
import concurrent.futures
import csv
import hashlib
import io
import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image, ImageOps


CAPTIONS_FILENAME = "image_captions.csv"
IMAGES_DIRNAME = "train_images"
CSV_HEADER = ("filename", "caption")
# The Hugging Face "imagefolder" layout (what diffusers' train_text_to_image.py reads from a local
# folder): a metadata file beside the images, with a file_name column and the caption in "text".
METADATA_FILENAMES = ("metadata.jsonl", "metadata.csv")
METADATA_CAPTION_COLUMNS = ("text", "caption")
RUN_CONFIG_FILENAME = "train_config.json"   # a training run's settings, in its folder (which it marks)
DEFAULT_CAPTION_KEY = "caption"   # TFDS's usual caption feature; in a metadata file: text, else caption
# Caption files beside the images (kohya_ss, the web UIs' training tools): a.png + a.txt.
SIDECAR_CAPTION_SUFFIXES = (".txt", ".caption")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
TFDS_PREFIX = "tfds:"
TFDS_INSTALL_HINT = ('pip install -e ".[tfds]" in the sdjax checkout (or pip install tensorflow-datasets '
                     'tensorflow-cpu)')  # sdjax is not on PyPI: the extra installs from the checkout


class TFDSNotInstalled(ImportError):
    """A ``tfds:`` source without the optional tensorflow-datasets / tensorflow packages."""

_LAYOUT_HELP = (f"expected a folder holding {CAPTIONS_FILENAME} (header 'filename,caption') and "
                f"{IMAGES_DIRNAME}/ with the images it names, the images with a metadata.jsonl "
                "(the Hugging Face imagefolder layout: file_name and text on each line), or the images "
                "each with a caption file of its name (a.png + a.txt, as kohya_ss writes them)")
_VERSION_RE = re.compile(r"\d+\.\d+\.\d+")


class DataError(ValueError):
    """The training data cannot be used as given. ``bad_rows`` lists the offending rows, if any."""

    def __init__(self, message: str, bad_rows: Iterable[BadRow] = ()):
        super().__init__(message)
        self.bad_rows = list(bad_rows)


class ImageReadError(DataError):
    """An image that was usable when the data was loaded cannot be read any more (deleted, changed,
    a network folder gone): raised by `CaptionedImages.get_image`, during training."""


@dataclass(frozen=True)
class BadRow:
    """One unusable row.

    ``row`` is the 1-based data row of the CSV (header not counted) and ``line`` the CSV line where
    it starts (they differ when quoted captions span lines); for TFDS, ``row`` is the 0-based example
    index in the split and ``line`` is None. ``name`` is the filename as written, or the example id.
    """

    row: int
    name: str
    reason: str
    line: int | None = None

    def __str__(self) -> str:
        if self.line is None:
            return f"example {self.row} {self.name!r}: {self.reason}"
        return f"row {self.row} (line {self.line}) {self.name!r}: {self.reason}"


def _default_workers() -> int:
    return min(16, os.cpu_count() or 1)


# ----------------------------------------------------------------------------------------------
# Images


def to_rgb(image: Image.Image) -> Image.Image:
    """Returns ``image`` as 8-bit RGB.

    Transparent images (RGBA, LA, palette or RGB/L with a transparent colour) are composited on
    white: the colour under fully transparent pixels is arbitrary (often black), and white is how
    viewers show such images. 16-bit grayscale (``I;16*``, and ``I``, which is taken to hold 16-bit
    values) is scaled by 255/65535 (PIL's own conversion would clip it); ``F`` is taken to be in
    [0, 1]. Everything else (L, 1, P, CMYK, YCbCr, ...) uses PIL's conversion.
    """
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode.startswith("I"):
        values = np.asarray(image).astype(np.float64) / 257.0
        return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8)).convert("RGB")
    if mode == "F":
        values = np.asarray(image, dtype=np.float64) * 255.0
        return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8)).convert("RGB")
    if mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _open_image_file(path: str | os.PathLike | io.BytesIO, min_side: int | None = None) -> Image.Image:
    """Fully decodes an image file (so truncation is caught here) and applies its EXIF rotation.

    With ``min_side``, a JPEG is decoded at 1/2, 1/4 or 1/8 scale (libjpeg scales while decoding)
    where both sides stay at least ``2 * min_side``: a 4000x3000 photo for 512 px training decodes
    at 2000x1500 in half the time, and the final resize still sees twice the pixels it keeps.
    """
    with Image.open(path) as image:
        if min_side:
            image.draft(None, (2 * min_side, 2 * min_side))   # a no-op for other formats
        image.load()
        # Phone photos store rotation in EXIF; the image people see is the rotated one.
        # exif_transpose returns a new in-memory image, so closing the file is safe.
        return ImageOps.exif_transpose(image)


def preprocess_image(image: Image.Image, *, resolution: int, center_crop: bool = True,
                     flip: bool = False, rng: np.random.Generator | None = None,
                     resample: Image.Resampling = Image.Resampling.BICUBIC) -> np.ndarray:
    """Resizes, crops and normalizes one image for the VAE encoder.

    The shorter side is resized to ``resolution`` (bicubic by default, skipped when it already
    matches), then a ``resolution`` square is cut from the centre, or at a position drawn from ``rng``
    when ``center_crop`` is False; ``flip`` mirrors it left-right.

    Returns:
      float32 array [resolution, resolution, 3] in [-1, 1] (HWC, RGB).
    """
    image = to_rgb(image)
    width, height = image.size
    # The size after resizing: the shorter side lands exactly on `resolution`, the longer one is rounded.
    scale = resolution / min(width, height)
    if width <= height:
        resized_w, resized_h = resolution, max(resolution, round(height * scale))
    else:
        resized_w, resized_h = max(resolution, round(width * scale)), resolution
    if center_crop:
        top, left = (resized_h - resolution) // 2, (resized_w - resolution) // 2
    else:
        if rng is None:
            raise ValueError("random cropping (center_crop=False) needs an rng")
        top = int(rng.integers(0, resized_h - resolution + 1))
        left = int(rng.integers(0, resized_w - resolution + 1))
    if (resized_w, resized_h) == (width, height):   # no resampling: cut the square out
        image = image.crop((left, top, left + resolution, top + resolution))
    else:
        # Resample only the crop, given as a box in source pixels (the filter still reads the pixels
        # around it): resizing all of a 2000x1 image to 512 px high would make a 1024000x512 image.
        sx, sy = width / resized_w, height / resized_h
        box = (left * sx, top * sy, (left + resolution) * sx, (top + resolution) * sy)
        image = image.resize((resolution, resolution), resample=resample, box=box)
    pixels_HWC = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    if flip:
        pixels_HWC = pixels_HWC[:, ::-1]
    return np.ascontiguousarray(pixels_HWC)


# ----------------------------------------------------------------------------------------------
# The dataset


class CaptionedImages(collections.abc.Sequence):
    """A validated, random-access sequence of (image, caption) pairs.

    An example may have several captions (COCO's five, a ``metadata.jsonl`` list): training then
    takes one of them per epoch (`BatchIterator`), as diffusers' ``train_text_to_image.py`` does.

    Attributes:
      source: where the data came from (folder path or ``tfds:`` string).
      names: per example, the filename relative to ``train_images/`` or a TFDS example id.
      caption_sets: per example, its captions (a tuple of one or more whitespace-stripped, non-empty
        texts).
      captions: per example, its first caption.
      shorter_sides: per example, its image's shorter side in pixels, measured when the images were
        validated; None where they were not.
      skipped: the `BadRow` s left out because of ``skip_bad_rows=True`` (empty otherwise).
    """

    def __init__(self, *, source: str, names: list[str], captions: list[str | tuple[str, ...]],
                 open_image: Callable[[int, int | None], Image.Image], skipped: Iterable[BadRow] = (),
                 shorter_sides: list[int] | None = None):
        """``captions``: per example, a caption or a tuple of its captions."""
        if len(names) != len(captions) or (shorter_sides is not None and len(shorter_sides) != len(names)):
            raise ValueError("names, captions and shorter_sides differ in length")
        self.shorter_sides = None if shorter_sides is None else list(shorter_sides)
        self.source = source
        self.names = list(names)
        self.caption_sets = [(c,) if isinstance(c, str) else tuple(c) for c in captions]
        if not all(self.caption_sets):
            raise ValueError("every example needs at least one caption")
        self.captions = [texts[0] for texts in self.caption_sets]
        self.skipped = list(skipped)
        self._open_image = open_image

    def __len__(self) -> int:
        return len(self.captions)

    def _check_index(self, index: int) -> int:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"example {index} out of range for {n} examples")
        return index % n

    def get_image(self, index: int, *, min_side: int | None = None) -> Image.Image:
        """The image of example ``index`` as an RGB PIL image (not preprocessed).

        Full size by default; with ``min_side`` a large JPEG may be decoded at a reduced scale that
        keeps both sides at least twice ``min_side`` (for preprocessing to that resolution)."""
        index = self._check_index(index)
        try:
            return to_rgb(self._open_image(index, min_side))
        except Exception as e:  # the file changed after validation, or validation was off
            raise ImageReadError(f"{self.source}: cannot read image of example {index} "
                            f"({self.names[index]!r}): {type(e).__name__}: {e}") from e

    def __getitem__(self, index: int) -> tuple[Image.Image, str]:
        index = self._check_index(index)
        return self.get_image(index), self.captions[index]

    @property
    def fingerprint(self) -> str:
        """A hash of the names and captions, to check that every host loaded the same rows (and a
        resume the same data). With one caption per example it is what it was before examples
        could have several, so older runs still resume."""
        return _fingerprint(self.names, self.caption_sets)

    @property
    def first_captions_fingerprint(self) -> str:
        """The `fingerprint` of the names and first captions: what runs started before examples could
        have several captions recorded (sdjax then trained on a TFDS example's first caption)."""
        return _fingerprint(self.names, [texts[:1] for texts in self.caption_sets])

    def smaller_than(self, resolution: int) -> list[int]:
        """The examples whose image's shorter side is below ``resolution``: preprocessing upscales
        them, so they train on blurred detail (empty when the images were not validated)."""
        return [i for i, side in enumerate(self.shorter_sides or ()) if side < resolution]

    @property
    def num_captions(self) -> int:
        """The captions of all the examples together."""
        return sum(map(len, self.caption_sets))

    def __repr__(self) -> str:
        several = self.num_captions - len(self)
        return (f"CaptionedImages({self.source!r}, {len(self)} examples, "
                + (f"{self.num_captions} captions, " if several else "") + f"{len(self.skipped)} skipped)")


def _fingerprint(names: list[str], caption_sets: list[tuple[str, ...]]) -> str:
    digest = hashlib.sha256()
    for name, texts in zip(names, caption_sets):
        digest.update(name.encode() + b"\0" + "\x1f".join(texts).encode() + b"\0")
    return digest.hexdigest()[:16]


def load_captioned_images(source: str | os.PathLike, *, image_key: str = "image",
                          caption_key: str = DEFAULT_CAPTION_KEY, data_dir: str | os.PathLike | None = None,
                          skip_bad_rows: bool = False, validate_images: bool = True,
                          download: bool = False, num_workers: int | None = None) -> CaptionedImages:
    """Loads and validates captioned images from a folder or a TFDS dataset.

    Args:
      source: a folder in the ``image_captions.csv`` + ``train_images/`` layout (or with a
        ``metadata.jsonl``, or a ``.txt`` caption file beside each image), or
        ``"tfds:NAME[/CONFIG][:SPLIT]"``. The text after the last ``:`` outside brackets is the
        split unless it is a version (``tfds:NAME:1.0.0``), so a namespaced name needs an explicit
        split (``tfds:huggingface:NAME:train``).
      image_key, caption_key: TFDS feature names; ``/`` reaches into nested features (e.g.
        ``captions/text``). A caption feature that holds several captions gives the example all of
        them (``caption_sets``; training takes one per epoch). ``caption_key`` is also the caption
        column of a folder's ``metadata.jsonl`` / ``metadata.csv``; its default, ``"caption"``,
        means there the column ``text``, else ``caption`` (Hugging Face imagefolder's convention).
      data_dir: TFDS data folder (default: TFDS's own, ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).
      skip_bad_rows: leave bad rows out (listed in ``.skipped``) instead of raising.
      validate_images: fully decode every image now (default). Turn off only for large data you
        trust; an unreadable image then fails the batch that uses it.
      download: let TFDS download and prepare a dataset that is not in ``data_dir`` yet. Off by
        default: on multi-host runs every host would download; prepare it once beforehand instead.
      num_workers: threads for decoding images (default min(16, CPUs)).

    Raises:
      DataError: a missing folder/CSV/``train_images/``, a wrong CSV header, bad rows (one error
        listing all of them) unless ``skip_bad_rows``, or no usable rows.
      ImportError: a ``tfds:`` source without tensorflow-datasets installed.
    """
    num_workers = num_workers or _default_workers()
    if isinstance(source, str) and source.startswith(TFDS_PREFIX):
        return _load_tfds(source, image_key=image_key, caption_key=caption_key, data_dir=data_dir,
                          skip_bad_rows=skip_bad_rows, validate_images=validate_images,
                          download=download, num_workers=num_workers)
    return _load_folder(Path(source), caption_key=caption_key, skip_bad_rows=skip_bad_rows,
                        validate_images=validate_images, num_workers=num_workers)


def _finish(source: str, where: str, names: list[str], captions: list[str | tuple[str, ...]],
            open_image: Callable[[int, int | None], Image.Image], bad: list[BadRow], total: int,
            skip_bad_rows: bool, shorter_sides: list[int] | None) -> CaptionedImages:
    """Raises for bad rows (unless skipping) or no usable rows; else builds the dataset."""
    bad = sorted(bad, key=lambda b: b.row)
    listing = "\n".join(f"  {b}" for b in bad)
    if bad and not skip_bad_rows:
        raise DataError(f"{where}: {len(bad)} bad row{'s' * (len(bad) != 1)} of {total} "
                        f"(fix them, or pass --skip-bad-rows / skip_bad_rows=True to leave them out):\n{listing}", bad)
    if not names:
        detail = f"; all {total} rows are bad:\n{listing}" if bad else " (it has no rows)"
        raise DataError(f"{where}: no usable training examples{detail}", bad)
    if bad:
        warnings.warn(f"{where}: skipped {len(bad)} bad row{'s' * (len(bad) != 1)} of {total}:\n{listing}",
                      stacklevel=2)
    return CaptionedImages(source=source, names=names, captions=captions, open_image=open_image,
                           skipped=bad, shorter_sides=shorter_sides)


# ----------------------------------------------------------------------------------------------
# Folder layout


# (row, start line, filename, caption or tuple of captions, problem or None)
Row = tuple[int, "int | None", str, "str | tuple[str, ...]", "str | None"]


def _csv_rows(csv_path: Path) -> Iterator[Row]:
    """The rows of an ``image_captions.csv``."""
    for row, line, fields in _read_csv_rows(csv_path):
        if len(fields) != 2:
            hint = "; put captions that contain commas in double quotes" if len(fields) > 2 else ""
            yield row, line, fields[0].strip(), "", (f"expected 2 columns (filename,caption), found "
                                                     f"{len(fields)}{hint}")
        else:
            yield row, line, fields[0].strip(), fields[1].strip(), None


def _metadata_rows(path: Path, columns: Sequence[str] = METADATA_CAPTION_COLUMNS) -> Iterator[Row]:
    """The rows of an imagefolder ``metadata.jsonl`` (one JSON object per line) or ``metadata.csv``:
    ``file_name`` and the caption in the first of ``columns`` the row has (``text``, else ``caption``)."""
    def row_of(row, line, record) -> Row:
        if not isinstance(record, dict):
            return row, line, "", "", f"not a JSON object: {str(record)[:60]!r}"
        filename = record.get("file_name")
        column = next((c for c in columns if c in record), None)
        if not isinstance(filename, str) or column is None:
            other = [str(k) for k in record if k != "file_name"]
            hint = (" (--caption-key / caption_key= reads the caption from another column)"
                    if isinstance(filename, str) and other and tuple(columns) == METADATA_CAPTION_COLUMNS else "")
            return row, line, str(filename or ""), "", (
                f"needs file_name and a caption in {' or '.join(columns)}; it has "
                f"{', '.join(map(str, record)) or 'nothing'}{hint}")
        caption = record[column]
        if isinstance(caption, list):   # several captions: training takes one per epoch, as diffusers does
            if not all(isinstance(c, str) for c in caption):
                return row, line, filename.strip(), "", f"{column} is a list that holds something other than text"
            return row, line, filename.strip(), tuple(c.strip() for c in caption if c.strip()), None
        return row, line, filename.strip(), caption.strip() if isinstance(caption, str) else "", None

    if path.suffix == ".csv":
        try:
            with open(path, newline="", encoding="utf-8-sig") as f:
                for row, record in enumerate(csv.DictReader(f, strict=True, skipinitialspace=True), 1):
                    yield row_of(row, row + 1, {k.strip(): v for k, v in record.items() if k is not None})
        except (UnicodeDecodeError, csv.Error) as e:
            raise DataError(f"{path}: cannot be read as UTF-8 CSV ({e})") from e
        return
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from e
    row = 0
    for line, text in enumerate(lines, 1):
        if not text.strip():
            continue
        row += 1
        try:
            record = json.loads(text)
        except ValueError as e:
            yield row, line, "", "", f"not JSON ({e})"
            continue
        yield row_of(row, line, record)


def _sidecar_rows(root: Path) -> list[Row] | None:
    """The images under ``root`` (subfolders too, symlinked ones included, hidden ones left out),
    each captioned by the text file of its name beside it (``a.png`` + ``a.txt`` or ``a.caption``,
    any letter case; its lines joined by spaces); an image without one is a bad row. None when
    not this layout: no captioned image in ``root`` or the folders right under it (checked
    first, so that a wrong folder such as ``~`` is not walked whole)."""
    if not any(_captioned_images(folder) for folder in (root, *_subfolders(root))):
        return None
    rows, orphans = [], []
    for folder in _folders_below(root):
        pairs, unmatched = _sidecar_files(folder)
        orphans += [p.relative_to(root).as_posix() for p in unmatched]
        for image, caption_file in pairs:
            name = image.relative_to(root).as_posix()
            row = len(rows) + 1
            if caption_file is None:
                rows.append((row, None, name, "", f"no caption file ({image.with_suffix('.txt').name})"))
                continue
            try:
                text = " ".join(caption_file.read_text(encoding="utf-8-sig").split())
            except (OSError, UnicodeDecodeError) as e:
                rows.append((row, None, name, "", f"cannot read {caption_file.name} ({e})"))
                continue
            rows.append((row, None, name, text, None))
    if orphans:   # an image of another kind (.gif, .heic), or a stray note: left out, but said
        warnings.warn(f"{root}: {len(orphans)} caption file{'s' if len(orphans) > 1 else ''} without an image "
                      f"beside {'them' if len(orphans) > 1 else 'it'} that sdjax reads ({', '.join(IMAGE_SUFFIXES)}), "
                      f"left out: {', '.join(orphans[:5])}{', ...' if len(orphans) > 5 else ''}", stacklevel=2)
    return rows


def _subfolders(folder: Path) -> list[Path]:
    """The folders right under ``folder`` (symlinked ones included), hidden ones left out, by name."""
    try:
        return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return []


def _is_training_run(folder: Path) -> bool:
    """Whether ``folder`` holds an sdjax run's record (a JSON object with the settings train.py
    writes), not just any file named train_config.json (another tool's, a dataset's own)."""
    try:
        record = json.loads((folder / RUN_CONFIG_FILENAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and {"train_data", "max_steps", "output_dir"} <= record.keys()


def _folders_below(root: Path) -> Iterator[Path]:
    """``root`` and every folder under it, depth first by name, each real folder once (a symlink
    loop is not followed round). A training run's folder (one with a ``train_config.json``, such
    as an ``--output-dir`` inside the data) is left out: its samples and the text files of its
    checkpoints and export are not training data, and they change as the run goes on."""
    seen, stack = set(), [root]
    while stack:
        folder = stack.pop()
        real = folder.resolve()
        if real in seen:
            continue
        if folder != root and _is_training_run(folder):
            warnings.warn(f"{folder}: a training run's folder ({RUN_CONFIG_FILENAME}), left out of the data",
                          stacklevel=3)
            continue
        seen.add(real)
        yield folder
        stack.extend(reversed(_subfolders(folder)))


def _captioned_images(folder: Path) -> list[tuple[Path, Path]]:
    """(image, its caption file) in ``folder``, for the images that have one."""
    return [(image, caption) for image, caption in _sidecar_files(folder)[0] if caption is not None]


def _sidecar_files(folder: Path) -> tuple[list[tuple[Path, Path | None]], list[Path]]:
    """From one listing of ``folder``: (image, its caption file or None) for every image sdjax reads,
    by name, and the caption files with no such image."""
    try:
        files = {p.name.lower(): p for p in folder.iterdir() if not p.name.startswith(".") and p.is_file()}
    except OSError:
        return [], []
    pairs, image_stems = [], set()
    for key, path in sorted(files.items(), key=lambda item: item[1].name):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        stem = key.rsplit(".", 1)[0]
        image_stems.add(stem)
        pairs.append((path, next((files[stem + s] for s in SIDECAR_CAPTION_SUFFIXES if stem + s in files), None)))
    unmatched = sorted((p for key, p in files.items() if p.suffix.lower() in SIDECAR_CAPTION_SUFFIXES
                        and key.rsplit(".", 1)[0] not in image_stems), key=lambda p: p.name)
    return pairs, unmatched


def _read_csv_rows(csv_path: Path) -> Iterator[tuple[int, int, list[str]]]:
    """Yields (row, start line, fields) for each non-blank data row after checking the header."""
    line = 1  # where the row being read starts
    try:
        # utf-8-sig: spreadsheet programs often write a byte-order mark.
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            # strict: an unclosed quote is an error, not a caption that swallows every later row;
            # skipinitialspace: `a.png, "a red, square"` is quoted, as people write it by hand.
            reader = csv.reader(f, strict=True, skipinitialspace=True)
            header = next(reader, None)
            if header is None or [h.strip().lower() for h in header] != list(CSV_HEADER):
                found = "an empty file" if header is None else repr(",".join(header))
                raise DataError(f"{csv_path}: the header must be 'filename,caption', found {found}")
            row = 0
            while True:
                line = reader.line_num + 1
                fields = next(reader, None)
                if fields is None:
                    return
                if all(not field.strip() for field in fields):
                    continue  # blank lines, e.g. a trailing newline
                row += 1
                yield row, line, fields
    except UnicodeDecodeError as e:
        raise DataError(f"{csv_path}: not UTF-8 text ({e})") from e
    except csv.Error as e:  # a NUL byte, an unclosed quote, text after a closing quote
        raise DataError(f"{csv_path}: the row starting on line {line} is malformed CSV ({e}); a quoted caption "
                        'must end with a quote, and a quote inside it is written twice ("")') from e


def _path_problem(filename: str, base: str) -> str | None:
    """Why ``filename`` may not be used as a path inside the folder ``base``, or None if it may."""
    if "\0" in filename:
        return "filename contains a NUL character"
    if os.path.isabs(filename) or os.path.splitdrive(filename)[0]:
        return f"absolute path; filenames must be relative to {base}"
    normalized = os.path.normpath(filename)
    if normalized == os.pardir or normalized.startswith(os.pardir + os.sep):
        return f"path resolves outside {base}"
    return None


def _check_image_file(path: Path) -> tuple[str | None, int | None]:
    """(None, the image's shorter side) for an image that decodes, else (the problem, None)."""
    try:
        return None, min(to_rgb(_open_image_file(path)).size)
    except Exception as e:  # PIL raises many types: OSError, SyntaxError, DecompressionBombError...
        return f"unreadable image ({type(e).__name__}: {e})", None


def _load_folder(root: Path, *, caption_key: str = DEFAULT_CAPTION_KEY, skip_bad_rows: bool,
                 validate_images: bool, num_workers: int) -> CaptionedImages:
    root = root.expanduser()
    if not root.exists():
        raise DataError(f"training data folder not found: {root} ({_LAYOUT_HELP})")
    if not root.is_dir():
        raise DataError(f"training data path is not a folder: {root} ({_LAYOUT_HELP})")
    csv_path, images_dir = root / CAPTIONS_FILENAME, root / IMAGES_DIRNAME
    metadata = next((root / name for name in METADATA_FILENAMES if (root / name).is_file()), None)
    if csv_path.is_file():
        if not images_dir.is_dir():
            raise DataError(f"no {IMAGES_DIRNAME}/ folder in {root} ({_LAYOUT_HELP})")
        table, rows_in = csv_path, _csv_rows(csv_path)
    elif metadata is not None:   # imagefolder: the images beside the metadata file
        columns = METADATA_CAPTION_COLUMNS if caption_key == DEFAULT_CAPTION_KEY else (caption_key,)
        table, rows_in, images_dir = metadata, _metadata_rows(metadata, columns), root
    else:
        below = sorted(sub for sub in root.iterdir() if sub.is_dir() and any(
            (sub / name).is_file() for name in (CAPTIONS_FILENAME, *METADATA_FILENAMES)))
        # a caption file beside each image, unless a folder below has a table: then that one is meant
        if below or (sidecar := _sidecar_rows(root)) is None:
            hint = f"; {', '.join(map(str, below))} has one: pass that folder" if below else ""
            raise DataError(f"no {CAPTIONS_FILENAME} (or {' or '.join(METADATA_FILENAMES)}) in {root}{hint} "
                            f"({_LAYOUT_HELP})")
        table, rows_in, images_dir = root, sidecar, root
    if caption_key != DEFAULT_CAPTION_KEY and table != metadata:
        raise DataError(f"caption key {caption_key!r} (--caption-key) names a column of a metadata.jsonl or "
                        f"metadata.csv, or a TFDS feature; {table} has "
                        f"{'the header filename,caption' if table == csv_path else 'a caption file beside each image'}"
                        " (leave --caption-key out)")
    shown = f"{images_dir.name}/" if images_dir != root else ""   # how paths are named in messages

    rows, bad, total = [], [], 0  # rows: (row, line, filename, caption, path)
    for row, line, filename, caption, problem in rows_in:
        total += 1
        if problem is not None:
            bad.append(BadRow(row, filename, problem, line))
            continue
        reasons = []
        path = None
        if not filename:
            reasons.append("empty filename")
        elif (problem := _path_problem(filename, f"{shown or root.name + '/'}")) is not None:
            reasons.append(problem)
        else:
            path = images_dir / os.path.normpath(filename)
            if not path.exists():
                reasons.append(f"file not found: {shown}{filename}")
            elif not path.is_file():
                reasons.append(f"not a file: {shown}{filename}")
        if not caption:
            reasons.append("empty caption")
        if reasons:
            bad.append(BadRow(row, filename, "; ".join(reasons), line))
        else:
            rows.append((row, line, filename, caption, path))

    sides = None
    if validate_images and rows:
        with concurrent.futures.ThreadPoolExecutor(num_workers) as pool:
            checked = list(pool.map(_check_image_file, [r[4] for r in rows]))
        bad += [BadRow(row, filename, problem, line)
                for (row, line, filename, _, _), (problem, _) in zip(rows, checked) if problem]
        rows = [r for r, (problem, _) in zip(rows, checked) if not problem]
        sides = [side for problem, side in checked if not problem]

    paths = [r[4] for r in rows]
    return _finish(str(root), str(table), [r[2] for r in rows], [r[3] for r in rows],
                   lambda i, min_side: _open_image_file(paths[i], min_side), bad, total, skip_bad_rows, sides)


def write_captioned_folder(path: str | os.PathLike,
                           items: Iterable[tuple[Image.Image | np.ndarray, str]], *,
                           image_format: str = "png") -> Path:
    """Writes (image, caption) pairs in the folder layout `load_captioned_images` reads.

    Images go to ``train_images/000000.png``, ... in their own mode (``image_format="jpeg"``
    converts to RGB first); captions are CSV-quoted as needed. An existing CSV is overwritten.

    Returns:
      the folder, as a Path.
    """
    extensions = {"png": "png", "jpeg": "jpg", "jpg": "jpg"}
    if image_format.lower() not in extensions:   # before the folder is made
        raise ValueError(f"image_format={image_format!r}: use 'png' or 'jpeg'")
    extension = extensions[image_format.lower()]
    root = Path(path)
    images_dir = root / IMAGES_DIRNAME
    images_dir.mkdir(parents=True, exist_ok=True)
    with open(root / CAPTIONS_FILENAME, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_HEADER)
        for index, (image, caption) in enumerate(items):
            if isinstance(image, np.ndarray):
                image = Image.fromarray(image)
            if extension == "jpg":
                image = to_rgb(image)
            filename = f"{index:06d}.{extension}"
            image.save(images_dir / filename)
            writer.writerow([filename, caption])
    return root


# ----------------------------------------------------------------------------------------------
# TFDS


def _import_tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise TFDSNotInstalled("tfds: sources need the optional package tensorflow-datasets, which is "
                          f"not installed: {TFDS_INSTALL_HINT}") from e
    return tfds


def _hide_accelerators_from_tensorflow() -> None:
    """Keeps TensorFlow (used by tfds.load) from reserving GPU memory that JAX needs."""
    try:
        import tensorflow as tf
        tf.config.set_visible_devices([], "GPU")
    except Exception:  # not installed (tfds.load then says so), or its devices are already set up
        pass


def parse_tfds_source(source: str) -> tuple[str, str]:
    """``"tfds:NAME[/CONFIG][:SPLIT]"`` -> (TFDS name, split). See `load_captioned_images`."""
    spec = source[len(TFDS_PREFIX):].strip() if source.startswith(TFDS_PREFIX) else source.strip()
    depth, cut = 0, -1
    for i, char in enumerate(spec):  # split slices ("train[:10%]") contain colons too
        depth += (char == "[") - (char == "]")
        if char == ":" and depth == 0:
            cut = i
    if cut >= 0 and not _VERSION_RE.fullmatch(spec[cut + 1:]):
        name, split = spec[:cut], spec[cut + 1:]
    else:
        name, split = spec, "train"
    if not name or not split:
        raise DataError(f"bad TFDS source {source!r}: expected 'tfds:NAME[/CONFIG][:SPLIT]'")
    return name, split


def _feature(example: Any, key: str) -> Any:
    if isinstance(example, collections.abc.Mapping) and key in example:
        return example[key]  # a flat key (also how the TFRecord fallback keeps records)
    for part in key.split("/"):
        if not isinstance(example, collections.abc.Mapping) or part not in example:
            available = sorted(example) if isinstance(example, collections.abc.Mapping) else []
            raise KeyError(f"no feature {key!r} (available here: {available})")
        example = example[part]
    return example


def _caption_texts(value: Any) -> tuple[str, ...]:
    """The non-empty captions in a TFDS caption value: one text, or several (e.g. COCO's five)."""
    if isinstance(value, np.ndarray):
        value = value.item() if value.ndim == 0 else list(value)
    values = value if isinstance(value, (list, tuple)) else [value]
    texts = []
    for text in values:
        if isinstance(text, np.ndarray) and text.ndim == 0:
            text = text.item()
        if isinstance(text, (bytes, np.bytes_)):
            text = bytes(text).decode("utf-8")
        if not isinstance(text, str):
            raise ValueError(f"caption feature holds {type(text).__name__}, not text")
        texts.append(text.strip())
    return tuple(text for text in texts if text)


def _image_from_value(value: Any, min_side: int | None = None) -> Image.Image:
    """A PIL image from a TFDS image value: encoded bytes (SkipDecoding; ``min_side`` as in
    `_open_image_file`) or a decoded array."""
    if isinstance(value, np.ndarray) and value.dtype.kind in "SO" and value.ndim == 0:
        value = value.item()
    if isinstance(value, (bytes, np.bytes_)):
        return _open_image_file(io.BytesIO(bytes(value)), min_side)
    pixels = np.asarray(value)
    if pixels.ndim == 3 and pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    if pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[-1] not in (2, 3, 4)):
        raise ValueError(f"image array of shape {pixels.shape} is not HW or HWC with 1-4 channels")
    if pixels.dtype == np.uint16:
        pixels = np.rint(pixels / 257.0)
    elif pixels.dtype.kind == "f":
        pixels = np.rint(pixels * 255.0)  # float images are taken to be in [0, 1]
    # PIL picks L / LA / RGB / RGBA from the uint8 array's shape.
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _nested(key: str, leaf: Any) -> dict:
    *parents, last = key.split("/")
    tree = {last: leaf}
    for part in reversed(parents):
        tree = {part: tree}
    return tree


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


def _load_tfds(source: str, *, image_key: str, caption_key: str,
               data_dir: str | os.PathLike | None, skip_bad_rows: bool, validate_images: bool,
               download: bool, num_workers: int) -> CaptionedImages:
    name, split = parse_tfds_source(source)
    tfds = _import_tfds()
    where = f"TFDS {name!r} split {split!r}" + (f" in {data_dir}" if data_dir else "")
    data_dir = os.fspath(data_dir) if data_dir is not None else None
    # Keep images encoded: the validation pass then only decodes them when asked to, the TFRecord
    # fallback holds compressed bytes in memory, and PIL does all decoding.
    decoders = _nested(image_key, tfds.decode.SkipDecoding())
    try:
        try:
            # Random access (ArrayRecord/Parquet), no TensorFlow graph needed.
            records = tfds.data_source(name, split=split, data_dir=data_dir, download=download,
                                       decoders=decoders)
            read = records.__getitem__
            count = len(records)
        except (NotImplementedError, AttributeError):
            # Prepared as TFRecord (or an old tfds without data_source): read it once, in order,
            # keeping only the two features we use.
            _hide_accelerators_from_tensorflow()
            dataset = tfds.load(name, split=split, data_dir=data_dir, download=download,
                                shuffle_files=False, decoders=decoders)
            kept = [{image_key: _feature(example, image_key),
                     caption_key: _feature(example, caption_key)}
                    for example in tfds.as_numpy(dataset)]
            read, count = kept.__getitem__, len(kept)
        first = read(0) if count else None
    except ImportError as e:
        raise TFDSNotInstalled(f"{where}: reading it needs tensorflow ({_first_line(e)}): "
                          f"{TFDS_INSTALL_HINT}") from e
    except Exception as e:
        # Not found, not prepared, or a feature name TFDS's decoder does not know.
        prepare = ("" if download else f"the dataset is read as prepared, nothing is downloaded: prepare it first "
                                       f"with `tfds build {name}`, passing its data_dir as --tfds-data-dir; ")
        raise DataError(f"cannot open {where}: {_first_line(e)} ({prepare}its features are named with --image-key "
                        f"{image_key!r} and --caption-key {caption_key!r})") from e
    if first is not None:
        for key in (image_key, caption_key):
            try:
                _feature(first, key)
            except KeyError as e:
                raise DataError(f"{where}: {e.args[0]}; name the features with --image-key / --caption-key") from e

    def check(index: int) -> tuple[tuple[str, ...] | None, int | None, str | None]:
        """(captions, the image's shorter side or None unvalidated, None) or (None, None, reason)."""
        try:
            example = read(index)
            caption = _caption_texts(_feature(example, caption_key))
            side = min(to_rgb(_image_from_value(_feature(example, image_key))).size) if validate_images else None
        except Exception as e:
            return None, None, f"{type(e).__name__}: {e}"
        return (caption, side, None) if caption else (None, None, "empty caption")

    with concurrent.futures.ThreadPoolExecutor(num_workers) as pool:
        results = list(pool.map(check, range(count)))
    indices, captions, sides, bad = [], [], [], []
    for index, (caption, side, reason) in enumerate(results):
        if reason is None:
            indices.append(index)
            captions.append(caption)
            sides.append(side)
        else:
            bad.append(BadRow(index, f"{split}[{index}]", reason))

    def open_image(i: int, min_side: int | None) -> Image.Image:
        return _image_from_value(_feature(read(indices[i]), image_key), min_side)

    return _finish(source, where, [f"{split}[{i}]" for i in indices], captions, open_image, bad,
                   count, skip_bad_rows, sides if validate_images else None)


# ----------------------------------------------------------------------------------------------
# Batches


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """The order of epoch ``epoch``: a permutation of range(num_examples), the same on every host."""
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def example_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator for example ``index``'s crop and flip in ``epoch``.

    The trailing 1 keeps this stream apart from `epoch_permutation`'s ``[seed, epoch]``.
    """
    return np.random.default_rng([seed, epoch, index, 1])


def caption_pick(seed: int, epoch: int, index: int, num_captions: int) -> int:
    """Which of example ``index``'s ``num_captions`` captions epoch ``epoch`` trains on (0 when it
    has one). A stream of its own (the trailing 2), so crops and flips do not depend on it."""
    if num_captions == 1:
        return 0
    return int(np.random.default_rng([seed, epoch, index, 2]).integers(num_captions))


class BatchIterator:
    """Deterministic, resumable, per-process batches of preprocessed captioned images.

    Global batch size B = ``batch_size_per_process * process_count``. Each epoch visits the
    examples in ``epoch_permutation(len(dataset), seed, epoch)`` order, cut into ``len(dataset) // B``
    global batches (the incomplete last one is dropped). A global batch is laid out as
    ``[micro_batches, B // micro_batches]`` (row ``a`` is micro-batch ``a`` of a gradient-accumulation
    step) and process ``p`` takes columns ``[p*m, (p+1)*m)`` of every row, ``m = b // micro_batches``,
    micro-batch after micro-batch: reshaped to ``[micro_batches, m]``, each process holds its part of
    every micro-batch, and the micro-batches are the same whatever the process count. (With
    ``micro_batches=1`` process ``p`` simply takes rows ``[p*b, (p+1)*b)``.) The iterator never ends:
    after the last batch of epoch e comes the first of e + 1. Images decode on ``num_workers`` threads
    (default min(16, CPUs)); with more than one, ``next`` also starts loading the following batch in
    the background, so it is ready when the caller (a training step) asks for it. `close` stops them.

    The position is the global step: batch ``step`` belongs to epoch ``step // steps_per_epoch``.
    Save ``state()`` in a checkpoint and pass its ``"step"`` as ``start_step`` (or call
    ``restore(state)``) to resume exactly at the next batch.

    Each item is a dict:
      ``pixel_values``: float32 [b, resolution, resolution, 3] in [-1, 1];
      ``captions``: list of b str; ``indices``: int64 [b] dataset indices;
      ``caption_picks``: int64 [b], which of its ``dataset.caption_sets`` each caption is (an
      example with several captions trains on one per epoch, drawn from (seed, epoch, index));
      ``step``: the global step of this batch; ``epoch``: its epoch.
    """

    def __init__(self, dataset: CaptionedImages, *, resolution: int, batch_size_per_process: int,
                 process_index: int = 0, process_count: int = 1, seed: int = 0,
                 start_step: int = 0, center_crop: bool = True, random_flip: bool = False,
                 num_workers: int | None = None, micro_batches: int = 1,
                 resample: Image.Resampling = Image.Resampling.BICUBIC):
        if resolution <= 0 or batch_size_per_process <= 0:
            raise ValueError("resolution and batch_size_per_process must be positive")
        if micro_batches <= 0 or batch_size_per_process % micro_batches:
            raise ValueError(f"batch_size_per_process={batch_size_per_process} is not a multiple of "
                             f"micro_batches={micro_batches}")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in [0, {process_count})")
        if seed < 0 or start_step < 0:
            raise ValueError("seed and start_step must be non-negative")
        self.dataset = dataset
        self.resolution = resolution
        self.batch_size_per_process = batch_size_per_process
        self.process_index = process_index
        self.process_count = process_count
        self.global_batch_size = batch_size_per_process * process_count
        self.micro_batches = micro_batches
        self.num_examples = len(dataset)
        self.fingerprint = dataset.fingerprint
        self.steps_per_epoch = len(dataset) // self.global_batch_size
        if self.steps_per_epoch == 0:
            raise DataError(f"{dataset.source}: {len(dataset)} usable examples, fewer than one "
                            f"global batch of {self.global_batch_size} "
                            f"({batch_size_per_process} per process x {process_count} processes)")
        self.seed = seed
        self.step = start_step  # the global step of the next batch
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.resample = resample
        self._order_cache: tuple[int, np.ndarray] | None = None
        workers = num_workers or _default_workers()
        # Images decode on `_pool`'s threads; `_prefetcher` loads the next batch while the caller
        # works on this one (a training step runs on the accelerator meanwhile).
        self._pool = concurrent.futures.ThreadPoolExecutor(workers) if workers > 1 else None
        self._prefetcher = concurrent.futures.ThreadPoolExecutor(1) if workers > 1 else None
        self._ahead: tuple[int, concurrent.futures.Future] | None = None   # (step, its batch)

    @property
    def epoch(self) -> int:
        """The epoch of the next batch."""
        return self.step // self.steps_per_epoch

    def state(self) -> dict[str, Any]:
        """The position to store in a checkpoint: the next batch's global step, plus the settings
        and the dataset identity (size and `CaptionedImages.fingerprint`) that must match on resume."""
        return {"step": self.step, "epoch": self.epoch,
                "step_in_epoch": self.step % self.steps_per_epoch, "seed": self.seed,
                "steps_per_epoch": self.steps_per_epoch,
                "global_batch_size": self.global_batch_size,
                "num_examples": self.num_examples, "fingerprint": self.fingerprint}

    # What a change of each saved value means, for restore's error.
    _RESTORE_CHECKS = {
        "seed": "the seed changed",
        "global_batch_size": "the batch size, accumulation, device or process count changed",
        "num_examples": "the training data has a different number of usable rows",
        "steps_per_epoch": "the dataset size or the global batch size changed",
        "fingerprint": "the training data's file names or captions changed",
    }

    def restore(self, state: dict[str, Any]) -> None:
        """Continues from a `state()` saved earlier.

        Raises DataError if the seed, global batch size, number of examples, steps per epoch or the
        dataset fingerprint differ: the same step would then map to other examples, silently
        changing the data order. (States saved before ``num_examples`` and ``fingerprint`` were
        recorded are checked on the rest.)
        """
        for key, meaning in self._RESTORE_CHECKS.items():
            if key not in state:
                continue
            saved, now = state[key], getattr(self, key)
            if key != "fingerprint":
                saved = int(saved)
            elif saved != now and saved == self.dataset.first_captions_fingerprint:
                warnings.warn(f"{self.dataset.source}: this run was started when sdjax trained on the first caption "
                              "of each example; from here on each epoch trains on one of each example's captions "
                              f"({self.dataset.num_captions} in all)", stacklevel=2)
                continue
            if saved != now:
                keep = (f"; on another number of devices (one that divides {saved}), choose --batch-size and "
                        f"--gradient-accumulation whose product with the device count is {saved}"
                        if key == "global_batch_size" else "")
                raise DataError(f"cannot resume the data order of {self.dataset.source}: saved {key}={saved!r}, "
                                f"now {now!r} ({meaning}); restore the data and settings of the saved run{keep}, "
                                f"or start a new run (another --output-dir; from Python, start_step=0)")
        self._drop_ahead()
        self.step = int(state["step"])

    def _drop_ahead(self) -> None:
        """Stop loading the batch ahead (its step is no longer next), so it does not hold up the pool."""
        if self._ahead is not None:
            future, self._ahead = self._ahead[1], None
            if not future.cancel():
                concurrent.futures.wait([future])

    def _epoch_order(self, epoch: int) -> np.ndarray:
        cached = self._order_cache   # one read: the loading thread may replace it meanwhile
        if cached is None or cached[0] != epoch:
            cached = self._order_cache = (epoch, epoch_permutation(len(self.dataset), self.seed, epoch))
        return cached[1]

    def indices_for_step(self, step: int) -> np.ndarray:
        """The dataset indices this process reads at global step ``step`` (int64 [b]: its part of
        micro-batch 0, then of micro-batch 1, ...)."""
        epoch, offset = divmod(step, self.steps_per_epoch)
        start = offset * self.global_batch_size
        batch_AM = self._epoch_order(epoch)[start:start + self.global_batch_size].reshape(self.micro_batches, -1)
        m = self.batch_size_per_process // self.micro_batches   # this process's columns of each micro-batch
        columns = slice(self.process_index * m, (self.process_index + 1) * m)
        return batch_AM[:, columns].reshape(-1).astype(np.int64)

    def caption_picks(self, step: int, indices: np.ndarray | None = None) -> np.ndarray:
        """Which caption of each example of `indices_for_step` (``step``; pass ``indices`` when they
        are at hand) is trained on (int64 [b])."""
        epoch, sets = step // self.steps_per_epoch, self.dataset.caption_sets
        indices = self.indices_for_step(step) if indices is None else indices
        return np.array([caption_pick(self.seed, epoch, int(i), len(sets[i])) for i in indices], np.int64)

    def _load_one(self, epoch: int, index: int) -> np.ndarray:
        rng = example_rng(self.seed, epoch, int(index))
        # Always draw the flip first, so crops are the same whether flipping is on or off.
        flip = bool(rng.random() < 0.5) and self.random_flip
        return preprocess_image(self.dataset.get_image(int(index), min_side=self.resolution),
                                resolution=self.resolution, center_crop=self.center_crop, flip=flip, rng=rng,
                                resample=self.resample)

    def batch_at(self, step: int) -> dict[str, Any]:
        """This process's batch for global step ``step`` (does not move the iterator)."""
        epoch = step // self.steps_per_epoch
        indices = self.indices_for_step(step)
        pool = self._pool
        if pool is not None:
            # map keeps the order, so threading does not change the batch.
            images = list(pool.map(lambda i: self._load_one(epoch, i), indices))
        else:
            images = [self._load_one(epoch, i) for i in indices]
        picks = self.caption_picks(step, indices)
        return {"pixel_values": np.stack(images),
                "captions": [self.dataset.caption_sets[i][pick] for i, pick in zip(indices, picks)],
                "indices": indices, "caption_picks": picks, "step": step, "epoch": epoch}

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> dict[str, Any]:
        step = self.step
        ahead, self._ahead = self._ahead, None
        # A batch loaded ahead is used only if it is this step's (`restore` may have moved the step);
        # its loading error, if any, is raised here, at the step it belongs to.
        batch = ahead[1].result() if ahead is not None and ahead[0] == step else self.batch_at(step)
        self.step = step + 1
        if self._prefetcher is not None:
            self._ahead = (step + 1, self._prefetcher.submit(self.batch_at, step + 1))
        return batch

    def close(self) -> None:
        """Stops the loader threads (the iterator still works afterwards, single-threaded)."""
        self._drop_ahead()
        for executor in (self._prefetcher, self._pool):   # the prefetcher uses the pool: stop it first
            if executor is not None:
                executor.shutdown(wait=True)
        self._prefetcher = self._pool = None

    def __enter__(self) -> BatchIterator:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def iterate_batches(dataset: CaptionedImages, *, resolution: int, batch_size_per_process: int,
                    process_index: int = 0, process_count: int = 1, seed: int = 0,
                    start_step: int = 0, center_crop: bool = True, random_flip: bool = False,
                    num_workers: int | None = None, micro_batches: int = 1) -> BatchIterator:
    """`BatchIterator` as a function; see there. Use ``jax.process_index()``/``jax.process_count()``
    on multi-host runs."""
    return BatchIterator(dataset, resolution=resolution,
                         batch_size_per_process=batch_size_per_process,
                         process_index=process_index, process_count=process_count, seed=seed,
                         start_step=start_step, center_crop=center_crop, random_flip=random_flip,
                         num_workers=num_workers, micro_batches=micro_batches)
