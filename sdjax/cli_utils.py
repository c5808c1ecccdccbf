"""The library side of ``sample.py``: input checking, YAML presets, the compilation cache, and the
loop that turns (prompt, seed) jobs into PNG files.

Everything that can be wrong with a request (sizes, scheduler, seeds, prompts file, config file) is
checked by :func:`validate_request` before the model is loaded, and raises :class:`UsageError` with
a one-line message; the script prints it and exits with status 2.
"""
from __future__ import annotations

import argparse
import collections
import collections.abc
import concurrent.futures
import dataclasses
import math
import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from sdjax.images import (a1111_parameters, as_pil, image_grid, image_file_name, image_strip, model_name,
                          reserve_indices, save_gif, save_png)
from sdjax.models.layers import attention_setting_problem
from sdjax.pipeline import (DEFAULT_MODEL, HIRES_STRENGTH, HIRES_UPSCALERS, MAX_SEED, HiresFix,  # noqa: F401
                            model_options_problem)                  # (DEFAULT_MODEL, MAX_SEED: for sample.py)
from sdjax.preprocess import (CANNY_HIGH, CANNY_LOW, CANNY_RANGE, PREPROCESSORS, PROCESSOR_RES, PROCESSOR_RES_RANGE,
                              PREPROCESSOR_ALIASES, RESIZE_MODE_ALIASES, RESIZE_MODES, ControlUnit, load_picture)
from sdjax.sampling import CONTROL_MODES, DEFAULT_STRENGTH, MASKED_CONTENTS
from sdjax.schedulers import SCHEDULERS, resolve_scheduler_config
from sdjax.text import EMPHASIS_MODES
from sdjax.weights import DTYPE_NAMES

DTYPES = ("float32", "bfloat16", "float16")
# The short names train.py and the loaders take too (fp32, bf16, fp16), from the loaders' own table.
DTYPE_ALIASES = {name: np.dtype(t).name for name, t in DTYPE_NAMES.items() if name != np.dtype(t).name}
# The ControlNet settings that take one value for every ControlNet or one each (lists in a SampleRequest).
# A ControlNet unit's settings (each one for every ControlNet, or a list of one each): SampleRequest's field ->
# the `ControlUnit` field it sets
CONTROLNET_NUMBERS = ("controlnet_scale", "controlnet_start", "controlnet_end")
CONTROLNET_INTEGERS = ("controlnet_processor_res", "controlnet_canny_low", "controlnet_canny_high")
CONTROLNET_CHOICES = {"controlnet_mode": CONTROL_MODES, "controlnet_resize": RESIZE_MODES,
                      "controlnet_module": PREPROCESSORS}
CONTROLNET_SETTINGS = dict(zip((*CONTROLNET_NUMBERS, *CONTROLNET_CHOICES, *CONTROLNET_INTEGERS,
                                "controlnet_pixel_perfect"),
                               ("scale", "start", "end", "mode", "resize", "module", "processor_res", "low_threshold",
                                "high_threshold", "pixel_perfect")))


class UsageError(ValueError):
    """Bad input to the command line tool: the message is shown to the user as is. ``setting``
    (a SampleRequest field) and ``reason`` (the message without the flag), where one setting is at
    fault, let sample.py name a preset's key instead of a flag the user did not type."""

    def __init__(self, message: str, *, setting: str | None = None, reason: str | None = None):
        super().__init__(message)
        self.setting, self.reason = setting, reason


def _bad_setting(setting: str, value, reason: str, message: str | None = None) -> UsageError:
    """``--height 30: must be ...`` (or ``message``), for `setting`."""
    return UsageError(message or f"--{setting.replace('_', '-')} {value}: {reason}", setting=setting, reason=reason)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a preempted VM, a job scheduler's stop or time limit, ``kill``), raised where the
    tools take it as Ctrl-C: the files written so far are whole, and the exit status is 143."""


def raise_terminated(signum, frame):
    """A SIGTERM handler that stops the program as Ctrl-C does, as `Terminated`."""
    raise Terminated


_LAST_INTERRUPTION: list[BaseException] = []


def interruption(error: KeyboardInterrupt) -> tuple[str, int]:
    """(what stopped the program, its exit status): SIGTERM 143, Ctrl-C 130.

    Also keeps ``error`` (so its traceback's frames) alive until `exit_after_interrupt`: freeing
    the frames of an interrupt that landed inside XLA's compiler can segfault (seen when the
    handler's ``except ... as e`` block ended, under load: 4 of 8 runs on a 2-core AMD EPYC)."""
    _LAST_INTERRUPTION[:] = [error]
    return ("terminated (SIGTERM)", 143) if isinstance(error, Terminated) else ("interrupted", 130)


def exit_after_interrupt(code: int) -> None:
    """Leave with ``code``, skipping the interpreter's teardown, after Ctrl-C / SIGTERM has been
    handled (files closed, messages printed): an interrupt that lands inside XLA's compiler leaves
    its threads in a state that crashes the teardown (a segfault, exit status 139, with jaxlib 0.10)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class OneLineErrorParser(argparse.ArgumentParser):
    """An argument parser whose errors are a `UsageError` (one line on stderr, exit status 2),
    not argparse's usage block; and which takes no abbreviated flags ("--lr" is not
    "--lr-schedule", "--prompt TEXT" not "--prompts-file TEXT")."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message):
        raise UsageError(f"{message} (see --help)")


class ReplacingAppend(argparse.Action):
    """A repeatable flag (a list, as ``action="append"``) whose first use on the command line
    replaces its default (a preset's or an image's list) instead of adding to it."""

    def __call__(self, parser, namespace, values, option_string=None):
        items = getattr(namespace, self.dest, None)
        setattr(namespace, self.dest, [*([] if items is self.default or items is None else items), values])


def show_warnings_as_lines(prog: str) -> None:
    """Print Python warnings as one line, ``prog: warning: message``, through ``tqdm.write``: no
    source line, and a progress bar on the terminal is redrawn below the warning, not broken by it."""
    import warnings
    from tqdm import tqdm

    def show(message, category, filename, lineno, file=None, line=None):
        kind = "warning" if category is UserWarning else category.__name__
        tqdm.write(f"{prog}: {kind}: {message}", file=file or sys.stderr)
    warnings.showwarning = show


# ----------------------------------------------------------------------------- seeds and prompts
def parse_seeds(text: str | int | Sequence[int]) -> list[int]:
    """``"7"`` -> [7]; ``"0-3"`` -> [0, 1, 2, 3] (inclusive); ``"3,7,9"``; mixed ``"0-2,10"``.

    Also accepts an int or a list of ints (as YAML gives them). Seeds must be in [0, 2**32 - 1].
    """
    if isinstance(text, bool):
        raise UsageError(f"bad seeds {text!r}")
    if isinstance(text, int):
        items: list[Any] = [text]
    elif isinstance(text, (list, tuple)):
        items = list(text)
    else:
        items = [p.strip() for p in str(text).split(",")]
    seeds: list[int] = []
    for item in items:
        if isinstance(item, bool):
            raise UsageError(f"bad seed {item!r}")
        if isinstance(item, int):
            seeds.append(item)
            continue
        item = str(item).strip()
        start, sep, stop = item.partition("-")
        if not _DIGITS.fullmatch(start) or (sep and not _DIGITS.fullmatch(stop)):
            raise UsageError(f"bad seeds {str(text)!r}: use a number (7), an inclusive range (0-15) "
                             "or a comma-separated list (3,7,9)")
        if sep:
            lo, hi = int(start), int(stop)
            if hi < lo:
                raise UsageError(f"bad seed range {item!r}: the end is smaller than the start")
            if hi - lo >= 1_000_000:
                raise UsageError(f"seed range {item!r} has more than a million seeds")
            seeds.extend(range(lo, hi + 1))
        else:
            seeds.append(int(start))
    if not seeds:
        raise UsageError("no seeds given")
    bad = [s for s in seeds if not 0 <= s <= MAX_SEED]
    if bad:
        raise UsageError(f"seed {bad[0]} is outside 0..{MAX_SEED}")
    return seeds


_DIGITS = re.compile(r"[0-9]+")  # ASCII only: str.isdigit() accepts '²', which int() then rejects


def read_prompts_file(path: str | os.PathLike) -> list[str]:
    """One prompt per line (UTF-8, with or without a byte-order mark); blank lines are skipped. An
    empty or missing file is an error. A pipe works too (``--prompts-file -`` reads standard
    input; ``<(...)``, ``/dev/stdin``)."""
    stdin = str(path) == "-"
    path = Path(path)
    if not stdin and path.is_dir():
        raise UsageError(f"prompts file {str(path)!r} is a folder; give a text file with one prompt per line")
    if not stdin and not path.exists():
        raise UsageError(f"prompts file {str(path)!r} does not exist")
    try:
        data = sys.stdin.buffer.read() if stdin else path.read_bytes()
        lines = data.decode("utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read prompts file {str(path)!r}: {e}") from e
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise UsageError(f"prompts file {str(path)!r} has no prompts (one per line)")
    return prompts


# ----------------------------------------------------------------------------- YAML presets
# key -> (type check, description). The keys are the CLI flags with "-" written as "_".
CONFIG_KEYS: dict[str, tuple[type | tuple, str]] = {
    "model": (str, "Hub repo id, local pipeline folder or single-file checkpoint"),
    "model_config": (str, "a single-file model's configs and tokenizer: pipeline folder or Hub repo id"),
    "vae": (str, "a VAE in place of the model's: file, VAE folder or Hub repo id"),
    "variant": (str, "weight file variant, e.g. fp16"),
    "ema_weights": (bool, "a single-file training checkpoint's UNet from its EMA copy (model_ema.*)"),
    "negative_prompt": (str, "what to steer away from"),
    "seeds": ((int, str, list), "seed, range 0-15 or list"),
    "variation_seeds": ((int, str, list), "AUTOMATIC1111's variation seeds: seed, range or list"),
    "variation_strength": ((int, float), "how far each image's noise moves toward its variation seed's, in [0, 1]"),
    "seed_resize_from": (str, "AUTOMATIC1111's Seed resize from, WIDTHxHEIGHT: each seed's noise drawn at that size "
                         "and laid over the middle of its noise at the images' size"),
    "steps": (int, "number of denoising steps"),
    "guidance_scale": ((int, float), "classifier-free guidance strength"),
    "scheduler": (str, f"one of {', '.join(SCHEDULERS)}"),
    "scheduler_options": (dict, "scheduler settings, e.g. {use_karras_sigmas: true}"),
    "clip_skip": (int, "condition on the text encoder's N-th layer from the end (A1111's Clip skip; 1: the last)"),
    "emphasis": (str, "with prompt_weighting, AUTOMATIC1111's Emphasis: original, no_norm, ignore or none"),
    "prompt_weighting": (bool, "read AUTOMATIC1111's emphasis syntax in the prompts: (word:1.2), (word), [word]; "
                          "BREAK and long prompts in windows of 75 tokens"),
    "lora": ((str, list), "LoRA files merged into the weights: FILE[:SCALE] (scale default 1), one or a list"),
    "lora_dir": (str, "the folder of the LoRAs that prompts name as A1111's <lora:NAME:SCALE> (NAME.safetensors)"),
    "embedding": ((str, list), "textual inversion embeddings (files) added to the text encoder, one or a list"),
    "embedding_dir": (str, "the folder of the textual inversion embeddings that prompts name by their file names"),
    "init_image": (str, "img2img: the image (PNG, JPEG, ...) every image starts from"),
    "strength": ((int, float), "img2img: the share of the schedule run from the init image, in (0, 1]"),
    "mask": (str, "inpainting, with init_image: the mask image (white: repaint, black: keep)"),
    "mask_padding": (int, "with mask: inpaint only the box around it, this many pixels wider (A1111's Only masked)"),
    "mask_blur": ((int, float), "with mask: blur it this many pixels and lay the picture back over the images "
                  "through it, softening the seam (A1111's Mask blur; 0: none)"),
    "mask_invert": (bool, "with mask: repaint its black part and keep its white one (A1111's Mask mode Inpaint not "
                    "masked)"),
    "masked_content": (str, f"with mask: what the repainted part starts from (A1111's Masked content): "
                       f"{', '.join(MASKED_CONTENTS)} (default original)"),
    "controlnet": ((str, list), "ControlNets that steer the images, one or a list (their residuals add up): diffusers "
                   "ControlNet folders or Hub repo ids, or original-layout files (.pth, .safetensors)"),
    "control_image": ((str, list), "with controlnet: each ControlNet's control image (an edge map, depth map, pose; "
                      "PNG, JPEG, ...), one or a list in controlnet's order"),
    "controlnet_scale": ((int, float, list), "with controlnet: the weight of the residuals (A1111's Control Weight; "
                         "1), one for all or a list of one each"),
    "controlnet_start": ((int, float, list), "with controlnet: the share of the steps each starts at (A1111's "
                         "Guidance Start; 0), one for all or a list"),
    "controlnet_end": ((int, float, list), "with controlnet: the share of the steps each ends at (A1111's Guidance "
                       "End; 1), one for all or a list"),
    "controlnet_mode": ((str, list), f"with controlnet: A1111's Control Mode, {', '.join(CONTROL_MODES)} (default "
                        "balanced), one for all or a list"),
    "controlnet_resize": ((str, list), f"with controlnet: A1111's Resize Mode, {', '.join(RESIZE_MODES)} (default "
                          "just), one for all or a list"),
    "controlnet_module": ((str, list), f"with controlnet: A1111's preprocessor, {', '.join(PREPROCESSORS)} (default "
                          "none: the control image given processed), one for all or a list"),
    "controlnet_processor_res": ((int, list), "with controlnet_module canny: its resolution, the short side's pixels "
                                 "(512), one for all or a list"),
    "controlnet_canny_low": ((int, list), "with controlnet_module canny: its low threshold (100), one for all or a "
                             "list"),
    "controlnet_canny_high": ((int, list), "with controlnet_module canny: its high threshold (200), one for all or a "
                              "list"),
    "controlnet_pixel_perfect": ((bool, list), "with controlnet_module canny: its resolution from the images' size "
                                 "(A1111's Pixel Perfect; false), one for all or a list"),
    "hires_scale": ((int, float), "Hires fix: enlarge each image this many times (> 1) and denoise it again"),
    "hires_steps": (int, "Hires fix: the second pass's steps (default: steps)"),
    "hires_strength": ((int, float), "Hires fix: the share of the second pass's schedule run, in (0, 1] (0.7)"),
    "hires_upscaler": (str, "Hires fix: latent (default) or lanczos"),
    "hires_scheduler": (str, "Hires fix: the second pass's scheduler (A1111's Hires sampler; default: scheduler)"),
    "hires_scheduler_options": (dict, "Hires fix: the second pass's scheduler settings, over the scheduler_options "
                                "its scheduler takes, e.g. {use_karras_sigmas: true}"),
    "hires_guidance_scale": ((int, float), "Hires fix: the second pass's guidance scale (Forge's Hires CFG Scale; "
                             "default: guidance_scale)"),
    "hires_prompt": (str, "Hires fix: the second pass's prompt, for every image (A1111's Hires prompt; default: the "
                     "image's)"),
    "hires_negative_prompt": (str, "Hires fix: the second pass's negative prompt (default: negative_prompt)"),
    "height": (int, "image height in pixels (multiple of 8)"),
    "width": (int, "image width in pixels (multiple of 8)"),
    "dtype": (str, f"one of {', '.join(DTYPES)}"),
    "batch_size": (int, "images per compiled call"),
    "grid": (bool, "also write NNNNN-grid.png"),
    "save_control_images": (bool, "with controlnet: also write each ControlNet's control image, NNNNN-controlK.png"),
    "trajectory": (bool, "also write trajectory strips and GIFs"),
    "trajectory_frames": (int, "frames in each trajectory strip and GIF (at least 3)"),
    "out": (str, "output folder"),
}


