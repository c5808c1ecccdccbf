"""ControlNet control images as AUTOMATIC1111's ControlNet extension prepares them: its units' settings,
its model-free preprocessors (``canny``, ``invert``) and its resize modes.

A unit's picture is preprocessed at its own aspect (canny at "Processor Res", the short side's pixels) and
the result is then fitted to the images' size by the unit's resize mode: "Just Resize" stretches it,
"Crop and Resize" scales it to cover the size and cuts the middle out, "Resize and Fill" scales it to fit
inside and fills the rest with the median colour of its border. Maps are resampled as the extension
resamples them, with OpenCV (`resize_map`): a black-and-white map (canny's edges, a scribble) stays black
and white with its lines as thin as they were, a map of a few flat colours (a segmentation) keeps its
colours, and other pictures are resampled with area averaging to shrink and bicubic to enlarge. Canny
edges are OpenCV's ``cv2.Canny``, as the extension computes them.
"""
from __future__ import annotations

import dataclasses

import numpy as np

# sdjax's name -> the name A1111's ControlNet extension writes ("Resize Mode: Crop and Resize")
RESIZE_MODES = {"just": "Just Resize", "crop": "Crop and Resize", "fill": "Resize and Fill"}
# the extension's older names of two modes, which older images carry
RESIZE_MODE_ALIASES = {"Inner Fit (Scale to Fit)": "crop", "Scale to Fit (Inner Fit)": "crop",
                       "Outer Fit (Shrink to Fit)": "fill", "Envelope (Outer Fit)": "fill"}
# the preprocessors sdjax runs ("none": the control image is given processed), and the names the extension's
# menu gives some, which its units record
PREPROCESSORS = ("none", "canny", "invert")
PREPROCESSOR_ALIASES = {"invert (from white bg & black line)": "invert"}
# the extension's defaults and ranges for canny's "Processor Res" and its two thresholds
PROCESSOR_RES, PROCESSOR_RES_RANGE = 512, (64, 2048)
CANNY_LOW, CANNY_HIGH, CANNY_RANGE = 100, 200, (1, 255)


@dataclasses.dataclass(frozen=True)
class ControlUnit:
    """One of A1111's ControlNet units: a ControlNet (folder, Hub repo id or file), its control image (a
    file, or None where only its record matters) and its settings."""
    controlnet: str
    image: str | None = None
    scale: float = 1.0            # Weight: the residuals' weight
    start: float = 0.0            # Guidance Start / End: the share of the steps it steers from and to
    end: float = 1.0
    mode: str = "balanced"        # Control Mode (sdjax.sampling.CONTROL_MODES)
    resize: str = "just"          # Resize Mode (RESIZE_MODES)
    module: str = "none"          # Module: the preprocessor (PREPROCESSORS)
    processor_res: int = PROCESSOR_RES   # canny's working resolution: the short side's pixels
    low_threshold: int = CANNY_LOW       # canny's thresholds (A1111's Threshold A and B)
    high_threshold: int = CANNY_HIGH
    pixel_perfect: bool = False   # Processor Res from the images' size instead (A1111's Pixel Perfect)

    def resolution(self, shape: tuple[int, int], width: int, height: int) -> int:
        """The preprocessor's resolution for a picture of ``shape`` (H, W) and images of ``width`` x
        ``height``: Processor Res, or with Pixel Perfect the images' own scale."""
        return (pixel_perfect_resolution(shape, width, height, self.resize) if self.pixel_perfect
                else self.processor_res)

    def control_images(self, picture: np.ndarray, *sizes: tuple[int, int]) -> list[np.ndarray]:
        """The control image for images of each (width, height) of ``sizes``: ``picture`` (uint8 RGB [H, W,
        3], the file as read) preprocessed once by the unit's module (Pixel Perfect: at the first size's
        scale), then fitted to each size by its resize mode, as the extension makes the Hires fix's second
        pass's from the first's map."""
        detected = preprocess(picture, self.module, self.resolution(picture.shape[:2], *sizes[0]),
                              self.low_threshold, self.high_threshold)
        return [fit(detected, width, height, self.resize) for width, height in sizes]

    def control_image(self, picture: np.ndarray, width: int, height: int) -> np.ndarray:
        """The control image for images of ``width`` x ``height`` (`control_images` of one size)."""
        return self.control_images(picture, (width, height))[0]

    def problem(self, shape: tuple[int, int], width: int, height: int) -> str | None:
        """Why a picture of ``shape`` (H, W) cannot be made into this unit's control image for images of
        ``width`` x ``height`` (a side scaled to no pixels), or None."""
        h, w = shape
        if self.module == "canny" and (res := self.resolution(shape, width, height)) < 1:   # (its short side: res)
            return f"is {w}x{h}: at the images' scale (Pixel Perfect) canny would find its edges at {res} px"
        if self.resize != "just" and min(fit_size(shape, width, height, self.resize)) < 1:
            return (f"is {w}x{h}: fitted to {width}x{height} ({RESIZE_MODES[self.resize]}) a side of it has no "
                    "pixels")
        return None

    def hires_mode(self) -> str:
        """The Control Mode of the Hires fix's second pass: the extension weighs the residuals softly there
        after its canny preprocessor ("My prompt is more important"'s weights), against the artifacts
        that sharp edges give at the larger size; the unit's own mode otherwise."""
        return "prompt" if self.module == "canny" and self.mode == "balanced" else self.mode


