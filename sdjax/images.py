"""Image files: output names, A1111-style "parameters" metadata, atomic PNG/GIF writes, grids.

Everything a script needs to turn ``StableDiffusionOutput.images`` into files that other tools read:
the PNG text chunk ``parameters`` in the form AUTOMATIC1111's web UI writes (and that image viewers,
civitai, ComfyUI and A1111's own "PNG Info" tab parse), file names that carry the index, seed and
prompt, and writes that never leave a half-written file behind (temp name, then ``os.replace``).
"""
from __future__ import annotations

import errno
import json
import math
import os
import re
import unicodedata
import uuid
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont, ImageOps
from PIL.PngImagePlugin import PngInfo

# sdjax scheduler name -> the sampler name A1111 writes for the equivalent diffusers scheduler
# (A1111's PLMS is PNDM without the Runge-Kutta warm-up, as SD's skip_prk_steps runs it; DDPM has none).
SAMPLER_NAMES = {
    "pndm": "PLMS",
    "ddim": "DDIM",
    "euler": "Euler",
    "euler_a": "Euler a",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_sde": "DPM++ 2M SDE",
    "lms": "LMS",
    "ddpm": "DDPM",
}

# The names sdjax writes: NNNNN-seedS-slug[-trajectory].png/.gif, NNNNN-grid.png and NNNNN-controlK.png (another tool's
# "20240101-holiday.jpg" is not one of them).
_INDEX_RE = re.compile(r"^(\d{5,})-(?:seed\d+-.*\.(?:png|gif)|grid\.png|control\d+\.png)$")
# A run's claim on the numbers it will write, made before its first file: .sdjax-reserved-FIRST holds LAST.
_RESERVED_RE = re.compile(r"^\.sdjax-reserved-(\d{5,})$")


# ----------------------------------------------------------------------------- names
def slugify(text: str, max_length: int = 60) -> str:
    """A file-name-safe slug of ``text``: ASCII lower case, runs of other characters -> "-".

    >>> slugify("A photo of a Cat, 8k!")
    'a-photo-of-a-cat-8k'
    """
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")
    slug = slug[:max_length].rstrip("-")
    return slug or "untitled"


def image_file_name(index: int, seed: int, prompt: str, suffix: str = "", ext: str = "png") -> str:
    """``00003-seed7-a-photo-of-a-cat.png``: run index, seed, prompt slug (and an optional suffix)."""
    return f"{index:05d}-seed{seed}-{slugify(prompt)}{suffix}.{ext}"


def next_free_index(directory: str | os.PathLike) -> int:
    """One past the highest index of the images already in ``directory`` and of the numbers other
    runs have reserved there (0 if none), so a new run continues the numbering instead of
    overwriting earlier images."""
    directory = Path(directory)
    if not directory.is_dir():
        return 0
    found = [-1]
    for p in directory.iterdir():
        if m := _INDEX_RE.match(p.name):
            found.append(int(m.group(1)))
        elif m := _RESERVED_RE.match(p.name):
            found.append(int(m.group(1)))   # its first number, even if its last is missing
            try:
                found.append(int(p.read_text()))
            except (OSError, ValueError):   # left empty, or just released (its images are counted)
                pass
    return max(found) + 1


def reserve_indices(directory: str | os.PathLike, count: int) -> tuple[int, Callable[[], None]]:
    """Claim ``count`` consecutive image numbers in ``directory`` for one run: (the first, a
    function that releases the claim). Two runs writing into one folder at once get ranges that
    do not overlap, where both used to take the same numbers and replace each other's files. The
    claim is a small hidden file holding the range's last number; one left by a killed run only
    leaves a gap."""
    directory = Path(directory)
    last = lambda first: first + max(count, 1) - 1  # noqa: E731
    while True:
        first = next_free_index(directory)
        claim = directory / f".sdjax-reserved-{first:05d}"
        # The claim appears with its last number already in it (a hard link to a finished file is
        # atomic and exclusive), so a run counting at the same moment never reads it empty, which
        # would count its first number only and hand out numbers inside its range.
        draft = directory / f".sdjax-claim-{uuid.uuid4().hex}.tmp"
        try:
            draft.write_text(str(last(first)))
            os.link(draft, claim)
        except FileExistsError:   # another run took this number first: count again past its range
            continue
        except OSError as e:
            if e.errno not in _NO_HARD_LINKS:
                raise             # a full disk, say: no claim is left behind
            if not _claim_by_exclusive_create(claim, last(first)):
                continue
        finally:
            draft.unlink(missing_ok=True)
        return first, lambda: claim.unlink(missing_ok=True)


# How file systems without hard links (some FUSE and network mounts) refuse one.
_NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS}