def resolve_config_path(name: str | os.PathLike, search_dirs: Sequence[Path] = (), *,
                        other_tools: Mapping[str, Path] | None = None) -> Path:
    """A config path as given, or a preset name (``draft`` / ``draft.yaml``) in ``search_dirs``.

    The error for a name that is neither lists the presets in ``search_dirs`` and, when the name is
    a preset of another script (``other_tools``: script name -> its preset folder), says so."""
    if not str(name).strip():
        raise UsageError("--config is empty: give a preset name or a YAML file")
    path = Path(name).expanduser()
    if path.is_file():
        for tool, folder in (other_tools or {}).items():   # configs/train/style.yaml given to sample.py
            if path.resolve().parent == Path(folder).resolve():
                own = sorted(p.stem for d in search_dirs for p in Path(d).glob("*.yaml"))
                raise UsageError(f"{path} is a preset of {tool}, not of this tool"
                                 + (f" (its presets: {', '.join(own)})" if own else ""))
        return path
    for d in search_dirs:
        for candidate in (Path(d) / str(name), Path(d) / f"{name}.yaml"):
            if candidate.is_file():
                return candidate
    message = f"config file {str(name)!r} does not exist"
    stem = str(name).removesuffix(".yaml")
    for tool, folder in (other_tools or {}).items():
        if Path(stem).name == stem and (Path(folder) / f"{stem}.yaml").is_file():
            message += f"; {stem!r} is a preset of {tool} ({Path(folder) / f'{stem}.yaml'})"
    presets = sorted({p.stem for d in search_dirs for p in Path(d).glob("*.yaml")})
    if presets:
        message += f"; the presets here are {', '.join(presets)}"
    raise UsageError(message)


def read_yaml_mapping(path: str | os.PathLike) -> dict:
    """A YAML config file's top-level mapping ({} for an empty file). A UsageError names the file
    (and the line) for one that cannot be read, is not valid YAML, repeats a key (YAML would keep
    the last silently), or is not a mapping."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        pass

    def mapping(loader, node, deep=False):
        first_line = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":   # <<: *defaults (its keys may be overridden)
                continue
            key = loader.construct_object(key_node, deep=True)
            if not isinstance(key, collections.abc.Hashable):   # construct_mapping says what is wrong
                continue
            if key in first_line:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice (first on line {first_line[key]})", key_node.start_mark)
            first_line[key] = key_node.start_mark.line + 1
        return loader.construct_mapping(node, deep=deep)
    StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)

    path = Path(path)
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=StrictLoader)
    except OSError as e:
        raise UsageError(f"cannot read config file {str(path)!r}: {e}") from e
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or (str(e).splitlines()[0] if str(e) else type(e).__name__)
        raise UsageError(f"{path}{where}: not valid YAML ({problem})") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"{path}: a config must be a mapping of keys to values, got {type(data).__name__}")
    return data


def setting_name(raw_key, seen: dict, path) -> str:
    """A config key as the setting it names (``guidance-scale`` -> ``guidance_scale``); a UsageError
    if an earlier key of the file (in ``seen``) named the same one."""
    key = str(raw_key).replace("-", "_")
    if key in seen:
        raise UsageError(f"{path}: key {raw_key!r} sets {key} a second time")
    return key


def load_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML sampling preset into CLI defaults, checking every key and value.

    Unknown keys and wrong types are errors that name the key and the file. ``seeds`` is returned
    as a string in CLI syntax.
    """
    path = Path(path)
    out: dict[str, Any] = {}
    for raw_key, value in read_yaml_mapping(path).items():
        key = setting_name(raw_key, out, path)
        if key not in CONFIG_KEYS:
            raise UsageError(f"{path}: unknown key {raw_key!r} (known keys: {', '.join(CONFIG_KEYS)})")
        types, _ = CONFIG_KEYS[key]
        if float in (types if isinstance(types, tuple) else (types,)):
            value = _yaml_number(value)
        value = _quoted_number(value, types)
        wrong_bool = isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,))
        if not isinstance(value, types) or wrong_bool:
            raise UsageError(f"{path}: key {raw_key!r} has value {value!r}; expected {_type_name(types)}")
        if key in ("seeds", "variation_seeds"):
            try:
                value = ",".join(str(s) for s in parse_seeds(value)) if not isinstance(value, str) else value
                parse_seeds(value)
            except UsageError as e:
                raise UsageError(f"{path}: key {key!r}: {e}") from e
        if key in ("guidance_scale", "strength", "variation_strength"):
            value = float(value)
        if key in ("lora", "embedding", "controlnet", "control_image", *CONTROLNET_CHOICES):
            value = [value] if isinstance(value, str) else value
            if bad := [v for v in value if not isinstance(v, str)]:
                raise UsageError(f"{path}: key {key!r} has item {bad[0]!r}; expected "
                                 + ("FILE or FILE:SCALE strings" if key == "lora" else "file names"
                                    if key == "embedding" else "strings" if key in CONTROLNET_CHOICES else "paths"))
        if key in (*CONTROLNET_INTEGERS, "controlnet_pixel_perfect"):   # (one for every ControlNet, or a list)
            kind = bool if key == "controlnet_pixel_perfect" else int
            value = [v if kind is bool else _quoted_number(v, int) for v in (value if isinstance(value, list)
                                                                               else [value])]
            if bad := [v for v in value if not isinstance(v, kind) or (kind is int and isinstance(v, bool))]:
                raise UsageError(f"{path}: key {key!r} has item {bad[0]!r}; expected "
                                 + ("true or false" if kind is bool else "whole numbers"))
        if key in CONTROLNET_NUMBERS:   # (one number for every ControlNet, or a list of one each)
            value = [_quoted_number(_yaml_number(v), (int, float)) for v in
                     (value if isinstance(value, list) else [value])]
            if bad := [v for v in value if isinstance(v, bool) or not isinstance(v, (int, float))]:
                raise UsageError(f"{path}: key {key!r} has item {bad[0]!r}; expected numbers")
            value = [float(v) for v in value]
        if key in ("scheduler_options", "hires_scheduler_options"):
            if bad := [k for k in value if not isinstance(k, str)]:
                raise UsageError(f"{path}: key {key!r} has key {bad[0]!r}; expected setting names")
            value = {k: _yaml_number(v) for k, v in value.items()}
        out[key] = value
    return out


def parse_scheduler_options(items: Sequence[str], flag: str = "--scheduler-option") -> dict[str, Any]:
    """``["use_karras_sigmas=true", "eta=0.5"]`` -> ``{"use_karras_sigmas": True, "eta": 0.5}`` (each
    value read as YAML, so true / 1 / 0.5 / text are what they look like; an error names ``flag``)."""
    import yaml
    options = {}
    for item in items:
        key, eq, text = item.partition("=")
        if not eq or not key.strip():
            raise UsageError(f"{flag} {item!r}: expected KEY=VALUE, e.g. use_karras_sigmas=true")
        try:
            value = _yaml_number(yaml.safe_load(text)) if text.strip() else None
        except yaml.YAMLError:
            value = text
        if value is None or isinstance(value, (list, dict)):
            raise UsageError(f"{flag} {item!r}: expected one value (true, a number or a word)")
        options[key.strip()] = value
    return options


def _yaml_number(value):
    """A number YAML 1.1 reads as text (``1e-3``, ``1e1``: an exponent without a dot; ``-inf``,
    ``-Infinity``, as JSON and Python write it) as the number it is meant to be; any other value as
    it is."""
    if isinstance(value, str) and re.fullmatch(r"[-+]?(\d+(\.\d*)?[eE][-+]?\d+|inf|infinity)", value.strip(),
                                               re.IGNORECASE):
        return float(value)
    return value


def _quoted_number(value, types):
    """``steps: '30'`` or ``guidance_scale: "7.5"`` (a number written in quotes) as that number, as
    train.py's presets and every flag read it; any other value as it is."""
    kinds = types if isinstance(types, tuple) else (types,)
    if not isinstance(value, str) or str in kinds:
        return value
    text = value.strip()
    if int in kinds and re.fullmatch(r"[-+]?\d+", text):
        return int(text)
    if float in kinds:
        try:
            return float(text)
        except ValueError:
            pass
    return value


def _type_name(types) -> str:
    types = types if isinstance(types, tuple) else (types,)
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false", list: "a list",
             dict: "a mapping"}
    return " or ".join(names.get(t, t.__name__) for t in types)