def load_picture(path) -> np.ndarray:
    """A unit's control image file as the extension takes it from its canvas: uint8 RGB [H, W, 3], upright
    (its EXIF orientation applied); a file with transparency that is neither (nearly) all clear nor all
    opaque gives its alpha channel instead, gray in all three channels (a drawing on a clear canvas: its
    strokes white on black, as the extension's "canvas scribble" reads it)."""
    from PIL import Image, ImageOps
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)
        if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
            alpha = np.asarray(image.convert("RGBA"))[:, :, 3]
            if not ((alpha <= 5).all() or (alpha >= 250).all()):
                return np.repeat(alpha[:, :, None], 3, axis=2)
        return np.asarray(image.convert("RGB"))


def _opencv():
    try:
        import cv2
    except ImportError:
        raise ImportError("sdjax needs OpenCV (one of its dependencies) for control images and mask blurs: pip "
                          "install opencv-python-headless") from None
    return cv2


def preprocess(picture: np.ndarray, module: str, resolution: int = PROCESSOR_RES, low: int = CANNY_LOW,
               high: int = CANNY_HIGH) -> np.ndarray:
    """``picture`` (uint8 RGB [H, W, 3]) through A1111's ControlNet preprocessor ``module``: "none" (as
    it is), "invert" (``255 - picture``: a black drawing on white made white on black, as the line-art and
    scribble ControlNets read them) or "canny" (``cv2.Canny`` edges with thresholds ``low`` and ``high``,
    white on black, of the picture resized so its short side is ``resolution`` pixels, OpenCV's cubic
    resampling to enlarge and area to shrink, padded at the bottom and right to multiples of 64 with
    its edge pixels and cut back after, as the extension runs it; [round(H k), round(W k), 3])."""
    if module not in PREPROCESSORS:
        raise ValueError(f"preprocessor {module!r}: sdjax has {', '.join(PREPROCESSORS)}")
    if module == "none":
        return picture
    if module == "invert":
        return 255 - picture
    cv2 = _opencv()
    h, w = picture.shape[:2]
    k = resolution / min(h, w)
    th, tw = int(np.round(h * k)), int(np.round(w * k))
    resized = cv2.resize(picture, (tw, th), interpolation=cv2.INTER_CUBIC if k > 1 else cv2.INTER_AREA)
    pad = lambda n: -n % 64  # noqa: E731
    padded = np.pad(resized, [(0, pad(th)), (0, pad(tw)), (0, 0)], mode="edge")
    edges = cv2.Canny(np.ascontiguousarray(padded), int(low), int(high))[:th, :tw]
    return np.repeat(edges[:, :, None], 3, axis=2)


def pixel_perfect_resolution(shape: tuple[int, int], width: int, height: int, resize: str = "just") -> int:
    """A1111's Pixel Perfect Processor Res for a picture of ``shape`` (H, W) and images of ``width`` x
    ``height``: its short side scaled as ``resize`` scales the picture (to cover the size; "fill": to fit
    inside it), so the preprocessor works at the images' own scale."""
    h, w = shape
    scale = (min if resize == "fill" else max)(height / h, width / w)
    return int(np.round(scale * min(h, w)))


# Thinning by hit-or-miss patterns (1: a line pixel, -1: background, 0: either), each in its four
# rotations: a line pixel that matches one is taken away, until none does. The first two thin a line to
# one pixel, the last two prune the one-pixel spurs that enlarging leaves (the extension's patterns).
_THIN = [np.array(k, np.int32) for k in ([[-1, -1, -1], [0, 1, 0], [1, 1, 1]],
                                         [[0, -1, -1], [1, 1, -1], [0, 1, 0]])]
_PRUNE = [np.array(k, np.int32) for k in ([[-1, -1, -1], [-1, 1, -1], [0, 0, -1]],
                                          [[-1, -1, -1], [-1, 1, -1], [-1, 0, 0]])]


def _rotations(kernels) -> list[np.ndarray]:
    return [np.rot90(kernel, turns) for turns in range(4) for kernel in kernels]