def _claim_by_exclusive_create(claim: Path, last: int) -> bool:
    """The fallback where hard links are refused: create the claim exclusively, then write its last
    number (a run counting in between reads it empty and counts its first number only)."""
    try:
        fd = os.open(claim, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    try:
        with os.fdopen(fd, "w") as f:
            f.write(str(last))
    except BaseException:   # a full disk: no claim left behind
        claim.unlink(missing_ok=True)
        raise
    return True


# ----------------------------------------------------------------------------- metadata
HIRES_UPSCALER_NAMES = {"latent": "Latent", "lanczos": "Lanczos"}   # sdjax's -> A1111's "Hires upscaler"


def _number(value) -> str:
    """The shortest text that reads back as the same float: 7.5, 12, 7.123456789 (not %g's 7.12346)."""
    text = repr(float(value))
    return text.removesuffix(".0") if "e" not in text else text


def a1111_parameters(prompt: str, negative_prompt: str = "", *, steps: int, scheduler: str, guidance_scale: float,
                     seed: int, width: int, height: int, model: str | None = None, vae: str | None = None,
                     scheduler_options: dict | None = None, clip_skip: int = 1,
                     loras: Sequence[tuple[str, float]] = (), denoising_strength: float | None = None,
                     embeddings: Sequence[tuple[str, str]] = (), prompt_weighting: bool = False,
                     hires_scale: float | None = None, hires_steps: int | None = None,
                     hires_upscaler: str = "latent", emphasis: str = "original",
                     variation_seed: int | None = None, variation_strength: float = 0.0,
                     mask_blur: float | None = None, mask_padding: int | None = None,
                     masked_content: str | None = None, mask_invert: bool = False,
                     controlnets: Sequence = (), hires_scheduler: str | None = None,
                     hires_scheduler_options: dict | None = None, hires_prompt: str | None = None,
                     hires_negative_prompt: str | None = None, hires_guidance_scale: float | None = None,
                     seed_resize_from: tuple[int, int] | None = None) -> str:
    """Generation settings as AUTOMATIC1111 writes them into the PNG ``parameters`` text chunk::

        a photo of a cat
        Negative prompt: blurry
        Steps: 50, Sampler: PNDM, CFG scale: 7.5, Seed: 7, Size: 512x512, Model: stable-diffusion-v1-5

    Like A1111, the ``Negative prompt:`` line is left out when there is no negative prompt, Size
    is width x height, and a VAE other than the model's is named (``VAE: vae-ft-mse-840000-ema-pruned``).
    ``scheduler_options`` are written as A1111 names them where it has them (``Schedule type:
    Karras`` for ``use_karras_sigmas``, ``Exponential`` for ``use_exponential_sigmas``, ``Eta DDIM``, DPM++ 2M
    SDE with ``solver_type=heun`` as ``DPM++ 2M SDE Heun``), the others under their own names; DPM++ 2M (SDE)
    with neither as ``Schedule type: Uniform`` (A1111 1.9+ takes DPM++ 2M alone for Karras, DPM++ 2M SDE
    for Exponential).
    ``clip_skip`` (A1111's numbering) is written as A1111 does, ``Clip skip: 2``, when it is not 1.
    ``loras``, (NAME, SCALE) of each LoRA merged into the weights, are written as A1111 users write
    them in the prompt, which A1111 and Civitai read back: ``a photo of a cat <lora:NAME:SCALE>``.
    ``denoising_strength`` (img2img's strength) is written as A1111's img2img does, ``Denoising strength: 0.75``.
    ``hires_scale`` (the Hires fix; ``denoising_strength`` is then its second pass's) as A1111's txt2img writes
    it: ``Hires upscale: 2``, ``Hires steps: 20`` (only when given), ``Hires upscaler: Latent`` (or ``Lanczos``);
    Size stays the first pass's, as in A1111. The second pass's own settings (`sdjax.HiresFix`'s), where they
    differ from the first's: ``hires_scheduler`` as A1111 1.6+ writes it, ``Hires sampler: DPM++ 2M``, always
    with its ``Hires schedule type`` (Karras, Exponential or Uniform), which is also written for the
    first pass's scheduler with another schedule in ``hires_scheduler_options``; those options' others
    as ``Hires eta: 0.3`` (the option's name); ``hires_guidance_scale`` as Forge writes it, ``Hires CFG
    Scale: 5``; ``hires_prompt`` and ``hires_negative_prompt`` as ``Hires prompt: "..."`` and ``Hires
    negative prompt``, the prompt's LoRA tags after the Hires prompt too (A1111 reads a Hires prompt
    without them as the second pass's without the LoRAs).
    ``embeddings``, (TOKEN, HASH) of the textual inversion embeddings the prompts use, as A1111's
    ``TI hashes: "EasyNegative: c74b4e810b03"`` (HASH: the file's SHA-256, its first 12 hex digits).
    ``prompt_weighting`` (the prompts' AUTOMATIC1111 emphasis syntax read) is written as ``Prompt
    weighting: A1111``, a field of sdjax's own (A1111 always weights, and says nothing), so that
    ``--from-png`` weights the prompt again; without it a prompt or negative prompt with brackets or
    ``BREAK`` is written with ``Emphasis: None``, as A1111 writes its own unweighted ones, which it reads back
    as text (else it would weight them). With ``prompt_weighting``, ``emphasis`` other than "original" (A1111's
    Emphasis setting, `sdjax.text.EMPHASIS_MODES`) is written as A1111 writes it: ``Emphasis: No norm``.
    ``variation_seed`` with a ``variation_strength`` above 0: ``Variation seed: 12, Variation seed strength:
    0.3``, as A1111 writes them; ``seed_resize_from``, (height, width), as ``Seed resize from: 512x768``
    (width x height).
    ``mask_blur`` (inpainting: the mask's blur in pixels, `blur_mask`) as A1111 writes it for every inpainting
    image, ``Mask blur: 4`` (0 too); ``mask_padding`` ("only masked" inpainting) as
    ``Inpaint area: Only masked, Masked area padding: 32``; ``masked_content`` other than "original" as
    ``Masked content: latent noise`` (`sdjax.sampling.MASKED_CONTENTS`); ``mask_invert`` (the mask's
    black part repainted) as ``Mask mode: Inpaint not masked``.
    ``controlnets``, a `sdjax.preprocess.ControlUnit` of each ControlNet (or (PATH, WEIGHT, START, END[,
    MODE]): its folder, repo id or file; the weight of its residuals; the share of the steps it steers from
    and to; its Control Mode, `sdjax.sampling.CONTROL_MODES`; the rest the defaults), as A1111's ControlNet
    extension writes its units, ``ControlNet 0: "Module: none, Model: NAME, Weight: 1, Resize Mode: Just
    Resize, Guidance Start: 0, Guidance End: 1, Pixel Perfect: False, Control Mode: Balanced"``, ``ControlNet
    1: ...`` (with ``Processor Res: 512, Threshold A: 100, Threshold B: 200`` after the Resize Mode for
    Module canny; Module none: the control image given as it is).
    """
    sampler, options = _sampler_name(scheduler, scheduler_options or {})
    fields = [("Steps", steps), ("Sampler", sampler)]
    if (scheduler in ("dpmpp_2m", "dpmpp_2m_sde") and not options.get("use_karras_sigmas")
            and not options.get("use_exponential_sigmas")):
        # A1111 1.9+ reads DPM++ 2M (SDE) without a Schedule type as its default, Karras (Exponential): say
        # it is plain
        fields.append(("Schedule type", "Uniform"))
    for key, value in options.items():
        if key in ("use_karras_sigmas", "use_exponential_sigmas"):
            if value:
                fields.append(("Schedule type", "Karras" if key == "use_karras_sigmas" else "Exponential"))
        elif key == "eta" and scheduler == "ddim":
            fields.append(("Eta DDIM", _number(value)))
        else:
            fields.append((key, str(value).lower() if isinstance(value, bool) else value))
    fields += [("CFG scale", _number(guidance_scale)), ("Seed", seed), ("Size", f"{width}x{height}")]
    if model:
        fields.append(("Model", model_name(model)))
    if vae:
        fields.append(("VAE", model_name(vae)))
    if variation_seed is not None and variation_strength:   # (A1111 writes them where the strength is not 0)
        fields += [("Variation seed", variation_seed), ("Variation seed strength", _number(variation_strength))]
    if seed_resize_from is not None:
        fields.append(("Seed resize from", f"{seed_resize_from[1]}x{seed_resize_from[0]}"))
    if denoising_strength is not None:
        fields.append(("Denoising strength", _number(denoising_strength)))
    if mask_blur is not None:
        fields.append(("Mask blur", _number(mask_blur)))
    if mask_invert:   # (A1111's Inpaint not masked: the mask's black part repainted)
        fields.append(("Mask mode", "Inpaint not masked"))
    if masked_content not in (None, "original"):   # (A1111 writes its other choices)
        from sdjax.sampling import MASKED_CONTENTS
        fields.append(("Masked content", MASKED_CONTENTS[masked_content]))
    if mask_padding is not None:
        fields += [("Inpaint area", "Only masked"), ("Masked area padding", mask_padding)]
    from sdjax.preprocess import RESIZE_MODES, ControlUnit
    from sdjax.sampling import CONTROL_MODES
    for k, unit in enumerate(controlnets):
        if not isinstance(unit, ControlUnit):
            net, weight, start, end, *mode = unit
            unit = ControlUnit(net, None, weight, start, end, *mode)
        processor = (f"Processor Res: {unit.processor_res}, Threshold A: {unit.low_threshold}, Threshold B: "
                     f"{unit.high_threshold}, " if unit.module == "canny" else "")
        fields.append((f"ControlNet {k}", (
            f"Module: {unit.module}, Model: {model_name(unit.controlnet)}, Weight: {_number(unit.scale)}, Resize Mode: "
            f"{RESIZE_MODES[unit.resize]}, {processor}Guidance Start: {_number(unit.start)}, Guidance End: "
            f"{_number(unit.end)}, Pixel Perfect: {unit.pixel_perfect}, Control Mode: {CONTROL_MODES[unit.mode]}")))
    if hires_scale is not None:
        fields.append(("Hires upscale", _number(hires_scale)))
        if hires_steps is not None:
            fields.append(("Hires steps", hires_steps))
        fields.append(("Hires upscaler", HIRES_UPSCALER_NAMES[hires_upscaler]))
        from sdjax.schedulers import carried_options
        second = hires_scheduler or scheduler
        carried = carried_options(second, scheduler, scheduler_options)
        own = {**carried, **(hires_scheduler_options or {})}
        if second != scheduler:
            sampler2, own = _sampler_name(second, own)
            fields.append(("Hires sampler", sampler2))
        if second != scheduler or _schedule_type(own) != _schedule_type(carried):
            fields.append(("Hires schedule type", _schedule_type(own)))
        fields += [(f"Hires {key}", str(value).lower() if isinstance(value, bool) else value)
                   for key, value in own.items() if key not in _SCHEDULE_OPTIONS
                   and (key not in carried or carried[key] != value)]
        if hires_guidance_scale is not None and hires_guidance_scale != guidance_scale:
            fields.append(("Hires CFG Scale", _number(hires_guidance_scale)))
        tags = "".join(f" <lora:{name}:{_number(scale)}>" for name, scale in loras)
        for key, text, first in (("Hires prompt", hires_prompt, prompt),
                                 ("Hires negative prompt", hires_negative_prompt, negative_prompt)):
            if text is not None and text != first:
                fields.append((key, text + tags if key == "Hires prompt" else text))
    if clip_skip != 1:
        fields.append(("Clip skip", clip_skip))
    if prompt_weighting:
        fields.append(("Prompt weighting", "A1111"))
        if emphasis != "original":   # (A1111 writes its setting where it is not its default, Original)
            from sdjax.text import EMPHASIS_MODES
            fields.append(("Emphasis", EMPHASIS_MODES[emphasis]))
    elif any("(" in text or "[" in text or re.search(r"\bBREAK\b", text) for text in (prompt, negative_prompt)):
        fields.append(("Emphasis", "None"))   # (A1111 would weight the brackets, read BREAK: as it writes it then)
    if embeddings:
        fields.append(("TI hashes", ", ".join(f"{name}: {digest}" for name, digest in embeddings)))
    tags = " ".join(f"<lora:{name}:{_number(scale)}>" for name, scale in loras)
    lines = [f"{prompt} {tags}" if prompt and tags else prompt or tags]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(f"{k}: {_quote(v)}" for k, v in fields))
    return "\n".join(lines)