# ----------------------------------------------------------------------------- the request
@dataclasses.dataclass
class SampleRequest:
    """Everything ``sample.py`` was asked to do, after parsing."""
    prompts: list[str]
    seeds: list[int]
    negative_prompt: str = ""
    model: str = DEFAULT_MODEL        # Hub repo id, pipeline folder or single-file checkpoint
    model_config: str | None = None   # a single file's configs and tokenizer (default: DEFAULT_MODEL's)
    variant: str | None = None        # e.g. "fp16": diffusion_pytorch_model.fp16.safetensors
    vae: str | None = None            # a VAE in place of the model's own (file, VAE folder or Hub repo id)
    ema_weights: bool = False         # a single file's UNet from its EMA copy (model_ema.*)
    steps: int = 50
    guidance_scale: float = 7.5
    scheduler: str = "pndm"
    scheduler_options: dict = dataclasses.field(default_factory=dict)   # e.g. {"use_karras_sigmas": True}
    clip_skip: int = 1                # A1111's "Clip skip": 1 = the text encoder's last layer, 2 = the penultimate
    prompt_weighting: bool = False    # A1111's emphasis syntax, (word:1.2), read in the prompts
    emphasis: str = "original"        # A1111's Emphasis setting, with prompt_weighting: sdjax.text.EMPHASIS_MODES
    variation_seeds: list[int] = dataclasses.field(default_factory=list)   # A1111's variation seeds
    variation_strength: float = 0.0   # how far each image's noise moves toward its variation seed's (0: none)
    seed_resize_from: str | None = None   # A1111's Seed resize from, "WIDTHxHEIGHT": the seeds' noise's size
    lora: list[str] = dataclasses.field(default_factory=list)   # LoRA files merged into the weights, FILE[:SCALE]
    # per prompt, the LoRAs its A1111 <lora:NAME:SCALE> tags name, where the prompts name different ones (each
    # run of prompts naming the same is made with its own in turn: run_sampling); else empty, and they are in lora
    prompt_loras: list[list[str]] = dataclasses.field(default_factory=list)
    embedding: list[str] = dataclasses.field(default_factory=list)   # textual inversion embedding files
    init_image: str | None = None     # img2img: the image every image starts from
    strength: float | None = None     # img2img: the share of the schedule run (None: DEFAULT_STRENGTH, 1 with a mask)
    mask: str | None = None           # inpainting: the mask of init_image (white: repaint)
    mask_padding: int | None = None   # "only masked" inpainting: the box around the mask, this much wider
    mask_blur: float = 0.0            # inpainting: A1111's Mask blur, pixels (0: none)
    masked_content: str = "original"  # inpainting: A1111's Masked content (sdjax.sampling.MASKED_CONTENTS)
    mask_invert: bool = False         # inpainting: repaint the mask's black part (A1111's Inpaint not masked)
    # ControlNets (folders, Hub repo ids or original-layout files; several: their residuals add up) and one
    # control image each, resized to width x height; their settings, one for all or one each ([]: the default)
    controlnet: list[str] = dataclasses.field(default_factory=list)
    control_image: list[str] = dataclasses.field(default_factory=list)
    controlnet_scale: list[float] = dataclasses.field(default_factory=list)   # the weight of the residuals ([]: 1)
    controlnet_start: list[float] = dataclasses.field(default_factory=list)   # the share of the steps run it starts
    controlnet_end: list[float] = dataclasses.field(default_factory=list)     # at ([]: 0) and ends at ([]: 1)
    controlnet_mode: list[str] = dataclasses.field(default_factory=list)      # A1111's Control Mode ([]: balanced)
    # how each control image is made from its file ([]: ControlUnit's defaults): A1111's Resize Mode (just, crop,
    # fill), Module (none, canny, invert), Processor Res, canny's thresholds and Pixel Perfect
    controlnet_resize: list[str] = dataclasses.field(default_factory=list)
    controlnet_module: list[str] = dataclasses.field(default_factory=list)
    controlnet_processor_res: list[int] = dataclasses.field(default_factory=list)
    controlnet_canny_low: list[int] = dataclasses.field(default_factory=list)
    controlnet_canny_high: list[int] = dataclasses.field(default_factory=list)
    controlnet_pixel_perfect: list[bool] = dataclasses.field(default_factory=list)
    hires_scale: float | None = None  # Hires fix (two passes): the second pass's size over the first's
    hires_steps: int | None = None    # Hires fix: the second pass's steps (None: steps)
    hires_strength: float | None = None   # Hires fix: the second pass's denoising strength (None: 0.7)
    hires_upscaler: str | None = None     # Hires fix: latent (None: latent) or lanczos
    # Hires fix: the second pass's own settings (None: the first pass's): its scheduler, options over the first
    # pass's it takes, guidance scale, prompt (every image's) and negative prompt
    hires_scheduler: str | None = None
    hires_scheduler_options: dict = dataclasses.field(default_factory=dict)
    hires_guidance_scale: float | None = None
    hires_prompt: str | None = None
    hires_negative_prompt: str | None = None
    height: int = 512                 # (sample.py sets the init image's size when not given; here 512 all the same)
    width: int = 512
    dtype: str | None = None          # None: bfloat16 on GPU/TPU, float32 on CPU
    batch_size: int | None = None
    out: str = "outputs"
    grid: bool = False
    save_control_images: bool = False   # write each ControlNet's control image as made (NNNNN-controlK.png)
    trajectory: bool = False
    trajectory_frames: int = 8

    def load_mask(self, width: int, height: int) -> np.ndarray:
        """``mask`` as 8-bit grayscale [height, width] (`load_init_image`), its black and white swapped with
        ``mask_invert``, as A1111 swaps them for Inpaint not masked."""
        mask = load_init_image(self.mask, width, height, "L")
        return 255 - mask if self.mask_invert else mask

    @property
    def seed_resize_hw(self) -> tuple[int, int] | None:
        """``seed_resize_from`` as (height, width), as the pipeline takes it; None where not given."""
        if self.seed_resize_from is None:
            return None
        size = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", str(self.seed_resize_from))
        return None if size is None else (int(size[2]), int(size[1]))

    @property
    def img2img_strength(self) -> float | None:
        """The strength img2img runs at: None without an init image."""
        if self.init_image is None:
            return None
        if self.strength is None:   # (inpainting: the masked part from pure noise, as diffusers' default)
            return 1.0 if self.mask is not None else DEFAULT_STRENGTH
        return float(self.strength)

    @property
    def hires(self):
        """The `sdjax.HiresFix` the run makes its images with, or None (no --hires-scale)."""
        if self.hires_scale is None:
            return None
        return HiresFix(float(self.hires_scale), self.hires_steps,
                        HIRES_STRENGTH if self.hires_strength is None else float(self.hires_strength),
                        self.hires_upscaler or "latent", self.hires_scheduler, self.hires_scheduler_options or None,
                        self.hires_prompt or None, self.hires_negative_prompt or None,   # ("": the first's, as A1111)
                        None if self.hires_guidance_scale is None else float(self.hires_guidance_scale))

    @property
    def control_units(self) -> list[ControlUnit]:
        """Each ControlNet with its control image and settings (A1111's ControlNet units), in
        ``controlnet``'s order: a setting given once is every ControlNet's, one not given the default."""
        settings = [{} for _ in self.controlnet]
        for name, field in CONTROLNET_SETTINGS.items():
            values = list(getattr(self, name))
            for unit, value in zip(settings, values * len(self.controlnet) if len(values) == 1 else values):
                unit[field] = float(value) if name in CONTROLNET_NUMBERS else value
        return [ControlUnit(net, image, **unit) for net, image, unit in zip(self.controlnet, self.control_image,
                                                                            settings)]

    @property
    def variations(self) -> list[int | None]:
        """Each job's variation seed (aligned with `jobs`), or None where there is no variation."""
        if not (self.variation_seeds and self.variation_strength):
            return [None] * len(self.prompts) * len(self.seeds)
        return [v for _ in self.prompts for _ in self.seeds for v in self.variation_seeds]

    @property
    def jobs(self) -> list[tuple[str, int]]:
        """Every prompt with every seed (and every variation seed), prompt-major: [(prompt, seed), ...]."""
        varied = len(self.variation_seeds) if self.variation_strength and self.variation_seeds else 1
        return [(p, s) for p in self.prompts for s in self.seeds for _ in range(varied)]

    def fingerprint(self):
        """A hash of what decides the images and the compiled programs (not the model's path or
        ``out``, which may differ between hosts), as 4 int32 values, for processes to compare."""
        import hashlib
        import json

        import numpy as np
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("model", "model_config", "vae", "out")}
        fields["lora"] = [(Path(file).name, scale) for file, scale in map(parse_lora, self.lora)]   # not the paths
        fields["prompt_loras"] = [[(Path(file).name, scale) for file, scale in map(parse_lora, loras)]
                                  for loras in self.prompt_loras]
        fields["embedding"] = [Path(file).name for file in self.embedding]
        fields["controlnet"] = [model_name(path) for path in self.controlnet]
        digest = lambda file: hashlib.sha256(Path(file).expanduser().read_bytes()).hexdigest()  # noqa: E731
        for name in ("init_image", "mask"):   # the images, wherever each host keeps them
            if getattr(self, name) is not None:
                fields[name] = digest(getattr(self, name))
        fields["control_image"] = [digest(file) for file in self.control_image]
        digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).digest()
        return np.frombuffer(digest[:16], np.int32)


# A1111 fields of the image's own, which sample.py does not repeat (and so does not warn about)
_PNG_FIELDS_IGNORED = {"Model hash", "VAE hash", "Version", "Lora hashes", "TI hashes"}


@dataclasses.dataclass
class PngSettings:
    """What ``--from-png`` read from an image's A1111 ``parameters``: the settings as sample.py flag
    defaults (``flags``, keyed by their dest), the prompt, img2img's strength (a default only for a
    run with ``--init-image``), the LoRAs, embeddings and model the image names, and the fields left unused."""
    flags: dict[str, Any]
    prompt: str
    strength: float | None
    loras: list[tuple[str, float]]
    model: str | None
    vae: str | None
    ignored: list[str]
    embeddings: list[str] = dataclasses.field(default_factory=list)   # A1111's "TI hashes" names
    masked: bool = False   # made by inpainting (a Mask blur, Masked content, Mask mode or Inpaint area)
    controlnets: list[str] = dataclasses.field(default_factory=list)   # its ControlNet units' models (A1111's)
    # each unit's Module that sdjax lacks (its map to be given processed), or None
    other_modules: list[str | None] = dataclasses.field(default_factory=list)