def _thin_pass(cv2, lines: np.ndarray, kernels) -> bool:
    """One pass of every pattern over ``lines`` (0/255, in place); whether a pixel was taken away."""
    changed = False
    for kernel in kernels:
        hit = cv2.morphologyEx(lines, cv2.MORPH_HITMISS, kernel) > 127
        if hit.any():
            lines[hit], changed = 0, True
    return changed


def _thin(cv2, lines: np.ndarray, prune: bool) -> np.ndarray:
    for _ in range(32):
        if not _thin_pass(cv2, lines, _rotations(_THIN)):
            break
    if prune:
        _thin_pass(cv2, lines, _rotations(_PRUNE))
    return lines


def _line_maxima(cv2, gray: np.ndarray) -> np.ndarray:
    """``gray`` where a pixel is the largest of its 3-pixel line across in any of the four directions
    (horizontal, vertical, the two diagonals), else 0: the ridge of a line that resampling widened."""
    out = np.zeros_like(gray)
    for line in ([[0, 0, 0], [1, 1, 1], [0, 0, 0]], [[0, 1, 0]] * 3, np.eye(3), np.fliplr(np.eye(3))):
        np.putmask(out, cv2.dilate(gray, np.asarray(line, np.uint8)) == gray, gray)
    return out


def resize_map(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """``image`` (uint8 RGB [H, W, 3]) resized to ``width`` x ``height`` as A1111's ControlNet extension
    resizes control maps: a map of 3 to 199 colours (a segmentation) by nearest neighbour, keeping its
    colours; otherwise by area averaging to fewer pixels and bicubic to more. A black-and-white map (two
    colours, one under 16 and one over 240: canny's edges, a scribble) is made black and white again
    after (its channels' mean cut at Otsu's threshold), and where most of its lines were one pixel wide
    they are brought back to one pixel (the ridges of the resampled lines kept, then thinned)."""
    if image.shape[:2] == (height, width):
        return image
    cv2 = _opencv()
    area = image.shape[0] * image.shape[1]
    shrinking, growing = width * height < area, width * height > area
    colours = len(np.unique(image.reshape(-1, image.shape[2]), axis=0))
    binary = colours == 2 and image.min() < 16 and image.max() > 240
    thin_lines = False
    if binary:   # (thin lines: most of the white is gone after an opening, erosion then dilation)
        square = np.ones((3, 3), np.uint8)
        opened = cv2.dilate(cv2.erode(image, square), square)
        thin_lines = 2 * np.count_nonzero(opened < image) > np.count_nonzero(image > 127)
    interpolation = (cv2.INTER_NEAREST if 2 < colours < 200 else cv2.INTER_AREA if shrinking
                     else cv2.INTER_CUBIC)
    out = cv2.resize(image, (width, height), interpolation=interpolation)
    if not binary:
        return out
    gray = np.mean(out.astype(np.float32), axis=2).clip(0, 255).astype(np.uint8)
    if thin_lines:
        gray = _line_maxima(cv2, gray)
    _, lines = cv2.threshold(gray, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    if thin_lines:
        lines = _thin(cv2, lines, prune=growing)
    return np.repeat(lines[:, :, None], 3, axis=2)


def fit_size(shape: tuple[int, int], width: int, height: int, resize: str) -> tuple[int, int]:
    """The size (H, W) a picture of ``shape`` is scaled to before "crop" cuts it or "fill" pads it: scaled by
    the larger of the two ratios (crop) or the smaller (fill), each side rounded."""
    h, w = shape
    k = (max if resize == "crop" else min)(height / h, width / w)
    return int(np.round(h * k)), int(np.round(w * k))


def fit(image: np.ndarray, width: int, height: int, resize: str = "just") -> np.ndarray:
    """``image`` (uint8 RGB [H, W, 3]) fitted to ``width`` x ``height`` by A1111's resize mode ``resize``:
    "just" (Just Resize: stretched), "crop" (Crop and Resize: scaled by the larger of the two ratios, each
    side rounded, and the middle cut out) or "fill" (Resize and Fill: scaled by the smaller, put in the
    middle of the size filled with the per-channel median of the image's border pixels, rounded down).
    Resampled by `resize_map`."""
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize mode {resize!r}: sdjax has {', '.join(RESIZE_MODES)}")
    if resize == "just":
        return resize_map(image, width, height)
    new_h, new_w = fit_size(image.shape[:2], width, height, resize)
    scaled = resize_map(image, new_w, new_h)
    if resize == "crop":
        top, left = max(0, (new_h - height) // 2), max(0, (new_w - width) // 2)
        return scaled[top:top + height, left:left + width]
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]], axis=0)
    out = np.empty((height, width, image.shape[2]), image.dtype)
    out[:] = np.median(border, axis=0).astype(image.dtype)
    top, left = max(0, (height - new_h) // 2), max(0, (width - new_w) // 2)
    out[top:top + new_h, left:left + new_w] = scaled
    return out