_SCHEDULE_OPTIONS = ("use_karras_sigmas", "use_exponential_sigmas")


def _sampler_name(scheduler: str, options: dict) -> tuple[str, dict]:
    """A1111's sampler name of ``scheduler`` with ``options``, and the options its name does not say
    (DPM++ 2M SDE with ``solver_type=heun`` is A1111's DPM++ 2M SDE Heun)."""
    sampler, options = SAMPLER_NAMES.get(scheduler, scheduler), dict(options)
    if scheduler == "dpmpp_2m_sde" and options.get("solver_type") == "heun":
        sampler, _ = sampler + " Heun", options.pop("solver_type")
    return sampler, options


def _schedule_type(options: dict) -> str:
    """A1111's Schedule type of scheduler ``options``: Karras, Exponential, or Uniform (the plain one)."""
    return ("Karras" if options.get("use_karras_sigmas") else "Exponential" if options.get("use_exponential_sigmas")
            else "Uniform")


def model_name(model: str | os.PathLike) -> str:
    """The model's name as A1111 writes it: the last part of a Hub id, folder or file path, without a
    checkpoint suffix (``stable-diffusion-v1-5``, ``v1-5-pruned-emaonly``): not a local path. A
    train.py export, ``my_style/final`` or ``my_style/final.safetensors``, is named by its run
    (``my_style``): every run's is "final"; a pipeline's VAE folder, ``other-model/vae``, by its
    pipeline (``my_style/final/vae`` by the run), and a diffusers weights file
    (``sd15/vae/diffusion_pytorch_model.safetensors``) as its folder. A local path that exists is resolved first (``.`` is the folder's own name)."""
    text = str(model).split("?", 1)[0]
    if not text.startswith(("http://", "https://")) and text and os.path.exists(text):
        text = str(Path(text).resolve())
    parts = [p for p in re.split(r"[/\\]", text) if p not in ("", ".", "..")]
    if not parts:
        return str(model)
    stem, is_file = parts[-1], False
    for suffix in (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".msgpack"):
        if stem.endswith(suffix):
            stem, is_file = stem.removesuffix(suffix), True
            break
    if is_file and stem.startswith(("diffusion_pytorch_model", "diffusion_flax_model")) and len(parts) > 1:
        parts, stem, is_file = parts[:-1], parts[-2], False   # named as the model folder holding it
    while len(parts) > 1 and (stem == "final" or (stem == "vae" and not is_file)):   # an export; a pipeline's vae/
        parts, stem, is_file = parts[:-1], parts[-2], False   # (an export's vae/: its run)
    return stem or str(model)