def _float_or_none(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _a1111_sampler(sampler: str, schedule: str | None, which: str, bad) -> tuple[str, dict[str, Any]]:
    """The sdjax scheduler and options of an A1111 Sampler and Schedule type (``which``: "" or "Hires "
    for the Hires fix's, whose schedule None is the first pass's and whose Uniform turns a carried one off)."""
    from sdjax.images import SAMPLER_NAMES
    from sdjax.schedulers import option_names
    options: dict[str, Any] = {}
    for suffix, option in ((" Karras", "use_karras_sigmas"), (" Exponential", "use_exponential_sigmas")):
        if sampler.endswith(suffix):   # A1111 before 1.9 named the schedule in the sampler
            sampler, options[option] = sampler[: -len(suffix)], True
    if sampler == "DPM++ 2M SDE Heun":   # its second-order correction the Heun way (sdjax: an option)
        sampler, options["solver_type"] = "DPM++ 2M SDE", "heun"
    by_name = {v: k for k, v in SAMPLER_NAMES.items()}
    if sampler not in by_name:
        raise bad(f"its {which}sampler {sampler!r} has no sdjax scheduler (sdjax has {', '.join(by_name)})")
    name = by_name[sampler]
    # A1111 1.9+ writes a Schedule type always; its "Automatic" is the sampler's default, which is Karras for
    # DPM++ 2M (the old "DPM++ 2M Karras") and Exponential for DPM++ 2M SDE there. Without the field (A1111
    # before 1.9, sample.py before it wrote "Uniform") they are plain; "Uniform" is the plain schedule of
    # every sampler sdjax has.
    if {"use_karras_sigmas", "use_exponential_sigmas"} & set(options):
        schedule = None   # a schedule in the sampler's name wins over the field, as A1111 reads them
    if schedule == "Automatic":
        schedule = {"DPM++ 2M": "Karras", "DPM++ 2M SDE": "Exponential"}.get(sampler, schedule)
    if schedule == "Karras":
        options["use_karras_sigmas"] = True
    elif schedule == "Exponential":
        options["use_exponential_sigmas"] = True
    elif schedule not in (None, "Automatic", "Uniform"):
        raise bad(f"its {which}schedule type {schedule!r} has no sdjax equivalent (sdjax has Karras, and Exponential "
                  "for DPM++ 2M and DPM++ 2M SDE)")
    elif which and schedule is not None:   # (the second pass's plain schedule: over the first pass's)
        options.update({key: False for key in ("use_karras_sigmas", "use_exponential_sigmas")
                        if key in option_names(name)})
    if options.get("use_karras_sigmas") and "use_karras_sigmas" not in option_names(name):   # (A1111: Euler a, Karras)
        raise bad(f"its {which}sampler {sampler!r} with schedule type 'Karras' has no sdjax equivalent (sdjax's "
                  f"{name} has no Karras sigmas)")
    if options.get("use_exponential_sigmas") and name not in ("dpmpp_2m", "dpmpp_2m_sde"):
        raise bad(f"its {which}sampler {sampler!r} with schedule type 'Exponential' has no sdjax equivalent (sdjax "
                  "has Exponential sigmas for DPM++ 2M and DPM++ 2M SDE)")
    return name, options


def settings_from_png(path: str | os.PathLike) -> PngSettings:
    """Read the settings an image was made with from its PNG ``parameters`` chunk, as AUTOMATIC1111 and
    sample.py write them (or the EXIF UserComment of A1111's JPEG, WebP and AVIF images): prompt, negative
    prompt, steps, sampler (and ``Schedule type: Karras``, ``Eta DDIM``, scheduler options under their own
    names), CFG scale, seed (and variation seed, Seed resize from), size, clip skip and prompt weighting
    (on for an AUTOMATIC1111 image, whose syntax A1111 always reads, with its ``Emphasis`` setting as
    ``emphasis``, and for sample.py's that record ``Prompt weighting: A1111``). The prompt's
    extra-network tags are taken out of it: ``<lora:NAME[:SCALE...]>`` (and ``<lyco:...>``) into ``loras``,
    another type into ``ignored``. A Hires fix (``Hires upscale``, ``Hires steps``, ``Hires upscaler``
    Latent or Lanczos, and its ``Denoising strength``, which is no img2img ``strength``; the second pass's
    own ``Hires sampler`` and ``Hires schedule type``, ``Hires prompt``, ``Hires negative prompt``, Forge's
    ``Hires CFG Scale`` and sample.py's ``Hires <option>``) into the hires flags; one with another
    upscaler, or a ``Hires resize`` to a size, into ``ignored``, whole. A1111's
    ControlNet units (``ControlNet 0: "Module: ..., Model: NAME, Weight: 1, Guidance Start: 0, ..."``, ``ControlNet
    1``, ...): their models into ``controlnets`` (the files are not known), and their weights, guidance
    windows, Control Modes, Resize Modes, Modules (canny, invert; another's ControlNet is named with it and
    given Module none, for its processed map), canny's Processor Res and thresholds and Pixel Perfect into the
    ControlNet flags, lists of one a unit; a Control Mode or Resize Mode sdjax lacks (read as Balanced or Just
    Resize), or an Hr Option other than Both, into ``ignored``. A UsageError names the file and the field that
    cannot be read or has no sdjax equivalent (another
    sampler, another schedule type, Karras sigmas for a sampler without them), or says it holds no
    settings."""
    from PIL import UnidentifiedImageError
    from sdjax.images import HIRES_UPSCALER_NAMES, parse_a1111_parameters, read_parameters

    def bad(reason: str) -> UsageError:
        return _bad_setting("from_png", path, reason)
    try:
        text = read_parameters(Path(path).expanduser())
    except FileNotFoundError:
        raise bad("no such file") from None
    except (UnidentifiedImageError, OSError) as e:
        raise bad(f"cannot be read as an image ({e})") from None
    if not text:
        from PIL import Image
        with Image.open(Path(path).expanduser()) as im:
            kind = im.format
        if kind != "PNG":
            raise bad(f"holds no generation settings (a {kind} image without an EXIF UserComment, where "
                      "AUTOMATIC1111 writes them)")
        raise bad("holds no generation settings (no 'parameters' text chunk, as AUTOMATIC1111 and sample.py write)")
    fields = parse_a1111_parameters(text)
    # A1111 (and Forge) write a version and a model hash, which sample.py never writes; its images are
    # weighted, with their Emphasis setting ("None": the brackets are text, windows and editing still read).
    a1111 = "Version" in fields or "Model hash" in fields
    order = list(fields)   # (the options in the image's order, which sample.py writes them in again)
    if not {"Steps", "Sampler", "CFG scale", "Seed", "Size"} & set(fields):
        raise bad("holds no generation settings (its 'parameters' text has no Steps, Sampler, CFG scale, Seed or "
                  "Size)")
    prompt, loras, networks = extra_network_tags(fields.pop("prompt"))
    flags: dict[str, Any] = {"negative_prompt": fields.pop("negative_prompt")}
    flags["scheduler"], options = _a1111_sampler(fields.pop("Sampler", "PLMS"),   # (A1111 always writes one)
                                                 fields.pop("Schedule type", None), "", bad)

    def number(key: str, kind):
        try:
            value = kind(fields.pop(key))
        except ValueError:
            raise bad(f"its {key} is not a number") from None
        return value
    if "Eta DDIM" in fields:   # (a number, as --scheduler-option eta=0.5 gives it: not its text)
        options["eta"] = number("Eta DDIM", float)
    for key, dest, kind in (("Steps", "steps", int), ("CFG scale", "guidance_scale", float),
                            ("Seed", "seeds", int), ("Clip skip", "clip_skip", int),
                            ("Variation seed", "variation_seeds", int),
                            ("Variation seed strength", "variation_strength", float)):
        if key in fields:
            flags[dest] = number(key, kind)
    for dest in ("seeds", "variation_seeds"):
        if dest in flags:
            flags[dest] = str(flags[dest])
    if "Seed resize from" in fields:   # (A1111 writes none for its default, -1x-1)
        size = re.fullmatch(r"(-?\d+)x(-?\d+)", fields.pop("Seed resize from"))
        if size is None:
            raise bad("its Seed resize from is not WIDTHxHEIGHT")
        if min(int(size[1]), int(size[2])) > 0:
            flags["seed_resize_from"] = f"{size[1]}x{size[2]}"
    if "Size" in fields:
        size = re.fullmatch(r"(\d+)x(\d+)", fields.pop("Size"))
        if size is None:
            raise bad("its Size is not WIDTHxHEIGHT")
        flags["width"], flags["height"] = int(size[1]), int(size[2])
    # (txt2img's Hires fix writes a Denoising strength of its own, for its second pass: no img2img's)
    hires = any(key.startswith("Hires") for key in fields)
    weighting = fields.pop("Prompt weighting", None)
    if weighting not in (None, "A1111"):
        raise bad(f"its Prompt weighting {weighting!r} is not one sdjax has (A1111)")
    # A1111's Emphasis setting: its prompt syntax is read (windows, editing, AND) whatever it is, the
    # brackets as it says. A sample.py image records its weighting apart: there None is weighting off.
    emphasis = fields.pop("Emphasis", "Original" if a1111 or weighting else "None")
    modes = {name: mode for mode, name in EMPHASIS_MODES.items()}
    if emphasis not in modes:   # (another UI's: Forge's MeanNorm, ...)
        fields["Emphasis"] = f"{emphasis} (sdjax weights as A1111's Original does)"
    flags["prompt_weighting"] = a1111 or weighting is not None or emphasis != "None"
    flags["emphasis"] = modes.get(emphasis, "original") if flags["prompt_weighting"] else "original"
    strength = number("Denoising strength", float) if "Denoising strength" in fields and not hires else None
    # (A1111's img2img tab writes a Mask blur for every inpainted image; its API only a blur above 0)
    masked = bool({"Mask blur", "Masked content", "Mask mode", "Inpaint area"} & set(fields))
    # A1111's ControlNet extension: a field a unit, "ControlNet 0: "Module: canny, Model: NAME, Weight: 1, ...""
    controlnets, other_modules = [], []
    units = sorted((int(k.split()[1]), k) for k in fields if re.fullmatch(r"ControlNet \d+", k))
    for _, field in units:
        unit = dict(part.split(": ", 1) for part in fields.pop(field).split(", ") if ": " in part)
        name, module = unit.get("Model", "?"), unit.get("Module", "none")
        module, other_module = PREPROCESSOR_ALIASES.get(module, module), None
        if module not in PREPROCESSORS:   # (its map given processed is the same: Module none)
            name, module, other_module = f"{name} (preprocessor {module})", "none", module
        controlnets.append(name)
        other_modules.append(other_module)
        flags.setdefault("controlnet_module", []).append(module)
        # (A1111 reads a unit without a Resize Mode as its default, Crop and Resize; sample.py's wrote Just Resize)
        resize_name = unit.get("Resize Mode", "Crop and Resize" if a1111 else "Just Resize")
        resize = {v: k for k, v in RESIZE_MODES.items()}.get(resize_name, RESIZE_MODE_ALIASES.get(resize_name))
        flags.setdefault("controlnet_resize", []).append(resize or "just")
        canny = module == "canny"   # (the other modules' resolution and thresholds are not canny's)
        for key, dest, default, (low, high) in (
                ("Processor Res", "controlnet_processor_res", PROCESSOR_RES, PROCESSOR_RES_RANGE),
                ("Threshold A", "controlnet_canny_low", CANNY_LOW, CANNY_RANGE),
                ("Threshold B", "controlnet_canny_high", CANNY_HIGH, CANNY_RANGE)):
            value = _float_or_none(unit.get(key, str(default))) if canny else default
            if value is None:
                raise bad(f"its {field} {key} is not a number")
            # (out of range, -1 among them, is the default, as the extension reads it)
            flags.setdefault(dest, []).append(int(value) if low <= value <= high else default)
        flags.setdefault("controlnet_pixel_perfect", []).append(unit.get("Pixel Perfect") == "True")
        for key, dest, default in (("Weight", "controlnet_scale", 1.0), ("Guidance Start", "controlnet_start", 0.0),
                                   ("Guidance End", "controlnet_end", 1.0)):
            if (value := _float_or_none(unit.get(key, str(default)))) is None:
                raise bad(f"its {field} {key} is not a number")
            flags.setdefault(dest, []).append(value)
        mode = {name: key for key, name in CONTROL_MODES.items()}.get(unit.get("Control Mode", "Balanced"))
        flags.setdefault("controlnet_mode", []).append(mode or "balanced")
        # (sdjax has its Control Modes, and with the Hires fix A1111's default Hr Option, Both passes)
        other = [] if mode else [f"Control Mode {unit['Control Mode']} (sdjax: balanced)"]
        if resize is None:
            other.append(f"Resize Mode {resize_name} (sdjax: Just Resize)")
        if unit.get("Hr Option", "Both") != "Both":
            other.append(f"Hr Option {unit['Hr Option']} (sdjax: Both)")
        if other:
            fields[field] = ", ".join(other)
    if fields.get("Inpaint area") == "Only masked":   # (A1111's padding default: 32)
        del fields["Inpaint area"]
        flags["mask_padding"] = number("Masked area padding", int) if "Masked area padding" in fields else 32
    if "Mask blur" in fields:
        flags["mask_blur"] = number("Mask blur", float)
    mode = fields.pop("Mask mode", "Inpaint masked")   # (A1111's, where it is Inpaint not masked)
    if mode in ("Inpaint masked", "Inpaint not masked"):
        flags["mask_invert"] = mode == "Inpaint not masked"
    else:
        fields["Mask mode"] = f"{mode} (sdjax: Inpaint masked)"
    content = fields.pop("Masked content", "original")   # (A1111 writes it for fill, latent noise and nothing)
    if content in MASKED_CONTENTS.values():
        flags["masked_content"] = {v: k for k, v in MASKED_CONTENTS.items()}[content]
    else:
        fields["Masked content"] = f"{content} (sdjax: original)"
    hires_left_out = None
    if hires:   # A1111 writes no Hires upscaler for its default, Latent
        upscaler, by_name = fields.get("Hires upscaler", "Latent"), {v: k for k, v in HIRES_UPSCALER_NAMES.items()}
        if "Hires upscale" in fields and upscaler in by_name:
            flags["hires_scale"] = number("Hires upscale", float)
            if "Hires steps" in fields and (steps := number("Hires steps", int)) != 0:   # (A1111's 0: the Steps)
                flags["hires_steps"] = steps
            if "Denoising strength" in fields:
                flags["hires_strength"] = number("Denoising strength", float)
            flags["hires_upscaler"] = by_name[fields.pop("Hires upscaler", "Latent")]
            # the second pass's own settings (A1111 1.6+ writes them where they are not the first pass's)
            same = ("Use same sampler", "Use same scheduler")
            sampler2, schedule2 = (fields.pop(key, None) for key in ("Hires sampler", "Hires schedule type"))
            sampler2, schedule2 = (None if text in same else text for text in (sampler2, schedule2))
            own: dict[str, Any] = {}
            if sampler2 is not None or schedule2 is not None:
                from sdjax.images import SAMPLER_NAMES
                name2, own = _a1111_sampler(sampler2 or SAMPLER_NAMES[flags["scheduler"]], schedule2, "Hires ", bad)
                if name2 != flags["scheduler"]:
                    flags["hires_scheduler"] = name2
            from sdjax.schedulers import option_names
            takes = option_names(flags.get("hires_scheduler", flags["scheduler"]))
            for key in [k for k in fields if k.startswith("Hires ") and k[6:] in takes]:   # (sample.py's: its own)
                own.update(parse_scheduler_options([f"{key[6:]}={fields.pop(key)}"]))
            if own:
                flags["hires_scheduler_options"] = own
            if "Hires CFG Scale" in fields:   # (Forge writes it always: the call's where they are the same)
                if (scale := number("Hires CFG Scale", float)) != flags.get("guidance_scale"):
                    flags["hires_guidance_scale"] = scale
            for key, dest in (("Hires prompt", "hires_prompt"), ("Hires negative prompt", "hires_negative_prompt")):
                if key in fields:
                    flags[dest] = fields.pop(key)
        else:
            why = (f"its Hires upscaler {upscaler!r} has no sdjax equivalent (sdjax has "
                   f"{', '.join(HIRES_UPSCALER_NAMES.values())})" if upscaler not in by_name
                   else "a Hires resize to a size: sdjax takes a factor, Hires upscale")
            hires_left_out = f"the Hires fix ({why}: this run makes the first pass only, at Size)"
    model, vae = fields.pop("Model", None), fields.pop("VAE", None)
    valid = set(resolve_scheduler_config(flags["scheduler"], {}))
    for key in [k for k in fields if k in valid]:   # the options sdjax writes under their own names
        options.update(parse_scheduler_options([f"{key}={fields.pop(key)}"]))
    source = {"use_karras_sigmas": "Schedule type", "eta": "Eta DDIM"}
    flags["scheduler_options"] = dict(sorted(options.items(), key=lambda item: order.index(
        source.get(item[0], item[0])) if source.get(item[0], item[0]) in order else -1))
    ignored = [f"{k}: {v}" for k, v in fields.items() if k not in _PNG_FIELDS_IGNORED]
    ignored += [f"{tag} (no sdjax equivalent)" for tag in networks]
    if hires_left_out:
        ignored.insert(0, hires_left_out)
    embeddings = [name.strip() for name in re.findall(r"([^,:]+):", fields.get("TI hashes", ""))]
    return PngSettings(flags, prompt, strength, loras, model, vae, ignored, embeddings, masked, controlnets,
                       other_modules)


def extra_network_tags(prompt: str) -> tuple[str, list[tuple[str, float]], list[str]]:
    """AUTOMATIC1111's extra-network tags, ``<TYPE:NAME[:ARGS]>``, taken out of a prompt as A1111 takes them
    out: (the prompt without them, its LoRAs as (NAME, SCALE), its other tags as written). ``<lora:NAME>``,
    ``<lora:NAME:SCALE>``, ``<lora:NAME:SCALE:UNET_SCALE>`` (and ``<lyco:...>``, the old name) are LoRAs, at
    SCALE (default 1); another type (``<hypernet:...>``) has no sdjax equivalent."""
    loras, networks = [], []
    for kind, body in re.findall(r"<(\w+):([^>]+)>", prompt):
        name, *args = body.split(":")
        if kind in ("lora", "lyco"):
            try:
                scale = float(args[0]) if args and "=" not in args[0] else 1.0
            except ValueError:
                scale = 1.0
            loras.append((name.strip(), scale))
        else:
            networks.append(f"<{kind}:{body}>")
    if loras or networks:   # (a tag between words, 'a <lora:x>dog', leaves a space between them, as A1111's text has)
        prompt = re.sub(r"(\s*)<\w+:[^>]+>(\s*)", lambda m: " " if m.group(1) or m.group(2) else "", prompt).strip()
    return prompt, loras, networks


def find_lora(name: str, lora_dir: str | os.PathLike) -> str:
    """The file of A1111's ``<lora:NAME>`` in ``--lora-dir``: ``NAME.safetensors`` in it or a folder below
    it (as in A1111's ``models/Lora``); a UsageError when there is none, or one in several folders."""
    found = [path for path in _files_below(Path(lora_dir).expanduser(), (".safetensors",))
             if path.name == f"{name}.safetensors"]   # (as --lora takes them: .safetensors in small letters)
    if not found:
        raise _bad_setting("lora_dir", lora_dir, f"has no {name}.safetensors, the LoRA <lora:{name}> (nor a folder "
                           "below it)")
    if len(found) > 1:
        raise _bad_setting("lora_dir", lora_dir, f"has {name}.safetensors in several folders ({found[0]}, "
                           f"{found[1]}): keep one, or pass --lora FILE:SCALE")
    return str(found[0])


def loras_of_tags(tags: Sequence[tuple[str, float]], lora_dir, given: Sequence[str]) -> list[str]:
    """``--lora`` values (FILE:SCALE) for A1111's ``<lora:NAME:SCALE>`` tags (`extra_network_tags`): each
    NAME's file in ``lora_dir`` (`find_lora`), none for a NAME that a ``--lora`` file of ``given`` already
    is (its own scale is used). A UsageError for a tag with neither, or a ``lora_dir`` that is no folder."""
    if lora_dir is not None:
        _folder("lora_dir", lora_dir)
    named = {Path(file).stem for file, _ in map(parse_lora, given)}
    loras = []
    for name, scale in tags:
        if name in named:
            continue
        if not math.isfinite(scale):   # (not a --lora flag's error: none was given)
            raise UsageError(f"the LoRA <lora:{name}:{scale}>: its scale is not a finite number")
        if lora_dir is None:
            raise UsageError(f"the prompt names the LoRA <lora:{name}:{scale:g}>: pass --lora-dir DIR (the folder of "
                             f"{name}.safetensors, as A1111's models/Lora) or --lora FILE:{scale:g}")
        loras.append(f"{find_lora(name, lora_dir)}:{scale!r}")   # (the scale as given, not rounded to 6 digits)
        named.add(name)
    return loras


def _folder(setting: str, folder) -> Path:
    """``--lora-dir`` / ``--embedding-dir``'s folder; a UsageError when it is none."""
    if not str(folder).strip():   # (an unset variable in --embedding-dir "$DIR": not the folder it runs in)
        raise _bad_setting(setting, repr(folder), "is empty: leave the flag out, or give a folder")
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise _bad_setting(setting, folder, "is not a folder" if root.exists() else "no such folder")
    return root


def _files_below(root: Path, suffixes: Sequence[str]) -> list[Path]:
    """The files in ``root`` and the folders below it whose suffix is one of ``suffixes`` (in any letter
    case), sorted, as A1111 lists its models/Lora and embeddings folders: linked folders are followed
    (each folder once)."""
    found, seen = [], set()
    for folder, folders, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:   # (a link to a folder above it)
            folders[:] = []
            continue
        seen.add(real)
        found += [Path(folder, file) for file in files if Path(file).suffix.lower() in suffixes
                  and os.path.isfile(os.path.join(folder, file))]
    return sorted(found)


def embeddings_named(texts: Sequence[str], embedding_dir, given: Sequence[str]) -> list[str]:
    """``--embedding`` values for the textual inversion embeddings of ``embedding_dir`` (and the folders
    below it, as A1111's ``embeddings`` folder) that ``texts`` name: a ``.safetensors``, ``.pt`` or ``.bin``
    file whose name (A1111's token for its files, ``EasyNegative``) a text has as a word, in any letter
    case; not one whose name a ``given`` file has. A UsageError for a folder that is none, or a named
    embedding in several files."""
    if embedding_dir is None:
        return []
    files: dict[str, list[Path]] = {}
    for path in _files_below(_folder("embedding_dir", embedding_dir), (".safetensors", ".pt", ".bin")):
        files.setdefault(path.stem.lower(), []).append(path)
    have = {Path(file).stem.lower() for file in given}
    named = []
    for name, paths in sorted(files.items()):   # (by name: hosts whose folders differ below DIR agree)
        word = re.compile(rf"(?<![\w-]){re.escape(name)}(?![\w-])", re.IGNORECASE)
        if name in have or not any(word.search(text) for text in texts):
            continue
        if len(paths) > 1:
            raise _bad_setting("embedding_dir", embedding_dir, f"has the embedding {paths[0].stem} in several files "
                               f"({paths[0]}, {paths[1]}): keep one, or pass --embedding FILE")
        named.append(str(paths[0]))
    return named


def png_notes(png: PngSettings, args) -> list[str]:
    """What a ``--from-png`` run does not take over from the image, one warning each: its LoRAs not
    given with ``--lora``, another model or VAE than this run's, fields sample.py has no setting for."""
    from sdjax.images import model_name
    notes = []
    given = {Path(file).stem for file, _ in map(parse_lora, args.lora)}
    for name, scale in png.loras:
        if name not in given:
            notes.append(f"--from-png: the image was made with the LoRA {name} at {scale:g}: to use it, pass "
                         f"--lora FILE:{scale:g} (its file) or --lora-dir DIR (its folder)")
    if png.controlnets and not args.controlnet:
        several = len(png.controlnets) > 1
        notes.append(f"--from-png: the image was made with the ControlNet{'s' * several} "
                     f"{' and '.join(png.controlnets)}: to make it again, pass --controlnet PATH --control-image FILE "
                     f"(the picture its Module read; Module none: the control image)"
                     f"{' for each, in this order' * several}; this run makes it without")
    elif len(args.controlnet) == len(png.controlnets):   # (a Module sdjax lacks: its map, given processed)
        for k, module in enumerate(png.other_modules):
            if module:
                notes.append(f"--from-png: the image's ControlNet {k} preprocessed its control image with {module}, "
                             "which sdjax lacks: this run takes --control-image as the ControlNet reads it (give its "
                             "processed map)")
    elif png.controlnets and len(args.controlnet) != len(png.controlnets):
        # (its units' settings pair with its ControlNets in order: for another number, the preset's or the defaults)
        for name in CONTROLNET_SETTINGS:
            if getattr(args, name) is png.flags[name]:
                setattr(args, name, list(getattr(args, "preset", {}).get(name, [])))
        notes.append(f"--from-png: the image was made with {count(len(png.controlnets), 'ControlNet')} "
                     f"({' and '.join(png.controlnets)}), this run with {len(args.controlnet)}: the image's ControlNet "
                     "settings (Weight, Guidance Start and End, Control Mode, Resize Mode, Module and its settings) "
                     "are left out")
    loaded = {Path(file).stem.lower() for file in args.embedding}   # (an A1111 file's token; a diffusers
    for file in args.embedding:                                       # file's is inside it)
        try:
            loaded.add(embedding_hashes([file])[0][0].lower())
        except (OSError, ValueError):   # (a bad file: named when the model loads)
            pass
    for name in png.embeddings:   # (used in the prompt by name: the word alone is not the embedding)
        if name.lower() not in loaded:
            notes.append(f"--from-png: the image was made with the textual inversion embedding {name}: to use it, "
                         "pass --embedding FILE (its file) or --embedding-dir DIR (its folder)")
    for what, recorded, flag in (("model", png.model, args.model), ("VAE", png.vae, args.vae)):
        this = model_name(flag) if flag else None
        if recorded and model_name(recorded) != this:   # (A1111 names a VAE by its file: NAME.safetensors)
            uses = this or "the model's own"
            notes.append(f"--from-png: the image was made with the {what} {recorded}, this run uses {uses} "
                         f"(--{what.lower()})")
    size = png.flags.get("width"), png.flags.get("height")   # (an "Only masked" image's: its box's)
    boxed = png.flags.get("mask_padding") is not None
    content = png.flags.get("masked_content", "original")
    boxed_or_filled = (", Only masked" if boxed else "") + (
        ", Inpaint not masked" if png.flags.get("mask_invert") else "") + (
        f", Masked content {MASKED_CONTENTS[content]}" if content != "original" else "")
    if png.masked and args.init_image is None:
        notes.append("--from-png: the image was made by inpainting a picture (a mask" + boxed_or_filled + (
            f", Denoising strength {png.strength:g}" if png.strength is not None else "") + "): to make it again, pass "
            "--init-image PICTURE --mask MASK; this run makes one from noise")
    elif png.masked and args.mask is None:
        notes.append("--from-png: the image was made by inpainting (a mask" + boxed_or_filled
                     + "): to make it again, pass --mask MASK too; this run repaints the whole picture" + (
                         f", at {size[0]}x{size[1]}: the size of the box around the mask it was made at, not the "
                         "picture's" if boxed and size == (args.width, args.height) else ""))
    elif png.strength is not None and args.init_image is None:
        notes.append(f"--from-png: the image was made from a picture (img2img, Denoising strength "
                     f"{png.strength:g}): to make it again, pass --init-image PICTURE; this run makes one from noise")
    if png.ignored:
        notes.append(f"--from-png: settings sample.py has no flag for are left out: {'; '.join(png.ignored)}")
    return notes


def init_image_size(path: str | os.PathLike, setting: str = "init_image") -> tuple[int, int]:
    """(width, height) of ``--init-image``'s file (or ``setting``'s: ``mask``) as it is shown (its EXIF
    orientation applied, as diffusers' ``load_image`` does), read from its header; a UsageError naming
    the file when it is missing or no image PIL can read."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(Path(path).expanduser()) as image:
            width, height = image.size
            turned = image.getexif().get(0x0112) in (5, 6, 7, 8)   # Orientation: a quarter turn (and a flip)
            return (height, width) if turned else (width, height)
    except FileNotFoundError:
        raise _bad_setting(setting, path, "no such file") from None
    except (UnidentifiedImageError, OSError) as e:
        raise _bad_setting(setting, path, f"cannot be read as an image ({e})") from None


def load_init_image(path: str | os.PathLike, width: int, height: int, mode: str = "RGB") -> np.ndarray:
    """``--init-image`` as uint8 RGB [height, width, 3] (``mode="L"``: ``--mask`` as grayscale [height,
    width]), upright (its EXIF orientation applied, as diffusers' ``load_image`` and A1111 do), resized
    to that size (Lanczos, as diffusers' image and mask processors and A1111's "Just resize" do) when it
    has another."""
    from PIL import Image, ImageOps
    with Image.open(Path(path).expanduser()) as image:
        image = ImageOps.exif_transpose(image).convert(mode)
        if image.size != (width, height):
            image = image.resize((width, height), Image.Resampling.LANCZOS)
        return np.asarray(image)


def parse_lora(text: str) -> tuple[str, float]:
    """``--lora FILE[:SCALE]`` -> (FILE, SCALE), SCALE 1.0 when left out (a FILE whose own name has a
    colon is taken whole when it exists). Raises UsageError when the scale is not a finite number or
    the file is not a LoRA ``.safetensors`` file that exists; its contents are read with the model."""
    text = str(text)
    file, colon, tail = text.rpartition(":")
    scale = 1.0
    if colon and file and not Path(text).expanduser().is_file() and not re.search(r"[/\\]", tail):
        try:
            scale = float(tail)
        except ValueError:
            scale = math.nan
        if not math.isfinite(scale):
            raise _bad_setting("lora", text, f"the scale {tail!r} is not a finite number (FILE:SCALE, e.g. "
                               "style.safetensors:0.8)")
    else:
        file = text
    path = Path(file).expanduser()
    if not str(file).strip():
        raise _bad_setting("lora", repr(text), "no file given (FILE or FILE:SCALE)")
    if path.is_dir():
        raise _bad_setting("lora", text, f"{file} is a folder; give a LoRA .safetensors file")
    if not path.is_file():
        raise _bad_setting("lora", text, f"no such file {file}")
    if path.suffix != ".safetensors":
        raise _bad_setting("lora", text, f"{file} is not a .safetensors file; sdjax reads LoRA .safetensors files")
    return str(path), scale


def lora_tags(loras: Sequence[str]) -> list[tuple[str, float]]:
    """(NAME, SCALE) of each ``FILE[:SCALE]``, NAME the file's stem: A1111's ``<lora:NAME:SCALE>``."""
    return [(Path(file).stem, scale) for file, scale in map(parse_lora, loras)]


def embedding_hashes(files: Sequence[str]) -> list[tuple[str, str]]:
    """(TOKEN, HASH) of each textual inversion embedding file, as A1111's ``TI hashes`` names them: the
    token `StableDiffusion.load_textual_inversion` gives it and the file's SHA-256, first 12 hex digits."""
    import hashlib
    from sdjax.weights import read_textual_inversion
    return [(read_textual_inversion(file)[0], hashlib.sha256(Path(file).expanduser().read_bytes()).hexdigest()[:12])
            for file in files]


def embeddings_used(tokenizer, embeddings: Sequence[tuple[str, str]], text: str) -> list[tuple[str, str]]:
    """The (TOKEN, HASH) of ``embeddings`` (`embedding_hashes`) whose token ``tokenizer`` reads in ``text``,
    as the text encoder gets it: not one whose token is only a part of a longer embedding's
    (``EasyNegative`` in ``EasyNegativeV2``, where the tokenizer matches the longer one)."""
    ids = set(tokenizer(text, add_special_tokens=False).input_ids) if embeddings else set()
    return [(token, digest) for token, digest in embeddings if tokenizer.convert_tokens_to_ids(token) in ids]


def recorded_scheduler_options(scheduler: str, config: dict, options: dict) -> dict:
    """The scheduler options an image's parameters record: those given, and the schedule the model's
    scheduler config sets (its ``use_karras_sigmas: true``), which A1111 would otherwise read as Uniform."""
    from sdjax.schedulers import pipeline_scheduler_config
    settings = resolve_scheduler_config(scheduler, pipeline_scheduler_config(scheduler, config)[0], **options)
    schedule = {key: True for key in ("use_karras_sigmas", "use_exponential_sigmas")
                if settings.get(key) and key not in options}
    return {**options, **schedule}


def _number(value) -> bool:
    """A finite int or float (a setting's value as a preset or a flag gives it), not a bool."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def validate_request(req: SampleRequest) -> None:
    """Check everything that can be checked without the model; raise UsageError with one line."""
    if not req.prompts:
        raise UsageError("no prompt given: pass a prompt, or --prompts-file FILE")
    if req.prompt_weighting and req.emphasis != "none":   # a weight that is no number, (word:1.2.3): the pipeline
        # would raise mid-run (with Emphasis None the brackets are text)
        from sdjax.text import composable_parts, parse_prompt_attention, prompt_schedule
        # (a negative prompt that is also a prompt is checked as both: AND is text in it)
        texts = {(p, True): "prompt" for p in req.prompts}   # (each text, whether a prompt: the setting it is)
        hires = () if req.hires_scale is None else ("hires_prompt", "hires_negative_prompt")
        for name in ("negative_prompt", *hires):
            if isinstance(text := getattr(req, name), str):
                texts.setdefault((text, name == "hires_prompt"), name)
        for (text, is_prompt), setting in texts.items():
            try:   # (each text its editing gives: (a:[1.2:1.3.4:2]) is (a:1.3.4) after step 2; a prompt's AND parts)
                # (over the Hires fix's second pass's steps too: its texts are edited over those)
                counts = {n for n in (req.steps, req.hires_steps if req.hires_scale is not None else None)
                          if isinstance(n, int) and n >= 1} or {1}
                parts = [part for part, _ in composable_parts(text)] if is_prompt else [text]
                # (each part on its own, as the pipeline reads them: '(a AND b:1.2.3)' is '(a' and ' b:1.2.3)')
                for edited in [*parts, *(edited for part in parts for steps in sorted(counts)
                                         for _, edited in prompt_schedule(part, steps))]:
                    parse_prompt_attention(edited)
            except ValueError as e:
                if is_prompt:
                    raise UsageError(f"{e} (--prompt-weighting reads (text:WEIGHT); \\( \\) are brackets as text)") \
                        from None
                reason = str(e).removeprefix(f"prompt {text!r}: ")
                raise _bad_setting(setting, repr(text), reason) from None
    for name in ("model", "model_config", "vae", "out"):   # an unset variable in --out "$DIR": not the cwd
        if getattr(req, name) is not None and not str(getattr(req, name)).strip():
            raise _bad_setting(name, repr(getattr(req, name)), "is empty: leave the flag out, or give "
                               + ("a folder" if name == "out" else "a path or Hub repo id"))
    problem = (model_options_problem(req.model, req.model_config, req.variant, req.ema_weights)
               or attention_setting_problem())
    if problem:
        raise UsageError(problem)
    for name in ("height", "width"):
        size = getattr(req, name)
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0 or size % 8:
            raise _bad_setting(name, size, "must be a positive multiple of 8"
                               + (" (the init image is smaller than 8 pixels: give --height and --width)"
                                  if req.init_image is not None and size == 0 else ""))
    if req.scheduler not in SCHEDULERS:
        choose = f"choose one of {', '.join(SCHEDULERS)}"
        raise _bad_setting("scheduler", req.scheduler, choose, f"unknown scheduler {req.scheduler!r}: {choose}")
    try:   # the keys and the kinds of values now; the rest once the model's scheduler config is read
        resolve_scheduler_config(req.scheduler, {}, **req.scheduler_options)
    except (TypeError, ValueError) as e:
        raise _bad_setting("scheduler_options", None, str(e), f"--scheduler-option: {e}") from None
    if not isinstance(req.steps, int) or isinstance(req.steps, bool) or not 1 <= req.steps <= 1000:
        raise _bad_setting("steps", req.steps, "must be an integer in 1..1000 (typical 20-100)")
    if not isinstance(req.guidance_scale, (int, float)) or not math.isfinite(req.guidance_scale):
        raise _bad_setting("guidance_scale", req.guidance_scale, "must be a finite number (typical 5-15)")
    if req.emphasis not in EMPHASIS_MODES:
        raise _bad_setting("emphasis", req.emphasis, f"choose one of {', '.join(EMPHASIS_MODES)} (AUTOMATIC1111's "
                           "Emphasis: Original, No norm, Ignore, None)")
    if req.emphasis != "original" and not req.prompt_weighting:
        raise _bad_setting("emphasis", req.emphasis, "is a setting of AUTOMATIC1111's prompt syntax: it needs "
                           "--prompt-weighting")
    if req.prompt_weighting and req.guidance_scale <= 1:
        _check_composed_guidance(req.prompts, "guidance_scale", req.guidance_scale, "the prompt")
    if isinstance(req.clip_skip, bool) or not isinstance(req.clip_skip, int) or req.clip_skip < 1:
        # (the upper end, the text encoder's layer count, once the model is loaded: clip_skip_problem)
        raise _bad_setting("clip_skip", req.clip_skip, "must be an integer >= 1 (1: the text encoder's last layer, "
                           "2: the penultimate; typically 1 or 2)")
    for text in [*req.lora, *(text for loras in req.prompt_loras for text in loras)]:
        parse_lora(text)   # (the files' contents once the model is loaded: StableDiffusion.fuse_lora)
    if req.prompt_loras and len(req.prompt_loras) != len(req.prompts):
        raise UsageError(f"prompt_loras has {len(req.prompt_loras)} entries for {len(req.prompts)} prompts: one list "
                         "of LoRAs a prompt (or none)")
    for file in req.embedding:   # likewise (StableDiffusion.load_textual_inversion)
        path = Path(file).expanduser()
        if not str(file).strip() or not path.is_file():
            raise _bad_setting("embedding", file, "is a folder; give an embedding file" if path.is_dir()
                               else "no such file")
    if req.init_image is not None:
        init_image_size(req.init_image)
    if req.mask is not None:
        if req.init_image is None:
            raise _bad_setting("mask", req.mask, "marks what to repaint of a picture (inpainting): give --init-image "
                               "too")
        init_image_size(req.mask, "mask")
    if not _number(req.mask_blur) or req.mask_blur < 0:
        raise _bad_setting("mask_blur", req.mask_blur, "must be a number of pixels >= 0 (0: none; A1111's default "
                           "is 4)")
    if req.mask_blur and req.mask is None:
        raise _bad_setting("mask_blur", req.mask_blur, "softens an inpainting mask's edge: give --mask too")
    if req.masked_content not in MASKED_CONTENTS:
        raise _bad_setting("masked_content", req.masked_content, f"choose one of {', '.join(MASKED_CONTENTS)} "
                           "(A1111's Masked content)")
    if req.mask_invert and req.mask is None:
        raise _bad_setting("mask_invert", "", "swaps the black and white of --mask: give --mask too",
                           message="--mask-invert: swaps the black and white of --mask: give --mask too")
    if req.masked_content != "original" and req.mask is None:
        raise _bad_setting("masked_content", req.masked_content, "is what the part --mask marks starts from: give "
                           "--mask too")
    _validate_controlnets(req)
    if req.save_control_images and not req.controlnet:
        raise _bad_setting("save_control_images", "", "writes the ControlNets' control images: give --controlnet too",
                           message="--save-control-images: writes the ControlNets' control images: give --controlnet "
                                   "too")
    if req.mask_padding is not None:
        if isinstance(req.mask_padding, bool) or not isinstance(req.mask_padding, int) or req.mask_padding < 0:
            raise _bad_setting("mask_padding", req.mask_padding, "must be a whole number of pixels >= 0")
        if req.mask is None:
            raise _bad_setting("mask_padding", req.mask_padding, "inpaints the box around a mask: give --mask too")
        if req.trajectory:
            raise _bad_setting("mask_padding", req.mask_padding, "makes no trajectory (its images are pasted into "
                               "the picture): leave out --trajectory or --mask-padding")
        if req.init_image is not None:   # (the pipeline's box needs a white pixel: said before the model loads)
            from sdjax.images import blur_mask, mask_batch
            mask = req.load_mask(*init_image_size(req.init_image))   # (as run_sampling reads it)
            blur = req.mask_blur if _number(req.mask_blur) and req.mask_blur > 0 else 0
            if not (blur_mask(mask_batch(mask), blur) >= 0.5).any():   # (cut at half gray, as the pipeline cuts it)
                after = f" after --mask-blur {req.mask_blur:g}" if blur else ""
                raise _bad_setting("mask", req.mask, f"is black everywhere (cut at half gray{after}): --mask-padding "
                                   "finds no box around it to repaint")
    if req.strength is not None:
        strength = req.strength
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 < strength <= 1:
            raise _bad_setting("strength", strength, "must be a number in (0, 1] (the share of the schedule run from "
                               "the init image; typical 0.5-0.8)")
        if req.init_image is None:
            raise _bad_setting("strength", strength, "is img2img's: give --init-image too")
    if req.img2img_strength is not None and int(req.steps * req.img2img_strength) < 1:
        if req.strength is None:   # the default strength: name the steps, which were given
            raise _bad_setting("steps", req.steps, f"with img2img's default --strength {DEFAULT_STRENGTH} runs no "
                               "step (int(steps x strength) are run): raise either")
        raise _bad_setting("strength", req.img2img_strength, f"with --steps {req.steps} runs no step "
                           f"(int(steps x strength) are run): raise either")
    _validate_hires(req)
    if req.dtype is not None and req.dtype not in DTYPES:
        choose = f"choose one of {', '.join(DTYPES)} (or {', '.join(DTYPE_ALIASES)})"
        raise _bad_setting("dtype", req.dtype, choose, f"unknown dtype {req.dtype!r}: {choose}")
    if req.batch_size is not None and req.batch_size < 1:
        raise _bad_setting("batch_size", req.batch_size, "must be at least 1")
    if not req.seeds:
        raise UsageError("no seeds given")
    strength = req.variation_strength
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 <= strength <= 1:
        raise _bad_setting("variation_strength", strength, "must be a number in [0, 1] (0: the seed's noise, 1: the "
                           "variation seed's)")
    if strength and not req.variation_seeds:
        raise _bad_setting("variation_strength", strength, "moves each image's noise toward its variation seed's: "
                           "give --variation-seeds")
    if req.variation_seeds and not strength:
        raise _bad_setting("variation_seeds", ",".join(map(str, req.variation_seeds)), "need --variation-strength "
                           "above 0 (how far each image's noise moves toward its variation seed's; 0.1-0.3 is typical)")
    if req.seed_resize_from is not None and (req.seed_resize_hw is None or min(req.seed_resize_hw) <= 0
                                             or any(side % 8 for side in req.seed_resize_hw)):
        raise _bad_setting("seed_resize_from", req.seed_resize_from, "must be WIDTHxHEIGHT in pixels, positive "
                           "multiples of 8 (e.g. 512x512)")
    if req.trajectory_frames < 3:
        raise _bad_setting("trajectory_frames", req.trajectory_frames, "a trajectory needs at least 3 frames")
    problem = unwritable_folder(req.out)
    if problem:
        raise _bad_setting("out", req.out, problem)


def _validate_controlnets(req: SampleRequest) -> None:
    """The ControlNets' part of `validate_request`: a control image each, their settings."""
    nets, images = len(req.controlnet), len(req.control_image)
    if not nets or not images:
        if nets or images:
            given, needed = ("controlnet", "--control-image") if nets else ("control_image", "--controlnet")
            raise _bad_setting(given, getattr(req, given)[0], f"a ControlNet steers the images by a control image: "
                               f"give {needed} too")
        return
    if nets != images:
        raise _bad_setting("control_image", " ".join(req.control_image), f"{count(images, 'control image')} for "
                           f"{count(nets, 'ControlNet')}: give one each (--control-image after its --controlnet)")
    for name in CONTROLNET_SETTINGS:
        values = getattr(req, name)
        if len(values) not in (0, 1, nets):
            raise _bad_setting(name, " ".join(f"{v:g}" if _number(v) else str(v) for v in values),
                               f"{len(values)} values for {count(nets, 'ControlNet')}: give one for all, or one each "
                               "(in --controlnet's order)")
        for value in values:
            if name in CONTROLNET_CHOICES and value not in CONTROLNET_CHOICES[name]:
                choices = CONTROLNET_CHOICES[name]
                names = {"controlnet_mode": "Control Modes", "controlnet_resize": "Resize Modes"}
                raise _bad_setting(name, value, f"choose one of {', '.join(choices)}" + (
                    f" (A1111's {names[name]} {', '.join(choices.values())})" if name in names else ""))
            if name in CONTROLNET_INTEGERS:
                low, high = PROCESSOR_RES_RANGE if name == "controlnet_processor_res" else CANNY_RANGE
                if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= value <= high:
                    raise _bad_setting(name, value, f"must be a whole number from {low} to {high}" + (
                        " (canny's resolution: the short side's pixels)" if name == "controlnet_processor_res"
                        else " (a canny threshold of the pixels' gradient)"))
            if name == "controlnet_scale" and not _number(value):
                raise _bad_setting(name, value, "must be a finite number (the weight of the ControlNet's residuals; "
                                   "1 by default)")
            if name in ("controlnet_start", "controlnet_end") and (not _number(value) or not 0 <= value <= 1):
                raise _bad_setting(name, value, "must be a number in [0, 1] (a share of the steps run)")
    try:   # (a dependency: a broken install said before the model loads)
        from sdjax.preprocess import _opencv
        _opencv()
    except ImportError as e:
        raise _bad_setting("controlnet", req.controlnet[0], str(e)) from None
    for unit in req.control_units:
        if unit.start >= unit.end:
            raise _bad_setting("controlnet_start", f"{unit.start:g}", f"must be below --controlnet-end ({unit.end:g})")
        width, height = init_image_size(unit.image, "control_image")
        if problem := unit.problem((height, width), req.width, req.height):
            raise _bad_setting("control_image", unit.image, problem)
        if req.mask_padding is not None:
            raise _bad_setting("control_image", unit.image, "is not available with --mask-padding: leave either out")


def _validate_hires(req: SampleRequest) -> None:
    """The Hires fix's settings (--hires-*): each in range, the others only with --hires-scale."""
    if req.hires_scale is None:
        for name in ("hires_steps", "hires_strength", "hires_upscaler", "hires_scheduler", "hires_scheduler_options",
                     "hires_guidance_scale", "hires_prompt", "hires_negative_prompt"):
            if (value := getattr(req, name)) not in (None, {}):
                reason = "is the Hires fix's: give --hires-scale too"
                raise _bad_setting(name, value, reason, f"--hires-scheduler-option: {reason}"
                                   if name == "hires_scheduler_options" else None)
        return
    if not _number(req.hires_scale) or req.hires_scale <= 1:
        raise _bad_setting("hires_scale", req.hires_scale, "must be a number above 1 (the second pass's size over "
                           "the first's; typical 1.5-2)")
    steps = req.steps if req.hires_steps is None else req.hires_steps
    if req.hires_steps is not None and (isinstance(steps, bool) or not isinstance(steps, int)
                                        or not 1 <= steps <= 1000):
        raise _bad_setting("hires_steps", steps, "must be an integer in 1..1000 (default: --steps)")
    strength = HIRES_STRENGTH if req.hires_strength is None else req.hires_strength
    if not _number(strength) or not 0 < strength <= 1:
        raise _bad_setting("hires_strength", strength, "must be a number in (0, 1] (the share of the second pass's "
                           f"schedule run; default {HIRES_STRENGTH})")
    if req.hires_upscaler is not None and req.hires_upscaler not in HIRES_UPSCALERS:
        raise _bad_setting("hires_upscaler", req.hires_upscaler, f"choose one of {', '.join(HIRES_UPSCALERS)}")
    if isinstance(steps, int) and int(steps * strength) < 1:
        raise _bad_setting("hires_strength", strength, f"with {steps} second-pass steps runs no step "
                           "(int(steps x strength) are run): raise either")
    if req.init_image is not None:
        raise _bad_setting("hires_scale", req.hires_scale, "the Hires fix is text-to-image in two passes: not with "
                           "--init-image (for img2img at another size, give --width and --height)")
    if req.trajectory:
        raise _bad_setting("hires_scale", req.hires_scale, "the Hires fix makes no trajectory: leave out "
                           "--trajectory or --hires-scale")
    # the second pass's own settings
    if req.hires_scheduler is not None and req.hires_scheduler not in SCHEDULERS:
        raise _bad_setting("hires_scheduler", req.hires_scheduler, f"choose one of {', '.join(SCHEDULERS)}")
    if req.hires_guidance_scale is not None and not _number(req.hires_guidance_scale):
        raise _bad_setting("hires_guidance_scale", req.hires_guidance_scale, "must be a finite number (default: "
                           "--guidance-scale)")
    for name in ("hires_prompt", "hires_negative_prompt"):
        if getattr(req, name) is not None and not isinstance(getattr(req, name), str):
            raise _bad_setting(name, repr(getattr(req, name)), "must be a text")
    scale = req.guidance_scale if req.hires_guidance_scale is None else req.hires_guidance_scale
    if req.prompt_weighting and _number(scale) and scale <= 1:   # (the first pass's: validate_request)
        _check_composed_guidance([req.hires_prompt] if req.hires_prompt else req.prompts,
                                 "guidance_scale" if req.hires_guidance_scale is None else "hires_guidance_scale",
                                 scale, "the Hires fix's second-pass prompt")
    name, options = req.hires.second_scheduler(req.scheduler, req.scheduler_options)
    try:   # (the keys and kinds now, as the first pass's; the rest once the model's scheduler config is read)
        resolve_scheduler_config(name, {}, **options)
    except (TypeError, ValueError) as e:
        raise _bad_setting("hires_scheduler_options", None, str(e), f"--hires-scheduler-option: {e}") from None


def _check_composed_guidance(prompts: Sequence[str], setting: str, scale, which: str) -> None:
    """A prompt with AND or a weight (A1111's composable diffusion) at a guidance ``scale`` of 1 or less: an
    error naming ``setting``."""
    from sdjax.text import composable_parts
    if composed := [p for p in prompts if [w for _, w in composable_parts(p)] != [1.0]]:
        raise _bad_setting(setting, scale, f"{which} {composed[0]!r} has AND or a weight (':2' at its end: "
                           "AUTOMATIC1111's composable diffusion, read with --prompt-weighting), which acts through "
                           "guidance: give a guidance scale above 1")


def clip_skip_problem(clip_skip: int, pipe) -> UsageError | None:
    """``--clip-skip N`` past the loaded text encoder's layers, as a UsageError, or None."""
    layers = pipe.text_encoder.config.num_hidden_layers
    if clip_skip <= layers:
        return None
    return _bad_setting("clip_skip", clip_skip, f"must be an integer in 1..{layers} (this model's text encoder has "
                        f"{layers} layers)")


def unwritable_folder(folder: str | os.PathLike) -> str | None:
    """Why files cannot be written in ``folder`` (the folder, or the nearest one above it that
    exists, is a file or not writable, a read-only file system included; or no folder can be made
    in it, as under /proc, where root passes the access check), or None. Touches nothing of
    ``folder``: the probe is a temporary folder beside it, removed at once."""
    import tempfile
    folder = Path(folder).expanduser().absolute()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    if existing != folder:
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".sdjax-probe-", dir=existing))
        except OSError as e:
            return f"cannot make a folder in {existing} ({e.strerror or e})"
    return None


def default_dtype() -> str:
    """bfloat16 on accelerators (GPU/TPU), float32 on CPU."""
    import jax
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


# ----------------------------------------------------------------------------- compilation
def default_cache_dir() -> Path:
    """``$SDJAX_CACHE_DIR/jax``, else ``$XDG_CACHE_HOME/sdjax/jax``, else ``~/.cache/sdjax/jax``."""
    if os.environ.get("SDJAX_CACHE_DIR"):
        return Path(os.environ["SDJAX_CACHE_DIR"]).expanduser() / "jax"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "sdjax" / "jax"


COMPILATION_CACHE_HELP = ("JAX persistent compilation cache folder (default $SDJAX_CACHE_DIR/jax if set, else "
                          "$XDG_CACHE_HOME/sdjax/jax if set, else ~/.cache/sdjax/jax; 'none' turns it off)")


def enable_compilation_cache(directory: str | os.PathLike | None = None) -> Path | None:
    """Turn on JAX's persistent compilation cache in ``directory`` (default :func:`default_cache_dir`;
    ``"none"`` leaves it off and returns None)
    for every compilation, however small or quick, so a second run of the same shapes loads the
    compiled programs instead of compiling them again. Call before the first compilation. The
    cache only saves time: a folder that cannot be created or written (a read-only home on a
    cluster) is a warning, and None is returned with the cache left off."""
    import warnings
    import jax
    if str(directory or "").lower() == "none":
        return None
    directory = Path(directory).expanduser() if directory else default_cache_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        if not os.access(directory, os.W_OK | os.X_OK):
            raise PermissionError("not writable")
    except OSError as e:
        warnings.warn(f"compilation cache {directory}: {e.strerror or e}; running without it (set "
                      "--compilation-cache to a writable folder, or none)", stacklevel=2)
        return None
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)  # no size threshold at all
    _explain_unreadable_cache_entries(directory)
    return directory