def _quote(value) -> str:
    """A settings value as A1111 writes it: as is, or JSON-quoted where a comma, colon or newline in
    it would break the ``key: value, ...`` line."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


_FIELD = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')   # key: value, or key: "a, b"


def parse_a1111_parameters(text: str) -> dict[str, str]:
    """The inverse of :func:`a1111_parameters` for its own output (prompt, negative prompt and the
    ``key: value`` fields, values as strings). Handy for tests and for re-running an image's settings.

    As A1111 reads it: the last line holds the settings (whitespace after it dropped; a last line of fewer
    than 3 ``key: value`` fields is the prompt's, with no settings); the lines before it are the prompt, up
    to a line starting ``Negative prompt: ``, and the negative prompt after it (both may span lines)."""
    lines = text.rstrip().split("\n")
    *text_lines, settings = lines
    if len(_FIELD.findall(settings)) < 3:
        text_lines, settings = lines, ""
    negative_at = next((i for i, line in enumerate(text_lines) if line.startswith("Negative prompt: ")), None)
    if negative_at is None:
        out = {"prompt": "\n".join(text_lines), "negative_prompt": ""}
    else:
        negative = "\n".join(text_lines[negative_at:])[len("Negative prompt: "):]
        out = {"prompt": "\n".join(text_lines[:negative_at]), "negative_prompt": negative}
    for key, value in _FIELD.findall(settings):
        out[key.strip()] = _unquote(value)
    return out


def _unquote(value: str) -> str:
    """A settings value as A1111's ``quote`` wrote it (JSON) or as is; a quoted one that is no JSON (a
    hand-edited Windows path ``"C:\\x"``, a quote cut short) as the text inside its quotes."""
    if value.startswith('"'):
        try:
            return json.loads(value)
        except ValueError:
            return value.strip().strip('"')
    return value.strip()


# ----------------------------------------------------------------------------- writing
def as_pil(image) -> Image.Image:
    """A PIL image from a PIL image, a float [H, W, 3] (or [H, W]: grayscale) array in [0, 1], or a uint8 array
    (floats rounded to 8 bits, as diffusers' ``numpy_to_pil``)."""
    if isinstance(image, Image.Image):
        return image
    array = np.asarray(image)
    if array.dtype != np.uint8:
        array = (array.astype(np.float32) * 255).round().clip(0, 255).astype(np.uint8)
    return Image.fromarray(array)


def image_batch(images, name: str = "init_images") -> np.ndarray:
    """Images as float32 [B, H, W, 3] in [0, 1]: a PIL image (any mode, taken as RGB), a list of them,
    or an array [H, W, 3] or [B, H, W, 3] of uint8 pixels or floats in [0, 1] (NHWC). A ValueError or
    TypeError naming ``name`` and what is wrong otherwise (an NCHW array, floats outside [0, 1], ...)."""
    if isinstance(images, Image.Image):
        return np.asarray(images.convert("RGB"), np.float32)[None] / 255
    if isinstance(images, (list, tuple)):
        return _stacked(images, name, image_batch, "images", "[height, width, 3]")
    array = np.asarray(images)
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[-1] != 3:
        hint = " (sdjax is NHWC: channels last)" if array.ndim == 4 and array.shape[1] == 3 else ""
        raise ValueError(f"{name} has shape {array.shape}; expected [batch, height, width, 3] or [height, width, 3] "
                         f"RGB{hint}")
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255
    # (ml_dtypes' bfloat16, a bf16 pipeline's or JAX's, is no np.floating)
    if not (np.issubdtype(array.dtype, np.floating) or array.dtype.name == "bfloat16"):
        raise TypeError(f"{name} has dtype {array.dtype}; expected uint8 pixels or floats in [0, 1]")
    array = array.astype(np.float32)
    if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
        raise ValueError(f"{name}: float images must be in [0, 1], got values in {array.min():g}..{array.max():g} "
                         "(uint8 pixels: pass them as uint8)")
    return array


def _stacked(items, name: str, read, kind: str, shape: str) -> np.ndarray:
    """A list of single images (or masks) read by ``read`` (`image_batch`, `mask_batch`) as one batch,
    each named in its errors (``name[i]``); an empty list or sizes that differ are errors too."""
    if not items:
        raise ValueError(f"{name} is empty")
    arrays = []
    for i, item in enumerate(items):
        one = read(item, f"{name}[{i}]")
        if one.shape[0] != 1:
            raise ValueError(f"{name}[{i}] has shape {one.shape}: a list holds single {kind} {shape}")
        arrays.append(one[0])
    sizes = sorted({a.shape for a in arrays})
    if len(sizes) > 1:
        raise ValueError(f"{name}: the {kind} differ in size ({', '.join(f'{w}x{h}' for h, w, _ in sizes)}): "
                         "resize them to one size")
    return np.stack(arrays)


def mask_batch(masks, name: str = "mask_images") -> np.ndarray:
    """Inpainting masks as float32 [B, H, W, 1] of 0 (keep) and 1 (repaint), binarized at 0.5 as
    diffusers' inpainting pipeline does: a PIL image (any mode, taken as grayscale: white repaints), a
    list of them, or an array [H, W], [H, W, 1], [B, H, W] or [B, H, W, 1] of bools, uint8 pixels or
    floats in [0, 1]. A ValueError or TypeError naming ``name`` and what is wrong otherwise."""
    if isinstance(masks, Image.Image):
        array = np.asarray(masks.convert("L"), np.float32)[None, :, :, None] / 255
    elif isinstance(masks, (list, tuple)):
        return _stacked(masks, name, mask_batch, "masks", "[height, width]")
    else:
        array = np.asarray(masks)
        if array.ndim in (3, 4) and array.shape[-1] in (3, 4):   # (no mask is 3 or 4 pixels wide)
            raise ValueError(f"{name} has shape {array.shape}: colour pixels (RGB/RGBA); a mask has one value a "
                             "pixel: give one channel (mask[..., 0]) or a PIL image (taken as grayscale)")
        if array.size == 0:
            raise ValueError(f"{name} has shape {array.shape}: no pixels")
        if array.ndim == 3 and array.shape[-1] != 1:
            array = array[..., None]   # [B, H, W]
        if array.ndim == 2 or array.ndim == 3:
            array = array[None] if array.ndim == 3 else array[None, :, :, None]
        if array.ndim != 4 or array.shape[-1] != 1:
            raise ValueError(f"{name} has shape {array.shape}; expected a mask [height, width] or [batch, height, "
                             "width] (or with a last axis of 1): one value a pixel, white or 1 where to repaint")
        if array.dtype == np.bool_:
            array = array.astype(np.float32)
        elif array.dtype == np.uint8:
            array = array.astype(np.float32) / 255
        elif np.issubdtype(array.dtype, np.floating) or array.dtype.name == "bfloat16":
            array = array.astype(np.float32)
            if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
                raise ValueError(f"{name}: float masks must be in [0, 1], got values in {array.min():g}.."
                                 f"{array.max():g} (uint8 pixels: pass them as uint8)")
        else:
            raise TypeError(f"{name} has dtype {array.dtype}; expected bools, uint8 pixels or floats in [0, 1]")
    return (array >= 0.5).astype(np.float32)


def blur_mask(masks_BHW1, blur: float) -> np.ndarray:
    """AUTOMATIC1111's "Mask blur": masks [B, H, W, 1] in [0, 1] as 8-bit masks blurred by a Gaussian of
    standard deviation ``blur`` pixels, across then down, each pass over 2 * int(2.5 * blur + 0.5) + 1 pixels
    with mirrored edges (``gfedcb|abcdefgh|gfedcba``): OpenCV's ``GaussianBlur``, called as A1111 calls it.
    float32, of 1/255 steps; 0: the masks as they are."""
    masks = np.asarray(masks_BHW1, np.float32)
    if not blur:
        return masks
    from sdjax.preprocess import _opencv
    cv2 = _opencv()
    size = 2 * int(2.5 * blur + 0.5) + 1
    levels = np.round(masks[..., 0] * 255).astype(np.uint8)
    blurred = [cv2.GaussianBlur(cv2.GaussianBlur(mask, (size, 1), blur), (1, size), blur) for mask in levels]
    return (np.stack(blurred)[..., None] / 255).astype(np.float32)


def fill_masked(picture: Image.Image, mask: Image.Image) -> Image.Image:
    """AUTOMATIC1111's inpainting "Masked content: fill": ``picture`` with the part ``mask`` marks (white;
    grays partly) painted over by the colours around it, as A1111 makes it: the kept part (the mask's
    inverse as its alpha) blurred at radii 256, 64, 16, 4, 2 and 0 pixels, the blurs laid one over the
    other (1, 1, 2, 4, 2 and 1 times), so each masked pixel takes the colour of the nearest kept ones and
    the kept part stays as it is. An RGB image."""
    kept = Image.new("RGBa", picture.size)   # (premultiplied: a blur averages the kept colours alone)
    kept.paste(picture.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    out = Image.new("RGBA", picture.size)
    for radius, times in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        layer = kept.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(times):
            out.alpha_composite(layer)
    return out.convert("RGB")


def mask_crop_region(mask_HW, width: int, height: int, padding: int) -> tuple[int, int, int, int]:
    """The box (x1, y1, x2, y2) of a picture that "only masked" inpainting repaints (AUTOMATIC1111's
    Inpaint area "Only masked", diffusers' ``padding_mask_crop``), as diffusers' ``get_crop_region``
    finds it: the bounding box of the mask's non-zero pixels, ``padding`` pixels wider on each side
    (within the picture), then grown about its centre to the aspect of the ``width`` x ``height`` it is
    generated at, and moved back inside the picture where it crosses an edge. ``mask_HW``: [H, W]."""
    mask = np.asarray(mask_HW)
    H, W = mask.shape
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        raise ValueError("the mask is black everywhere: nothing to repaint, no region to crop")
    x1, y1 = max(int(cols[0]) - padding, 0), max(int(rows[0]) - padding, 0)
    x2, y2 = min(int(cols[-1]) + 1 + padding, W), min(int(rows[-1]) + 1 + padding, H)

    def grow(lo, hi, size, want):   # [lo, hi) grown to ``want`` (a float) about its centre, within [0, size]
        diff = int(want - (hi - lo))
        lo, hi = lo - diff // 2, hi + diff - diff // 2
        if hi >= size:
            lo, hi = lo - (hi - size), size
        if lo < 0:
            lo, hi = 0, hi - lo
        return lo, min(hi, size)
    if (x2 - x1) / (y2 - y1) > width / height:
        y1, y2 = grow(y1, y2, H, (x2 - x1) / (width / height))
    else:
        x1, x2 = grow(x1, x2, W, (y2 - y1) * (width / height))
    return x1, y1, x2, y2


def resize_to_fill(image: Image.Image, width: int, height: int) -> Image.Image:
    """``image`` resized (Lanczos) to fit ``width`` x ``height`` with its aspect kept, centred, and the
    strips left over filled with its edge rows (or columns) stretched: diffusers' ``resize_mode="fill"``,
    with which its "only masked" inpainting resizes the crop. Returns an RGB image."""
    ratio, own = width / height, image.width / image.height
    w = width if ratio < own else image.width * height // image.height
    h = height if ratio >= own else image.height * width // image.width
    resized = image.resize((w, h), Image.Resampling.LANCZOS)
    out = Image.new("RGB", (width, height))
    out.paste(resized, box=(width // 2 - w // 2, height // 2 - h // 2))
    if ratio < own and (fill := height // 2 - h // 2) > 0:   # (the edge row, stretched over the strip)
        out.paste(resized.resize((width, fill), box=(0, 0, width, 0)), box=(0, 0))
        out.paste(resized.resize((width, fill), box=(0, h, width, h)), box=(0, fill + h))
    elif ratio > own and (fill := width // 2 - w // 2) > 0:
        out.paste(resized.resize((fill, height), box=(0, 0, 0, height)), box=(0, 0))
        out.paste(resized.resize((fill, height), box=(w, 0, w, height)), box=(fill + w, 0))
    return out


def paste_into(picture: Image.Image, mask: Image.Image, image: Image.Image, region) -> Image.Image:
    """An "only masked" inpainting's result: ``image`` (made from the crop at ``region`` of ``picture``)
    resized to the region (its aspect kept, centred and cut to it) and put there, then ``picture`` laid
    over it where ``mask`` is black, as diffusers' ``apply_overlay`` does; an RGB image of the picture's
    size."""
    x1, y1, x2, y2 = region
    w, h = x2 - x1, y2 - y1
    ratio, own = w / h, image.width / image.height   # (diffusers' resize_mode="crop")
    sw = w if ratio > own else image.width * h // image.height
    sh = h if ratio <= own else image.height * w // image.width
    fitted = Image.new("RGB", (w, h))
    fitted.paste(image.resize((sw, sh), Image.Resampling.LANCZOS), box=(w // 2 - sw // 2, h // 2 - sh // 2))
    base = Image.new("RGBA", picture.size)
    base.paste(fitted, (x1, y1))
    kept = Image.new("RGBa", picture.size)
    kept.paste(picture.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    out = base.convert("RGB").convert("RGBA")
    out.alpha_composite(kept.convert("RGBA"))
    return out.convert("RGB")


def umask() -> int:
    """The process's umask, read without changing it where Linux shows it (``os.umask`` can only
    read it by setting one, which another thread creating a file at that moment would get)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def error_naming(error: Exception, path: Path) -> Exception:
    """A write's error as one that names the file: a full disk is ``OSError(28, 'No space left on
    device')`` from Python's writes, and a ``SafetensorError`` carrying "(os error 28)" from the
    safetensors writer; both become an OSError naming ``path``. Other errors stay as they are."""
    code = error.errno if isinstance(error, OSError) else None
    if code is None and (found := re.search(r"\(os error (\d+)\)", str(error))):
        code = int(found[1])
    if code is None or (isinstance(error, OSError) and error.filename is not None):
        return error
    return OSError(code, f"{os.strerror(code)} (writing {path})")


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call ``write(temp_path)`` for a temp file next to ``path``, then rename it into place, so a
    crash or an error never leaves a partial file under the final name. The file gets the usual
    permissions (0666 less the umask), whatever ``write`` created it with: safetensors creates
    0600 files, weights others on the machine (a web UI's user) could not read."""
    return atomic_write_all([(path, write)])[0]


def atomic_write_all(files: Sequence[tuple[str | os.PathLike, Callable[[Path], object]]]) -> list[Path]:
    """`atomic_write` for files that belong together (a model's weights and its config.json): all
    are written to temp files first and renamed into place only when every write succeeded, so a
    failed write (a full disk) leaves the old set as it was, not new weights beside an old config."""
    done: list[tuple[Path, Path]] = []
    try:
        for path, write in files:
            path = Path(path)
            done.append((path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp"), path))
            try:
                write(done[-1][0])
            except Exception as e:
                raise error_naming(e, path) from e
            os.chmod(done[-1][0], 0o666 & ~umask())
        for tmp, path in done:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in done:
            tmp.unlink(missing_ok=True)
        raise
    return [path for _, path in done]


def save_png(image, path: str | os.PathLike, parameters: str | None = None) -> Path:
    """Write ``image`` as a PNG atomically, with ``parameters`` in the ``parameters`` text chunk."""
    info = None
    if parameters is not None:
        info = PngInfo()
        info.add_text("parameters", parameters)
    pil = as_pil(image)
    return atomic_write(path, lambda tmp: pil.save(tmp, format="PNG", pnginfo=info))


def read_png_parameters(path: str | os.PathLike) -> str | None:
    """The ``parameters`` text chunk of a PNG (None if absent, or not a PNG: a JPEG has no text chunks)."""
    with Image.open(path) as im:
        im.load()
        return getattr(im, "text", {}).get("parameters")


# EXIF's UserComment (in the Exif IFD) starts with 8 bytes naming its character code (EXIF 2.3, table 9)
_EXIF_IFD, _USER_COMMENT = 0x8769, 0x9286
_UNICODE_CODE, _JIS_CODE = b"UNICODE\0", b"JIS\0\0\0\0\0"


def read_parameters(path: str | os.PathLike) -> str | None:
    """The generation settings an image holds, as AUTOMATIC1111 stores them: a PNG's ``parameters`` text
    chunk, else (A1111's JPEG, WebP and AVIF files) the EXIF UserComment; None where it has neither."""
    with Image.open(path) as im:
        im.load()
        text = getattr(im, "text", {}).get("parameters")
        comment = im.getexif().get_ifd(_EXIF_IFD).get(_USER_COMMENT) if text is None else None
    if text is not None or not comment:
        return text
    if isinstance(comment, str):   # (a comment written as ASCII type, against the standard)
        return comment.rstrip("\0") or None
    code, body = comment[:8], comment[8:]
    if code == _UNICODE_CODE:
        # UTF-16 of either byte order: A1111 (piexif) writes big-endian, some tools little-endian. Settings
        # text is mostly ASCII, whose high byte is 0: the order whose high bytes hold more zeros is the one.
        high_first = body[0::2].count(0) >= body[1::2].count(0)
        text = body.decode("utf-16-be" if high_first else "utf-16-le", errors="replace")
    elif code == _JIS_CODE:
        text = body.decode("shift_jis", errors="replace")
    else:   # ASCII, undefined (8 zero bytes), or no code at all: A1111 then reads the bytes as UTF-8
        text = (body if code in (b"ASCII\0\0\0", bytes(8)) else comment).decode("utf-8", errors="replace")
    return text.rstrip("\0") or None


# ----------------------------------------------------------------------------- layout
GAP = 4              # pixels between tiles and around the sheet
_LABEL_PADDING = 2   # pixels above and below a label's text


def _font():
    return ImageFont.load_default()


def label_height() -> int:
    """Height in pixels of the label band under each tile in :func:`image_strip`."""
    left, top, right, bottom = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), "Step 0 t=999", font=_font())
    return bottom + 2 * _LABEL_PADDING


def image_strip(images, labels: Sequence[str] | None = None, *, columns: int | None = None,
                background=(255, 255, 255), text_color=(0, 0, 0)) -> Image.Image:
    """Lay out images as one strip (default) or a grid of ``columns`` columns, each with an optional
    small text label underneath (PIL's default font), e.g. ``"step 10 t=521"`` or ``"t=500"``.

    ``images``: a list (or array [N, H, W, 3]) of float [H, W, 3] images in [0, 1], uint8 arrays or
    PIL images, all the same size. Each cell is ``C = max(W, widest label + 4)`` wide (images and
    labels centred in it) and ``H + L`` high, ``L`` being :func:`label_height` with labels and 0
    without; the sheet is ``columns * C + (columns + 1) * GAP`` by ``rows * (H + L) + (rows + 1) * GAP``
    with rows = ceil(N / columns).
    """
    tiles = [as_pil(im).convert("RGB") for im in images]
    if not tiles:
        raise ValueError("image_strip needs at least one image")
    size = tiles[0].size
    if any(t.size != size for t in tiles):
        raise ValueError(f"all images must have the same size; got {sorted({t.size for t in tiles})}")
    if labels is not None and len(labels) != len(tiles):
        raise ValueError(f"{len(labels)} labels for {len(tiles)} images")
    columns = len(tiles) if columns is None else max(1, min(int(columns), len(tiles)))
    rows = math.ceil(len(tiles) / columns)
    w, h = size
    font = _font()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_widths = [measure.textlength(str(t), font=font) for t in labels] if labels is not None else [0]
    cell_w = max(w, math.ceil(max(text_widths)) + 2 * _LABEL_PADDING if labels is not None else 0)
    band = label_height() if labels is not None else 0
    sheet = Image.new("RGB", (columns * cell_w + (columns + 1) * GAP, rows * (h + band) + (rows + 1) * GAP),
                      background)
    draw = ImageDraw.Draw(sheet)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, columns)
        x, y = GAP + c * (cell_w + GAP), GAP + r * (h + band + GAP)
        sheet.paste(tile, (x + (cell_w - w) // 2, y))
        if labels is not None:
            draw.text((x + (cell_w - text_widths[i]) / 2, y + h + _LABEL_PADDING), str(labels[i]),
                      fill=text_color, font=font)
    return sheet


def image_grid(images, columns: int | None = None) -> Image.Image:
    """A near-square grid of same-size images without labels (``columns`` default ceil(sqrt(N)))."""
    n = len(images)
    return image_strip(images, None, columns=columns or math.ceil(math.sqrt(n)))


def save_gif(frames, path: str | os.PathLike, *, duration_ms: int | Sequence[int] = 400,
             hold_last_ms: int | None = 1200, loop: int = 0) -> Path:
    """Write ``frames`` (float [H, W, 3] arrays in [0, 1], uint8 arrays or PIL images) as an animated
    GIF, atomically. ``duration_ms``: per frame (one value or one per frame); ``hold_last_ms``
    keeps the last frame up longer when ``duration_ms`` is one value (a list says it all itself);
    ``loop=0`` loops forever.

    Note that GIF writers (PIL included) merge consecutive identical frames into one.
    """
    pil = [as_pil(f).convert("RGB") for f in frames]
    if not pil:
        raise ValueError("save_gif needs at least one frame")
    durations = [int(duration_ms)] * len(pil) if np.ndim(duration_ms) == 0 else [int(d) for d in duration_ms]
    if len(durations) != len(pil):
        raise ValueError(f"{len(durations)} durations for {len(pil)} frames")
    if hold_last_ms is not None and np.ndim(duration_ms) == 0:
        durations[-1] = int(hold_last_ms)
    return atomic_write(path, lambda tmp: pil[0].save(tmp, format="GIF", save_all=True, append_images=pil[1:],
                                                      duration=durations, loop=loop))