_UNREADABLE_ENTRY = re.compile(r"Error reading persistent compilation cache entry for '([^']+)'")


def _explain_unreadable_cache_entries(directory: Path) -> None:
    """Add the fix to JAX's warning about a cache entry it cannot read. JAX writes an entry in place,
    so a run killed while writing one leaves it truncated, and it never replaces an existing entry:
    every later run warns and compiles that program again until the file is removed. The warning
    names the program; its entries are the files ``<program>-<hash>-cache``."""
    import warnings
    show = getattr(warnings.showwarning, "unexplained", warnings.showwarning)   # called again: rewrap, once

    def explained(message, category, filename, lineno, file=None, line=None):
        unreadable = _UNREADABLE_ENTRY.match(str(message))
        if unreadable:
            message = (f"{message}. JAX compiles that program again on every run and never rewrites the entry "
                       f"(most likely a run was stopped while writing it): remove "
                       f"{directory / (unreadable[1] + '-*-cache')} and the next run writes it again")
        show(message, category, filename, lineno, file, line)
    explained.unexplained = show
    warnings.showwarning = explained


# JAX reports, per compilation, the time to trace to a jaxpr, to lower it to MLIR, and the backend
# (XLA) compile, which on a persistent-cache hit is just the time to load the cached executable.
_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                   "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")
_timers: list["CompileTimer"] = []
_timers_lock = threading.Lock()
_listening = False


def _on_duration(event: str, duration: float, **_) -> None:
    if event in _COMPILE_EVENTS:
        with _timers_lock:
            for timer in _timers:
                timer.by_event[event] += duration


class CompileTimer:
    """Sum of the compile time JAX itself reports (tracing + lowering + XLA compile or cache load)
    while the context is open. This measures compilation directly instead of guessing it from the
    difference between a first and a later batch::

        with CompileTimer() as ct:
            pipe(...)
        print(ct.seconds)
    """

    def __init__(self):
        self.by_event: dict[str, float] = collections.defaultdict(float)

    @property
    def seconds(self) -> float:
        return sum(self.by_event.values())

    def __enter__(self) -> "CompileTimer":
        global _listening
        import jax
        with _timers_lock:
            if not _listening:
                jax.monitoring.register_event_duration_secs_listener(_on_duration)
                _listening = True
            _timers.append(self)
        return self

    def __exit__(self, *exc) -> None:
        with _timers_lock:
            _timers.remove(self)


def out_of_memory(error: BaseException, advice: str) -> str | None:
    """For a JAX runtime error that says the device ran out of memory (XLA's RESOURCE_EXHAUSTED):
    one line with XLA's reason and ``advice``, for sample.py / train.py to print instead of a
    traceback. None for any other error."""
    import jax
    if not isinstance(error, jax.errors.JaxRuntimeError) or "RESOURCE_EXHAUSTED" not in str(error):
        return None
    return f"out of device memory ({str(error).strip().splitlines()[0]}): {advice}"


def attention_memory_advice(training: bool = False) -> str:
    """More out-of-memory advice where XLA's attention kernel runs (a GPU or TPU under the default
    ``SDJAX_ATTENTION=auto``, or ``xla`` anywhere): it holds each attention's whole fp32 score tensor,
    [2 x batch, 8 heads, 4096, 4096] for SD v1.5 at 512 px with guidance (BENCHMARKS.md, XLA's memory
    plan), which cuDNN's fused kernel never does, nor the blocked one when sampling (its backward
    pass keeps every block's probabilities, so ``training`` leaves it out). "" where one already runs."""
    import jax
    from sdjax.models import layers
    setting = layers.ATTENTION_IMPLEMENTATION
    xla_runs = setting == "xla" or (setting == "auto" and jax.default_backend() != "cpu")
    if not (xla_runs or (training and setting == "blocked")):
        return ""
    if training:
        return "; on an NVIDIA GPU, SDJAX_ATTENTION=cudnn (cuDNN's fused attention keeps no score tensors)"
    return ("; or keep attention's score tensors small with SDJAX_ATTENTION=cudnn (cuDNN's fused kernel, NVIDIA "
            "GPUs) or SDJAX_ATTENTION=blocked (any device; slower)")


# ----------------------------------------------------------------------------- the sampling loop
def count(n: int, noun: str) -> str:
    """``"1 image"``, ``"4 images"``."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


@dataclasses.dataclass
class SampleResult:
    files: list[Path]
    extra_files: list[Path]     # grid and trajectories
    num_images: int
    seconds: float              # wall time of generation and writing (model loading excluded)
    compile_seconds: float

    def summary(self) -> str:
        """``N images in S s (X images/s, compile Y s)``: S is the wall time of generating and writing
        (compilation included, model loading not), X = N / S, and Y the part of S that JAX reports as
        compilation (tracing + lowering + XLA compile, or loading from the persistent cache)."""
        rate = self.num_images / self.seconds if self.seconds > 0 else float("inf")
        return (f"{count(self.num_images, 'image')} in {self.seconds:.1f} s ({rate:.2f} images/s, "
                f"compile {self.compile_seconds:.1f} s)")


def _run_by_loras(pipe, req: SampleRequest, progress: str) -> SampleResult:
    """`run_sampling` of prompts that name different LoRAs (``req.prompt_loras``), as AUTOMATIC1111 makes
    them: each run of prompts naming the same ones (in the prompts' order, so the files are numbered
    in it) with ``req.lora`` and its own LoRAs fused (`StableDiffusion.fuse_lora`) on the weights the
    pipeline had before any fuse (`StableDiffusion.unfuse_lora`, which it is left with), on the same
    compiled sampler. One result for them all; a grid (``--grid``) for each run."""
    import itertools

    import jax
    results = []
    for loras, group in itertools.groupby(zip(req.prompts, req.prompt_loras), key=lambda pair: pair[1]):
        prompts = [prompt for prompt, _ in group]
        if jax.process_index() == 0:
            tags = " ".join(f"<lora:{name}:{scale:g}>" for name, scale in lora_tags(loras)) or "no LoRA of a tag"
            print(f"{count(len(prompts), 'prompt')} with {tags}")
        pipe.unfuse_lora()
        try:
            for text in [*req.lora, *loras]:
                pipe.fuse_lora(*parse_lora(text))
            results.append(run_sampling(pipe, dataclasses.replace(req, prompts=prompts, lora=[*req.lora, *loras],
                                                                  prompt_loras=[]), progress=progress))
        finally:
            pipe.unfuse_lora()
    return SampleResult([f for r in results for f in r.files], [f for r in results for f in r.extra_files],
                        sum(r.num_images for r in results), sum(r.seconds for r in results),
                        sum(r.compile_seconds for r in results))


def _chunks(jobs: list, size: int) -> Iterator[list]:
    for start in range(0, len(jobs), size):
        yield jobs[start:start + size]


PROGRESS_MODES = ("auto", "steps", "batches", "none")


def resolve_progress(mode: str) -> str:
    """``auto``: a bar over denoising steps on the CPU, where one step takes seconds; over batches
    on GPU/TPU, where a whole batch takes seconds and a per-step host callback would only cost.
    A step bar's callback also keeps that program out of JAX's persistent compilation cache (JAX
    does not cache programs with host callbacks), so each run compiles it again."""
    if mode not in PROGRESS_MODES:
        raise UsageError(f"--progress {mode!r}: choose one of {', '.join(PROGRESS_MODES)}")
    if mode == "auto":
        import jax
        return "steps" if jax.default_backend() == "cpu" else "batches"
    return mode


def _stop_together(wait_for_files) -> None:
    """Raise the previous batch's write error (``wait_for_files``, on process 0) on every process, so
    that the others stop with it instead of waiting for it in the next batch's collectives."""
    import jax
    from sdjax import parallel
    error = None
    try:
        if wait_for_files is not None:
            wait_for_files()
    except OSError as e:
        error = e
    if jax.process_count() > 1 and parallel.processes_that_failed(error is None) and error is None:
        raise OSError("process 0 could not write the images (its log says why)")
    if error is not None:
        raise error


def run_sampling(pipe, req: SampleRequest, *, progress: str = "auto") -> SampleResult:
    """Generate every (prompt, seed) of ``req`` with ``pipe`` and write one PNG each into ``req.out``.

    Images are generated in batches of ``req.batch_size`` (default 4 per device) by
    `StableDiffusion.batches`, which has the devices make the next batch while this one's files
    are encoded and written (on a background thread). Every batch has the same shape (the last one
    is filled up by repeating its last job, and the extra images are dropped), so the sampler
    compiles once; a request smaller than one batch is run as one batch of its own size. PNG names
    and the A1111 ``parameters`` chunk come from :mod:`sdjax.images`; numbering continues after the
    highest index in the folder.
    ``progress``: one of ``PROGRESS_MODES`` (see :func:`resolve_progress`).

    On several processes (``jax.distributed``), every process must call this with the same request:
    the batches are split over every device of every process, every process gets every image, and
    process 0 alone writes the files and shows the bars (the others return no files).
    """
    import jax
    from sdjax import parallel
    from sdjax.trajectory import noise_images, output_trajectory, trajectory_steps

    if req.prompt_loras:
        return _run_by_loras(pipe, req, progress)
    jobs, variations = req.jobs, req.variations
    varied = ({} if variations[0] is None
              else dict(variation_seeds=variations, variation_strength=req.variation_strength))
    if req.seed_resize_hw is not None:   # (the noise's shape: for the images and the trajectory's first frames)
        varied["seed_resize_from"] = req.seed_resize_hw
    out_dir = Path(req.out)
    writer = jax.process_index() == 0
    negative = req.negative_prompt
    if negative and req.guidance_scale <= 1:   # no unconditional pass: it would change nothing
        if writer:
            import warnings
            # (it may come from a preset, as the guidance scale may: both named as settings)
            warnings.warn(f"the negative prompt {negative!r} (--negative-prompt / negative_prompt) is ignored at "
                          f"guidance scale {req.guidance_scale:g} (guidance needs a scale above 1); it is left out "
                          "of the images' parameters")
        negative = ""
    if writer:
        out_dir.mkdir(parents=True, exist_ok=True)
    per_call = parallel.padded_size(req.batch_size or 4 * parallel.data_size(pipe.mesh), pipe.mesh)
    per_call = min(per_call, parallel.padded_size(len(jobs), pipe.mesh))
    sched = pipe.make_scheduler(req.scheduler, req.steps, **req.scheduler_options)
    png_options = recorded_scheduler_options(req.scheduler, pipe.scheduler_config, req.scheduler_options)
    strength, init, mask, first_call = req.img2img_strength, None, None, 0
    if strength is not None:   # img2img: the schedule runs from first_call on
        from sdjax.sampling import img2img_start
        # ("only masked": the picture at its own size, the box around the mask made at width x height)
        size = init_image_size(req.init_image) if req.mask_padding is not None else (req.width, req.height)
        init = load_init_image(req.init_image, *size)
        mask = None if req.mask is None else req.load_mask(*size)
        first_call = img2img_start(req.steps, strength)
    units = req.control_units   # (several ControlNets: a list of each one's control images and settings)
    one = lambda values: values if len(units) > 1 else values[0]  # noqa: E731
    # (each picture preprocessed once and fitted to each pass's size, as A1111's extension makes them)
    sizes = [(req.width, req.height)] + ([] if req.hires is None else [req.hires.size(req.height, req.width)[::-1]])
    made = [unit.control_images(load_picture(Path(unit.image).expanduser()), *sizes) for unit in units]
    controlled = {}
    if units:
        controlled = dict(control_images=one([images[0] for images in made]),
                          controlnet_conditioning_scale=one([unit.scale for unit in units]),
                          control_guidance_start=one([unit.start for unit in units]),
                          control_guidance_end=one([unit.end for unit in units]),
                          control_mode=one([unit.mode for unit in units]))
    picks = trajectory_steps(sched.num_model_calls, req.trajectory_frames, first_call) if req.trajectory else None
    hires, calls = req.hires, sched.num_model_calls - first_call
    if hires is not None:   # the second pass's model calls, on the same step bar
        from sdjax.sampling import img2img_start
        hires_steps = hires.steps or req.steps
        name2, options2 = hires.second_scheduler(req.scheduler, req.scheduler_options)
        calls += (pipe.make_scheduler(name2, hires_steps, **options2).num_model_calls
                  - img2img_start(hires_steps, hires.strength))
        if units:   # (the second pass's control images: each unit's map fitted to its size)
            controlled["hires_control_images"] = one([images[1] for images in made])
            controlled["hires_control_mode"] = one([unit.hires_mode() for unit in units])
    loras = lora_tags(req.lora)
    embeddings = embedding_hashes(req.embedding) if writer else []

    files: list[Path] = []
    extra: list[Path] = []
    images_for_grid, grid_params = [], None
    generated = 0
    batches = list(_chunks(jobs, per_call))
    bar, step_bar = batches, None
    mode = resolve_progress(progress)
    if mode != "none":
        from tqdm.auto import tqdm
        # A disabled bar on the other processes: the same step callback keeps their programs identical.
        if mode == "steps":   # one bar for the whole request, which the pipeline advances per step
            step_bar = tqdm(total=len(batches) * calls, desc="steps", unit="step",
                            disable=not writer)
        else:
            bar = tqdm(batches, desc="batches", unit="batch", disable=not writer)
    # The files are encoded and written on a thread while the devices make the next batch (a 512 px
    # PNG takes ~0.05 s); a batch waits for the previous batch's files, so one batch at most is held.
    saver = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="sdjax-png") if writer else None
    writing: list[concurrent.futures.Future] = []

    def written() -> None:
        for future in writing:
            future.result()   # raises the write's error (a full disk) here
        writing.clear()

    start = time.perf_counter()
    first_index, release, outputs = 0, (lambda: None), None
    try:
        if writer:   # another run into out_dir at the same time numbers past this one's images
            first_index, release = reserve_indices(out_dir, len(jobs))
            if req.save_control_images:   # (the control images as made, to see what a preprocessor found)
                extra += [save_png(images[0], out_dir / f"{first_index:05d}-control{k}.png")
                          for k, images in enumerate(made)]
        with CompileTimer() as compile_timer:
            # The pipeline dispatches each batch before handing over the one before it, so the
            # devices make batch k + 1 while this loop writes batch k.
            outputs = pipe.batches([p for p, _ in jobs], negative, seeds=[s for _, s in jobs],
                                   num_inference_steps=req.steps, guidance_scale=req.guidance_scale,
                                   height=req.height, width=req.width, scheduler=req.scheduler, batch_size=per_call,
                                   return_intermediates=picks, progress=step_bar,
                                   scheduler_options=req.scheduler_options, clip_skip=req.clip_skip,
                                   init_images=init, strength=strength, mask_images=mask,
                                   mask_padding=req.mask_padding, mask_blur=req.mask_blur,
                                   masked_content=req.masked_content,
                                   prompt_weighting=req.prompt_weighting,
                                   hires=hires, emphasis=req.emphasis, **controlled, **varied)
            for batch, out in zip(bar, outputs, strict=True):
                padded = batch + [batch[-1]] * (per_call - len(batch))   # one decoder program for every batch
                noise = None   # the trajectory's first frame: the seed's noise, or the image img2img starts from
                if req.trajectory:
                    at = generated + np.minimum(np.arange(len(padded)), len(batch) - 1)   # (the padding repeats)
                    noise = ([init.astype(np.float32) / 255] * len(padded) if init is not None
                             else noise_images(pipe, [s for _, s in padded], req.height, req.width,
                                               seed_resize_from=req.seed_resize_hw,
                                               **({} if variations[0] is None else dict(
                                                   variation_seeds=[variations[i] for i in at],
                                                   variation_strength=req.variation_strength))))
                generated += len(batch)
                _stop_together(written if writer else None)
                if not writer:
                    continue
                for b, (prompt, seed) in enumerate(batch):
                    variation = variations[generated - len(batch) + b]
                    index = first_index + len(files)
                    params = a1111_parameters(prompt, negative, steps=req.steps, scheduler=req.scheduler,
                                              guidance_scale=req.guidance_scale, seed=seed, width=req.width,
                                              height=req.height, model=req.model, vae=req.vae,
                                              scheduler_options=png_options, clip_skip=req.clip_skip,
                                              loras=loras,
                                              denoising_strength=strength if hires is None else hires.strength,
                                              hires_scale=None if hires is None else hires.scale,
                                              hires_steps=None if hires is None else hires.steps,
                                              hires_upscaler="latent" if hires is None else hires.upscaler,
                                              **({} if hires is None else dict(
                                                  hires_scheduler=hires.scheduler,
                                                  hires_scheduler_options=hires.scheduler_options,
                                                  hires_guidance_scale=hires.guidance_scale,
                                                  hires_prompt=hires.prompts and hires.prompts[0],
                                                  hires_negative_prompt=hires.negative_prompts
                                                  and hires.negative_prompts[0])),
                                              prompt_weighting=req.prompt_weighting, emphasis=req.emphasis,
                                              variation_seed=variation, variation_strength=req.variation_strength,
                                              seed_resize_from=req.seed_resize_hw,
                                              mask_blur=None if req.mask is None else req.mask_blur,
                                              masked_content=None if req.mask is None else req.masked_content,
                                              mask_invert=req.mask is not None and req.mask_invert,
                                              mask_padding=req.mask_padding,
                                              controlnets=units,
                                              embeddings=embeddings_used(pipe.tokenizer, embeddings, "\n".join(
                                                  [prompt, negative, req.hires_prompt or "",
                                                   req.hires_negative_prompt or ""])))
                    files.append(out_dir / image_file_name(index, seed, prompt))
                    writing.append(saver.submit(save_png, out.images[b], files[-1], params))
                    if req.grid:   # as 8-bit, a quarter of the float images' memory over a long run
                        images_for_grid.append(as_pil(out.images[b]))
                        grid_params = grid_params or params   # A1111's grids carry their first image's
                    if req.trajectory:
                        frames, labels = output_trajectory(out, b, sched, noise[b],
                                                           "init image" if init is not None else "noise")
                        extra += [out_dir / image_file_name(index, seed, prompt, "-trajectory"),
                                  out_dir / image_file_name(index, seed, prompt, "-trajectory", "gif")]
                        writing.append(saver.submit(save_png, image_strip(frames, labels), extra[-2], params))
                        writing.append(saver.submit(save_gif, frames, extra[-1]))
            written()
        if req.grid and writer:
            # one row per prompt when there are several (the jobs are prompt-major); else near-square
            columns = (len(jobs) // len(req.prompts) if len(req.prompts) > 1 and len(images_for_grid) == len(jobs)
                       else None)
            extra.append(save_png(image_grid(images_for_grid, columns), out_dir / f"{first_index:05d}-grid.png",
                                  grid_params))
    finally:
        if outputs is not None:
            outputs.close()   # a write error or Ctrl-C mid-run: the pipeline's lock and step bar are let go now
        if saver is not None:
            saver.shutdown(wait=True)   # also on Ctrl-C: the files listed so far are complete
        release()
    if step_bar is not None:
        step_bar.close()
    seconds = time.perf_counter() - start
    return SampleResult(files, extra, generated, seconds, compile_timer.seconds)
