"""``StableDiffusion``: load a pipeline folder (or Hub repo) and turn prompts and seeds into images."""
from __future__ import annotations

import dataclasses
import functools
import math
import re
import threading
import warnings
import weakref
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence, TypeVar, cast

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sdjax import parallel, sampling
from sdjax.models import AutoencoderKL, CLIPTextModel, ControlNetModel, UNet2DConditionModel
from sdjax.models.unet import skip_channels
from sdjax.schedulers import (SCHEDULERS, carried_options, make_noise_schedule, make_scheduler,
                               pipeline_scheduler_config)
from sdjax.text import (check_emphasis, composable_parts, edited_prompts, load_tokenizer, tokenize,
                        tokenize_weighted, window_count)
from sdjax.weights import (SINGLE_FILE_SUFFIXES, CheckpointError, fetch_missing_bin_weights, has_weights, hub_files,
                           is_url, load_controlnet_file, load_single_file, load_vae_file, prepare_single_file,
                           read_config, read_json_object, read_lora, read_textual_inversion, resolve_dtype,
                           resolve_model_dir, save_pipeline, save_single_file, with_variant)

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
PARTS = {"text_encoder": CLIPTextModel, "unet": UNet2DConditionModel, "vae": AutoencoderKL}  # folder -> model
MAX_SEED = 2**32 - 1


def is_single_file(model: str | Path) -> bool:
    """Whether a ``--model`` names a single-file checkpoint (an existing file, a path with a
    checkpoint file's suffix that is not a folder, or a URL) rather than a pipeline folder (even
    one named ``my-finetune.ckpt``) or a Hub repo id."""
    path = Path(model).expanduser()
    return is_url(model) or path.is_file() or (not path.is_dir() and path.suffix in SINGLE_FILE_SUFFIXES)


def load_pipeline(model: str | Path, *, model_config: str | Path | None = None, dtype=jnp.float32,
                  variant: str | None = None, vae: str | Path | None = None, mesh=None,
                  ema_weights: bool = False) -> "StableDiffusion":
    """A pipeline from a ``--model`` as sample.py and train.py take it: a single-file checkpoint
    (with the configs and tokenizer of ``model_config``; default: the pipeline folder ``X/`` beside
    ``X.safetensors`` when there is one, else SD v1.5's; ``ema_weights``: its UNet's EMA copy, see
    `StableDiffusion.from_single_file`), or a pipeline folder or
    Hub repo id; with ``vae`` (``--vae``, see `load_vae`) in place of the model's own VAE. Raises
    `CheckpointError` for an option that does not fit the kind of model."""
    problem = model_options_problem(model, model_config, variant, ema_weights)
    if problem:
        raise CheckpointError(problem)
    if is_single_file(model):
        beside = Path(model).expanduser().with_suffix("")   # train.py's RUN/final.safetensors beside RUN/final/
        if (model_config is None and not is_url(model) and Path(model).expanduser().is_file()
                and (beside / "model_index.json").is_file()):
            warnings.warn(f"{model}: its configs, tokenizer and scheduler config from {beside} beside it "
                          "(--model-config / model_config to use others)", stacklevel=2)
            model_config = str(beside)
        return StableDiffusion.from_single_file(model, config=model_config or DEFAULT_MODEL, dtype=dtype, vae=vae,
                                                mesh=mesh, ema_weights=ema_weights)
    return StableDiffusion.from_pretrained(model, dtype=dtype, variant=variant, vae=vae, mesh=mesh)


def load_vae(vae: str | Path, config, *, dtype=jnp.float32, variant: str | None = None) -> AutoencoderKL:
    """The VAE that ``vae`` names, to use in a pipeline in place of its own (as the fine-tuned
    ``sd-vae-ft-mse`` often is with SD v1.5): a weights file (`weights.load_vae_file`: the original
    layout of ``vae-ft-mse-840000-ema-pruned.safetensors``, or diffusers'; ``config``, the
    pipeline's VAE config, gives its architecture), a diffusers VAE folder or Hub repo id
    (``config.json`` and weights, as ``stabilityai/sd-vae-ft-mse``), or a pipeline folder (its
    ``vae/``). ``variant`` (the pipeline's, e.g. ``"fp16"``): a local folder's variant weights
    where it has them, else its plain ones; a Hub repo's plain weights are loaded either way."""
    if is_url(vae):
        raise CheckpointError(f"{vae}: a VAE loads from a local file, a folder or a Hub repo id (OWNER/NAME); "
                              "download the file and pass its path")
    path = Path(vae).expanduser()
    if path.is_file() or (not path.is_dir() and path.suffix in SINGLE_FILE_SUFFIXES):
        if config is None:
            raise CheckpointError(f"{vae}: a VAE weights file takes its architecture from the model's VAE config "
                                  "(vae/config.json), which this model does not have: give a VAE folder instead")
        return load_vae_file(path, config, dtype=dtype)
    if not path.exists() and (path.is_absolute() or str(vae).startswith((".", "~")) or str(vae).count("/") != 1):
        raise CheckpointError(f"{vae}: no such VAE file or folder (vae= / --vae takes a weights file, a VAE or "
                              "pipeline folder, or a Hub repo id OWNER/NAME)")
    if path.is_dir() and not (path / "config.json").is_file() and (path / "vae").is_dir():
        path = path / "vae"   # a pipeline folder
    if path.is_dir():
        return AutoencoderKL.from_pretrained(
            path, dtype=dtype, variant=variant if variant and has_weights(path, AutoencoderKL, variant) else None)
    return AutoencoderKL.from_pretrained(vae, dtype=dtype)


def _as_vae(vae: AutoencoderKL | str | Path, config, dtype, variant: str | None = None) -> AutoencoderKL:
    """``vae=`` of the loaders: a model as it is, or what `load_vae` loads (in ``dtype``);
    ``config``: the model's own VAE config, or None where it has none."""
    if not isinstance(vae, (AutoencoderKL, str, Path)):
        raise TypeError(f"vae must be an AutoencoderKL, or a path or Hub repo id of one; got {type(vae).__name__}")
    model = vae if isinstance(vae, AutoencoderKL) else load_vae(vae, config, dtype=dtype, variant=variant)
    if config is not None and model.config.latent_channels != config.latent_channels:   # before check_parts_fit
        given = "the AutoencoderKL given" if isinstance(vae, AutoencoderKL) else str(vae)
        raise CheckpointError(f"vae={given}: its latents have {model.config.latent_channels} channels, this "
                              f"model's {config.latent_channels} (its UNet denoises those): a VAE of another model")
    return model


def _part_configs(root: Path, vae) -> dict:
    """The models' configs of a pipeline folder; without the VAE's when ``vae`` replaces it and
    the folder has none (a given VAE brings its own config; a VAE weights file needs the folder's)."""
    return {part: read_config(root / part, model_cls)[0] for part, model_cls in PARTS.items()
            if not (part == "vae" and vae is not None and not (root / part / "config.json").is_file())}


def model_options_problem(model: str | Path, model_config: str | Path | None, variant: str | None,
                          ema_weights: bool = False) -> str | None:
    """Why these ``--model`` options do not go together, or None."""
    if variant and is_single_file(model):
        return f"--variant {variant}: picks files in a pipeline folder; the single file {model} has none"
    if model_config and not is_single_file(model):
        return f"--model-config {model_config}: only for a single-file --model (given {model})"
    if ema_weights and not is_single_file(model):
        return (f"--ema-weights: picks the EMA copy in a single-file training checkpoint (as v1-5-pruned.ckpt); "
                f"a pipeline folder or Hub repo ({model}) holds one set of UNet weights")
    return None


def _tokenizer_and_scheduler(root: Path) -> dict:
    """The tokenizer and scheduler config of a pipeline folder, as `StableDiffusion` takes them."""
    if (root / "final").is_dir() and not (root / "scheduler").is_dir():   # a train.py output folder
        hint = f"it looks like a train.py output folder: its exported pipeline is {root / 'final'}"
    elif root.parent.name == "checkpoints" and root.name.isdigit():        # one of its Orbax checkpoints
        hint = (f"it looks like a training checkpoint: export it with train.py --output-dir {root.parent.parent} "
                f"--export --export-step {root.name}, then load the export folder")
    elif (root.parent / "model_index.json").is_file():                      # one model of a pipeline (its unet/)
        hint = f"it looks like the {root.name} of the pipeline {root.parent}: load that folder"
    else:
        hint = "is this a diffusers pipeline folder?"
    config_file = root / "scheduler" / "scheduler_config.json"
    scheduler_config = read_json_object(config_file, f"{root}: no scheduler/scheduler_config.json ({hint})")
    try:   # the noise schedule every scheduler is built from: a bad value is the file's, said at load
        make_noise_schedule(scheduler_config)
    except (ValueError, TypeError, NotImplementedError) as e:
        raise CheckpointError(f"{config_file}: {e}") from e
    return dict(tokenizer=load_tokenizer(root), scheduler_config=scheduler_config)


HIRES_UPSCALERS = ("latent", "lanczos")
HIRES_STRENGTH = 0.7   # the second pass's denoising strength by default, as A1111's


@dataclasses.dataclass(frozen=True)
class HiresFix:
    """AUTOMATIC1111's "Hires. fix" for ``pipe(..., hires=HiresFix())``: each image is made at the
    call's size (the first pass), enlarged ``scale`` times (each side ``int(side * scale)``, rounded down
    to a multiple of 8) and denoised again at that size from ``strength`` of the schedule on
    (img2img, the second pass: ``steps`` steps, default the call's), with the same prompts, seeds,
    scheduler, guidance and clip skip. ``upscaler``: ``"latent"`` (A1111's default "Latent": the first
    pass's latents resized bilinearly, `sampling.upscale_latents`, no VAE round trip) or ``"lanczos"``
    (its image decoded, resized with PIL's Lanczos and encoded again, as img2img encodes init images).
    The second pass's own settings, as A1111 1.6+ has them (None, the default: the call's):
    ``scheduler`` (A1111's "Hires sampler"), with the call's ``scheduler_options`` that it takes (all of
    them for the same scheduler: A1111's "Use same scheduler") updated with ``scheduler_options`` (a
    Karras schedule of its own, ``{"use_karras_sigmas": True}``: A1111's "Hires schedule type");
    ``prompts`` and ``negative_prompts`` ("Hires prompt", "Hires negative prompt": a string, or one per
    image, broadcast with the call's lists); ``guidance_scale`` (Forge's "Hires CFG Scale")."""
    scale: float = 2.0
    steps: int | None = None
    strength: float = HIRES_STRENGTH
    upscaler: str = "latent"
    scheduler: str | None = None
    scheduler_options: dict | None = None
    prompts: str | Sequence[str] | None = None
    negative_prompts: str | Sequence[str] | None = None
    guidance_scale: float | None = None

    def __post_init__(self):
        scale, steps, strength = self.scale, self.steps, self.strength
        if isinstance(scale, bool) or not isinstance(scale, (int, float, np.integer, np.floating)) \
                or not math.isfinite(scale) or scale <= 1:
            raise ValueError(f"HiresFix scale={scale!r}: must be a number above 1 (the first pass's size times it)")
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1):
            raise ValueError(f"HiresFix steps={steps!r}: must be a whole number >= 1, or None (the call's steps)")
        if isinstance(strength, bool) or not isinstance(strength, (int, float, np.integer, np.floating)) \
                or not 0 < strength <= 1:
            raise ValueError(f"HiresFix strength={strength!r}: must be a number in (0, 1] (the share of the second "
                             "pass's schedule that is run; A1111's default 0.7)")
        if self.upscaler not in HIRES_UPSCALERS:
            raise ValueError(f"HiresFix upscaler={self.upscaler!r}: choose one of {', '.join(HIRES_UPSCALERS)}")
        if self.scheduler is not None and self.scheduler not in SCHEDULERS:
            raise ValueError(f"HiresFix scheduler={self.scheduler!r}: choose one of {', '.join(SCHEDULERS)}, or None "
                             "(the call's)")
        if self.scheduler_options is not None and not isinstance(self.scheduler_options, dict):
            raise TypeError(f"HiresFix scheduler_options={self.scheduler_options!r}: must be a dict of options "
                            "({'use_karras_sigmas': True}) or None")
        for name in ("prompts", "negative_prompts"):
            texts = getattr(self, name)
            if texts is not None:
                texts = [texts] if isinstance(texts, str) else texts
                if not isinstance(texts, (list, tuple)) or not texts or not all(isinstance(t, str) for t in texts):
                    raise TypeError(f"HiresFix {name}={getattr(self, name)!r}: must be a string, a list of strings "
                                    "(one per image) or None (the call's)")
                object.__setattr__(self, name, tuple(texts))   # (a list given is not changed after)
        g = self.guidance_scale
        if g is not None and (isinstance(g, bool) or not isinstance(g, (int, float, np.integer, np.floating))
                              or not math.isfinite(g)):
            raise ValueError(f"HiresFix guidance_scale={g!r}: must be a finite number, or None (the call's)")

    def size(self, height: int, width: int) -> tuple[int, int]:
        """The second pass's (height, width) for a first pass of this size."""
        return int(height * self.scale) // 8 * 8, int(width * self.scale) // 8 * 8

    def second_scheduler(self, scheduler: str, options: dict | None) -> tuple[str, dict]:
        """The second pass's scheduler and its options, for a call with ``scheduler`` and ``options``."""
        name = self.scheduler or scheduler
        return name, {**carried_options(name, scheduler, options), **(self.scheduler_options or {})}


@dataclasses.dataclass
class StableDiffusionOutput:
    """What `StableDiffusion.__call__` returns: the images, and the prompt, negative prompt and seed
    each was made with (after broadcasting); with ``return_intermediates``, the predicted clean
    images at the model-call indices ``intermediate_steps``."""
    images: np.ndarray                    # float32 [B, H, W, 3] in [0, 1]
    prompts: list[str]
    negative_prompts: list[str]
    seeds: list[int]
    intermediates: np.ndarray | None = None   # [S, B, H, W, 3]: predicted clean image at chosen steps
    intermediate_steps: list[int] | None = None

    def to_pil(self):
        """The images as a list of PIL images."""
        from sdjax.images import as_pil
        return [as_pil(img) for img in self.images]


class _Bar(Protocol):
    """A progress bar of your own for ``progress=`` (a ``tqdm``, ...): advanced by ``update(n)``."""

    def update(self, n: int, /) -> object: ...


def _progress_bars(progress, total_steps: int):
    """What ``progress`` asks for: (a bar counting denoising steps or None, whether this call made it
    and must close it, whether to show a bar over batches instead)."""
    # Identity and type checks only: a tqdm bar's == compares bars and fails on a string.
    if progress is None or progress is False:
        return None, False, False
    if isinstance(progress, str) and progress == "batches":
        return None, False, True
    if progress is True or (isinstance(progress, str) and progress == "steps"):
        from tqdm.auto import tqdm
        return tqdm(total=total_steps, desc="steps", unit="step"), True, False
    if not isinstance(progress, str) and callable(getattr(progress, "update", None)):
        return progress, False, False
    raise ValueError(f"progress={progress!r}: expected True, False, 'steps', 'batches' or a bar with update(n)")


def _wait_interruptibly(arrays: Sequence[jax.Array]) -> None:
    """Wait for ``arrays`` so that Ctrl-C and SIGTERM act at once. Python runs signal handlers only
    between bytecodes, so a fetch blocked in ``np.asarray`` put them off until the batch was done
    (minutes on a CPU), and then dropped it. A thread blocks on the arrays instead, and this one
    waits on an Event: it wakes the moment they are ready (a sleep between ``is_ready`` polls would
    add to every call that the benchmarks time), and every 50 ms to let Python run the handlers of
    signals that arrived meanwhile (a signal delivered to another of the process's threads, or
    ``_thread.interrupt_main``, does not interrupt the wait itself). A computation's error is left
    for the fetch that follows, which raises it."""
    if all(a.is_ready() for a in arrays):
        return
    done = threading.Event()

    def wait() -> None:
        try:
            jax.block_until_ready(arrays)
        except Exception:   # noqa: BLE001 - raised again by the caller's fetch
            pass
        finally:
            done.set()
    threading.Thread(target=wait, name="sdjax-wait", daemon=True).start()
    while not done.wait(0.05):
        pass


_EXPECTED = {"prompts": "a string or a list of strings", "negative_prompts": "a string or a list of strings",
             "seeds": "an integer, a list of integers or an integer array",
             "variation_seeds": "an integer, a list of integers or an integer array"}


def _tokenize_edited(tokenizer, prompts: list[str], steps: int, calls: int, kind: str, compose: bool = False,
                     emphasis: str = "original"):
    """`tokenize_weighted` of prompts in AUTOMATIC1111's syntax, their prompt editing included
    (`sdjax.text.edited_prompts` over ``steps`` and the run's ``calls`` model calls): ids and weights
    [n, T] and no phases where every prompt has one text for the whole run (that text's: the prompt
    itself where it has no editing); else ids and weights [n, P, T], each prompt's distinct texts (its
    last repeated up to the call's most, P), and the phases int32 [n, calls]. As a dict of `generate`'s
    inputs (the ids under "ids").

    ``compose`` (prompts, not negative prompts: A1111 reads ``AND`` in those only): each prompt's
    `composable_parts`; where one has several, or a weight other than 1, each image's texts are those
    of its K parts (the call's most; an image with fewer has parts of weight 0), the phases int32
    [n, K, calls], with the parts' weights [n, K] and, where an image's parts take different window
    counts, each text's own length [n, P] (A1111 lines them up by repeating the last state). ``emphasis``:
    A1111's Emphasis setting (`sdjax.text.chunk_weighted`); "ignore" and "none" give no weights (their
    tokens' are all 1, and A1111 applies none)."""
    parts = {p: composable_parts(p) if compose else [(p, 1.0)] for p in dict.fromkeys(prompts)}
    edits = {text: edited_prompts(text, steps, calls) for ps in parts.values() for text, _ in ps}
    if all(len(ps) == 1 and ps[0][1] == 1.0 for ps in parts.values()):
        texts_of = {p: edits[ps[0][0]][0] for p, ps in parts.items()}
        phases_of = {p: [edits[ps[0][0]][1]] for p, ps in parts.items()}
        weights_of = lengths_of = None
    else:   # AND: each image's texts are its parts' in turn
        K = max(len(ps) for ps in parts.values())
        texts_of, phases_of, weights_of, lengths_of = {}, {}, {}, {}
        window = tokenizer.model_max_length
        for p, ps in parts.items():
            texts, phases, lengths = [], [], []
            for text, _ in ps:
                part_texts, part_phases = edits[text]
                phases.append([len(texts) + phase for phase in part_phases])
                texts += part_texts   # (a part's texts are encoded together in A1111: its longest's windows)
                lengths += [window * window_count(tokenizer, part_texts, emphasis=emphasis)] * len(part_texts)
            texts_of[p], lengths_of[p] = texts, lengths
            phases_of[p] = phases + [[0] * calls] * (K - len(ps))
            weights_of[p] = [w for _, w in ps] + [0.0] * (K - len(ps))
    P = max(len(texts) for texts in texts_of.values())
    weighted = emphasis in ("original", "no_norm")
    if P == 1 and weights_of is None:
        ids, weights = tokenize_weighted(tokenizer, [texts_of[p][0] for p in prompts], kind=kind, emphasis=emphasis)
        return {"ids": ids, "weights_BT": weights} if weighted else {"ids": ids}
    pad = lambda x: x + [x[-1]] * (P - len(x))  # noqa: E731
    ids, weights = tokenize_weighted(tokenizer, [t for p in prompts for t in pad(texts_of[p])], kind=kind,
                                     emphasis=emphasis)
    n = len(prompts)
    phases = np.asarray([phases_of[p] for p in prompts], np.int32)
    out = {"ids": ids.reshape(n, P, -1), "phases_BC": phases if weights_of is not None else phases[:, 0]}
    if weighted:
        out["weights_BT"] = weights.reshape(n, P, -1)
    if weights_of is not None:
        out["part_weights_BK"] = np.asarray([weights_of[p] for p in prompts], np.float32)
        if any(len(set(lengths)) > 1 for lengths in lengths_of.values()):
            out["lengths_BP"] = np.asarray([pad(lengths_of[p]) for p in prompts], np.int32)
    return out


def _weighted_text(tokenizer, prompts: list[str], negatives: list[str], steps: int, calls: int,
                   emphasis: str = "original"):
    """Prompts and negative prompts in AUTOMATIC1111's syntax for a run of ``calls`` model calls over
    ``steps`` steps: their ids and the sampler's text inputs (weights, and phases where a text edits,
    and the parts' weights where a prompt has ``AND``). One window count for the prompts and one for the
    negative prompts (each their longest): every batch runs the same program; if the two differ, the
    UNet runs on each apart, as A1111 does by default."""
    cond = _tokenize_edited(tokenizer, prompts, steps, calls, "prompt", compose=True, emphasis=emphasis)
    uncond = _tokenize_edited(tokenizer, negatives, steps, calls, "negative prompt", emphasis=emphasis)
    inputs = {f"cond_{name}": value for name, value in cond.items() if name != "ids"}
    inputs.update({f"uncond_{name}": value for name, value in uncond.items() if name != "ids"})
    if emphasis == "no_norm":   # (a static argument: passed only where it is not the default, whose program stays)
        inputs["restore_mean"] = False
    return cond["ids"], uncond["ids"], inputs


def _as_list(x, name) -> list:
    """``x`` as a list: a string or integer as one item, an array's elements as Python scalars."""
    if x is None:
        return []
    if isinstance(x, (np.ndarray, jax.Array)):
        x = np.asarray(x)
        items = [x.item()] if x.ndim == 0 else x.tolist()
    elif isinstance(x, (str, int, np.integer)):
        items = [x]
    elif isinstance(x, (set, frozenset, dict)):   # no order to pair them by (a dict: only its keys)
        raise TypeError(f"{name} must be {_EXPECTED[name]}, got a {type(x).__name__} (use a list: its order pairs "
                        "prompts with seeds)")
    else:
        try:
            items = list(x)
        except TypeError:
            raise TypeError(f"{name} must be {_EXPECTED[name]}, got {type(x).__name__}") from None
    if not items:
        raise ValueError(f"{name} is empty")
    return items


def _weak(x):
    try:
        return weakref.ref(x)
    except TypeError:   # a Python scalar: hold it
        return lambda: x


_Method = TypeVar("_Method", bound=Callable[..., Any])


def _one_call_at_a_time(method: _Method) -> _Method:
    """Calls from several threads take turns: they share the step bar's ticker and the weights'
    refresh, and the devices would run them in turn anyway."""
    @functools.wraps(method)
    def serialized(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)
    return cast(_Method, serialized)   # the same signature, for type checkers


_upscale = jax.jit(sampling.upscale_latents, static_argnames="size_hw")
# `sampling.generate`'s static arguments, for the plain sampler and a ControlNet's
_STATIC_ARGS = ("latent_shape_HWC", "use_guidance", "return_predictions", "on_step", "clip_skip", "start",
                "return_latents", "decode", "restore_mean", "control_mode", "seed_resize_from_hw")


def _hold_replicated(models, pure_states) -> None:
    """Put each model's replicated weights (its pure dict) into the model itself, so that each device
    holds one copy (not the loaded one beside it on the first device)."""
    for model, pure in zip(models, pure_states):
        state = nnx.state(model)
        nnx.replace_by_pure_dict(state, pure)
        nnx.update(model, state)


def _lanczos(images_BHWC: np.ndarray, height: int, width: int) -> np.ndarray:
    """Images float [B, h, w, 3] in [0, 1] as their 8-bit pictures (as saved) resized to height x
    width with PIL's Lanczos (as ``--init-image`` is), float [B, height, width, 3] in [0, 1]."""
    from PIL import Image
    from sdjax.images import as_pil
    return np.stack([np.asarray(as_pil(image).resize((width, height), Image.Resampling.LANCZOS), np.float32) / 255
                     for image in images_BHWC])


def _decode(vae_graphdef, vae_state, latents_BHWC) -> jax.Array:
    """`sampling.decode_latents` of the VAE split into its graphdef and state (jitted per pipeline)."""
    return sampling.decode_latents(nnx.merge(vae_graphdef, vae_state), latents_BHWC)


class _StepTicker:
    """The host end of the sampler's per-step callback: advances the bar of the call in progress.

    One per pipeline, so the compiled sampler (for which it is a static argument) is reused
    from call to call whatever bar each call brings.
    """

    def __init__(self):
        self.bar, self.first = None, 0   # first: the loop index the call begins at (img2img: past 0)

    def __call__(self, i) -> None:
        if self.bar is not None and int(i) > self.first:   # model call i has started: call i - 1 is done
            self.bar.update(1)


def check_parts_fit(configs: dict, root=None) -> None:
    """The three models' configs (``{"text_encoder": ..., "unet": ..., "vae": ...}``) make one
    text-to-image pipeline: the UNet denoises the VAE's latents and attends to the text encoder's
    states. A `CheckpointError` names the fields (``root``: the pipeline folder whose config.json
    files they are) otherwise."""
    text_config, unet_config, vae_config = configs["text_encoder"], configs["unet"], configs["vae"]
    where = (lambda part: f"{root / part / 'config.json'}") if root is not None else (lambda part: part)
    latent = vae_config.latent_channels
    # A UNet takes the latents, or (an inpainting UNet) the latents, the mask and the masked image's latents.
    for field, allowed in (("in_channels", (latent, 2 * latent + 1)), ("out_channels", (latent,))):
        if getattr(unet_config, field) not in allowed:
            raise CheckpointError(
                f"{where('unet')}: {field}={getattr(unet_config, field)}, but the VAE's latents have {latent} "
                f"channels ({where('vae')} latent_channels): sdjax's UNets take {latent} channels (text-to-image) "
                f"or {2 * latent + 1} (inpainting) and give {latent}, not a UNet of other inputs (depth, "
                "instruct-pix2pix)")
    if any(dim != text_config.hidden_size for dim in unet_config.cross_attention_dim):
        raise CheckpointError(
            f"{where('unet')}: cross_attention_dim={list(unet_config.cross_attention_dim)}, but the text encoder's "
            f"states have {text_config.hidden_size} channels ({where('text_encoder')} hidden_size): the parts come "
            "from different models")


def _crop_to_mask(picture_HWC, mask_HW1, width: int, height: int, padding: int) -> tuple:
    """"Only masked" inpainting's inputs: the box of the picture around its mask's pixels above black
    (`mask_crop_region`) and that box of the mask (cut at half gray), each resized to ``width`` x ``height``
    as diffusers does (`resize_to_fill`); then the box, for `_pasted`."""
    from sdjax.images import as_pil, image_batch, mask_batch, mask_crop_region, resize_to_fill
    picture, mask = as_pil(picture_HWC), as_pil(mask_HW1[..., 0])
    region = mask_crop_region(mask_HW1[..., 0] > 0, width, height, padding)
    return (image_batch(resize_to_fill(picture.crop(region), width, height)),
            mask_batch(resize_to_fill(mask.crop(region), width, height)), region)


def _pasted(images_BHWC, start: int, pictures_BHWC, masks_BHW1, crop) -> np.ndarray:
    """Images ``start``, ``start + 1``, ... of a call with the pictures they were made from laid back over
    them where the masks (1 or one an image, like the pictures) are black: with ``crop`` (`_crop_to_mask`),
    made from that box of the picture and put back into it (`sdjax.images.paste_into`, 8-bit); else blended,
    image * mask + picture * (1 - mask). float32 [B, H, W, 3] of the pictures' size, in [0, 1]."""
    from sdjax.images import as_pil, paste_into
    pick = lambda a, i: a[0 if len(a) == 1 else start + i]  # noqa: E731
    if crop is None:
        return np.stack([image * pick(masks_BHW1, i) + pick(pictures_BHWC, i) * (1 - pick(masks_BHW1, i))
                         for i, image in enumerate(images_BHWC)]).astype(np.float32)
    return np.stack([np.asarray(paste_into(as_pil(pick(pictures_BHWC, i)), as_pil(pick(masks_BHW1, i)[..., 0]),
                                           as_pil(image), crop[2])) for i, image in enumerate(images_BHWC)]
                    ).astype(np.float32) / 255


class StableDiffusion:
    """Stable Diffusion v1.x text-to-image in JAX, data-parallel over every device (and host).

    >>> pipe = StableDiffusion.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5")
    >>> out = pipe("a photograph of an astronaut riding a horse", seeds=[0, 1, 2, 3])
    >>> out.to_pil()[0].save("astronaut.png")
    """

    def __init__(self, *, text_encoder: CLIPTextModel, unet: UNet2DConditionModel, vae: AutoencoderKL,
                 tokenizer, scheduler_config: dict, mesh=None, name: str = ""):
        check_parts_fit({"text_encoder": text_encoder.config, "unet": unet.config, "vae": vae.config})
        self.text_encoder, self.unet, self.vae = text_encoder, unet, vae
        self.tokenizer, self.scheduler_config, self.name = tokenizer, dict(scheduler_config), name
        self.mesh = mesh or parallel.data_mesh()
        parallel.data_size(self.mesh)   # a mesh without a "data" axis: refused here, not at the first call
        self._warned: set[tuple] = set()
        self._lock = threading.RLock()
        self.controlnet: ControlNetModel | None = None   # (load_controlnet)
        self._before_lora: dict[str, dict] = {}   # {part: {path: weight}}: what fuse_lora changed, as it was
        # The text encoder's token rows without textual inversion embeddings' (a single file holds these):
        # all of them, but where a saved pipeline's embeddings grew the table, the rows before theirs
        rows = text_encoder.config.vocab_size
        added = [i for i, t in tokenizer.added_tokens_decoder.items() if not t.special]
        self._token_rows = min(added) if added and max(added) == rows - 1 else rows
        self._build_programs()
        self._refresh_state()
        self._ticker = _StepTicker()
        self._hires_ticker = _StepTicker()   # the Hires fix's second pass's (its own first call)

    def _build_programs(self) -> None:
        """The models' graphdefs and the jitted sampler and decoder bound to them (again when a
        model's structure changes: a textual inversion embedding adds token rows)."""
        self._graphdefs = sampling.SDState(*(nnx.graphdef(m) for m in (self.text_encoder, self.unet, self.vae)))
        # The graphdefs are bound, not passed as a static argument: jit would hash them at every call
        # (7.8 ms for SD v1.5's on a 2-core CPU, ~1% of a GPU's 50-step image at batch 1).
        self._generate = jax.jit(
            functools.partial(sampling.generate, self._graphdefs),
            static_argnames=_STATIC_ARGS)
        self._decode = jax.jit(functools.partial(_decode, self._graphdefs.vae))
        # the samplers steered by ControlNets, by their graphdefs: ControlNets of one architecture (the
        # SD 1.5 ones of lllyasviel: canny, depth, ...) loaded in turn share one program and its compilations
        self._controlled_programs: dict[Any, Callable] = {}
        self._build_controlled()

    def _build_controlled(self) -> None:
        """The sampler with the ControlNet's graphdef bound (`load_controlnet`; several: a tuple of them),
        beside the plain one."""
        graphdef = None if self.controlnet is None else (
            tuple(map(nnx.graphdef, self.controlnet)) if isinstance(self.controlnet, tuple)
            else nnx.graphdef(self.controlnet))
        if graphdef is not None and graphdef not in self._controlled_programs:
            self._controlled_programs[graphdef] = jax.jit(
                functools.partial(sampling.generate, self._graphdefs, controlnet_graphdef=graphdef),
                static_argnames=_STATIC_ARGS)
        self._controlled = None if graphdef is None else self._controlled_programs[graphdef]

    def _refresh_state(self) -> None:
        models = (self.text_encoder, self.unet, self.vae)
        states = (nnx.to_pure_dict(nnx.state(m)) for m in models)
        self._state = parallel.replicate(sampling.SDState(*states), self.mesh)  # once, not per call
        _hold_replicated(models, self._state)   # (and the training state can share them)
        # The models' Variables and (weakly) the arrays they held: the check per call took 0.23 ms for
        # SD v1.5's 1130 weights on a 2-core CPU, where walking the models with nnx.state took ~100 ms.
        self._variables = [v for m in models for _, v in nnx.iter_graph(m) if isinstance(v, nnx.Variable)]
        self._seen = [_weak(v.get_raw_value()) for v in self._variables]

    def _sync_state(self) -> None:
        """Take up weights changed on the models since the last call (``nnx.update(pipe.unet, ...)``,
        an optimizer step, a Variable's value set): JAX arrays are immutable, so a changed weight is
        a new array in the same Variable. (The modules themselves are fixed when the pipeline is
        built: for other modules, build a new pipeline.)"""
        if any(ref() is not v.get_raw_value() for ref, v in zip(self._seen, self._variables)):
            self._refresh_state()
            self._before_lora = {}   # (new weights, as set_params' are: unfuse_lora keeps them)
        # A weight array donated to a jitted function (a train step given the pipeline's own arrays)
        # is deleted: a clear error here, where the compiled sampler could crash the process.
        if any(isinstance(a := v.get_raw_value(), jax.Array) and a.is_deleted() for v in self._variables):
            raise RuntimeError("the pipeline's weights have been deleted (donated to a jitted function, such as a "
                               "train step given the pipeline's own arrays): give it live weights with "
                               "pipe.set_params(...) (for a Trainer: trainer.sampling_pipeline()) before sampling")

    @property
    def graphdefs(self) -> sampling.SDState:
        """The three models' graphdefs, the static half of `sampling.generate`'s model arguments."""
        return self._graphdefs

    @property
    def state(self) -> sampling.SDState:
        """The three models' weights as `sampling.generate` takes them (replicated over the mesh),
        current with the models."""
        with self._lock:
            self._sync_state()
            return self._state

    @_one_call_at_a_time
    def set_params(self, *, unet: dict | nnx.State | None = None, text_encoder: dict | nnx.State | None = None,
                   vae: dict | nnx.State | None = None, partial: bool = False) -> None:
        """Replace model weights with new ones: nested dicts as ``nnx.to_pure_dict`` gives them
        (e.g. a fine-tune's; an ``nnx.State`` of them is taken too), each array cast to the
        pipeline's dtype, so the compiled sampler is reused. Every key must be one of the model's,
        with its shape; each model's dict must hold all of them unless ``partial=True``. Raises
        ValueError naming the key before anything is replaced. The new weights are the ones
        `unfuse_lora` keeps: the LoRAs fused before are no longer undone by it."""
        self._replace_params(unet=unet, text_encoder=text_encoder, vae=vae, partial=partial)
        self._before_lora = {}

    def _replace_params(self, *, unet=None, text_encoder=None, vae=None, partial: bool = False) -> None:
        """`set_params`' work, which `fuse_lora` and `unfuse_lora` do too (keeping what LoRAs changed)."""
        from flax.traverse_util import flatten_dict, unflatten_dict

        def key(path) -> str:
            return "/".join(map(str, path))
        updates = []
        for name, module, params in (("unet", self.unet, unet), ("text_encoder", self.text_encoder, text_encoder),
                                     ("vae", self.vae, vae)):
            if params is None:
                continue
            state = nnx.state(module, nnx.Param)
            current = flatten_dict(nnx.to_pure_dict(state))
            if isinstance(params, nnx.State):   # nnx.state(model, nnx.Param) as it is
                params = nnx.to_pure_dict(params)
            if not isinstance(params, dict):
                raise TypeError(f"set_params({name}=...): expected nested dicts of arrays (nnx.to_pure_dict), got "
                                f"{type(params).__name__}")
            new = flatten_dict(params)
            unknown, missing = sorted(set(new) - set(current), key=key), sorted(set(current) - set(new), key=key)
            if unknown:
                raise ValueError(f"set_params({name}=...): {key(unknown[0])} is not a weight of the {name} "
                                 f"({len(unknown)} unknown keys)")
            if missing and not partial:
                raise ValueError(f"set_params({name}=...): {len(missing)} weights missing, e.g. {key(missing[0])} "
                                 "(partial=True replaces only the ones given)")
            for path, value in new.items():
                if not jnp.issubdtype(jnp.result_type(value), jnp.floating):
                    raise ValueError(f"set_params({name}=...): {key(path)} has dtype {jnp.result_type(value)}; "
                                     "weights are floats")
                if tuple(np.shape(value)) != tuple(current[path].shape):
                    raise ValueError(f"set_params({name}=...): {key(path)} has shape {tuple(np.shape(value))}; "
                                     f"the model's is {tuple(current[path].shape)}")
            cast = {path: jnp.asarray(value, current[path].dtype) for path, value in new.items()}
            updates.append((module, state, unflatten_dict(cast)))
        for module, state, params in updates:   # all checked: now replace
            nnx.replace_by_pure_dict(state, params)
            nnx.update(module, state)
        self._refresh_state()

    # ------------------------------------------------------------------ loading / saving
    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | Path = DEFAULT_MODEL, *, revision: str | None = None,
                        dtype=jnp.float32, format: str | None = None, variant: str | None = None,
                        vae: AutoencoderKL | str | Path | None = None, mesh=None) -> "StableDiffusion":
        """Load a diffusers pipeline folder or Hub repo in any layout (safetensors, Flax msgpack with
        ``revision="flax"``/``"bf16"`` on the Hub, or .bin), cast to ``dtype``. ``variant`` picks
        variant files such as ``diffusion_pytorch_model.fp16.safetensors`` (``variant="fp16"``); in
        a local folder, a part without that variant loads its plain weights, as in diffusers.

        From the Hub only the files sdjax reads are downloaded (each model's config and its weights,
        the tokenizer, the scheduler config), not the rest of the repo: the safetensors weights (one
        file, or shards with their index), or, for a model folder that has none (older repos), its
        .bin in a second request.

        ``vae``: a VAE to use in place of the pipeline's own, an `AutoencoderKL` or what `load_vae`
        loads (then the pipeline's VAE weights are not read, nor downloaded)."""
        dtype = resolve_dtype(dtype)
        if mesh is not None:   # refused before any download or read
            parallel.data_size(mesh)
        if revision in ("flax", "bf16"):
            format = format or "flax"
        loaded = {part: model_cls for part, model_cls in PARTS.items() if not (part == "vae" and vae is not None)}
        patterns = ["model_index.json", "scheduler/scheduler_config.json", "tokenizer/*"]
        if vae is not None:   # (else among the VAE's own files below) its config: checked against the given VAE
            patterns.append("vae/config.json")
        for part, model_cls in loaded.items():
            patterns += [f"{part}/{name}" for name in hub_files(model_cls, format, variant)]
        root = resolve_model_dir(path_or_repo_id, None, revision, allow_patterns=patterns)
        if format != "flax":
            fetch_missing_bin_weights(path_or_repo_id, revision, root, loaded, variant)
        extras = _tokenizer_and_scheduler(root)  # before the weights: a bad folder fails fast
        configs = _part_configs(root, vae)
        replaced = {} if vae is None else {"vae": _as_vae(vae, configs.get("vae"), dtype, variant)}
        check_parts_fit({**configs, **{part: model.config for part, model in replaced.items()}}, root)
        variants = dict.fromkeys(loaded, variant)
        if variant:
            has_variant = [part for part, model_cls in loaded.items() if has_weights(root / part, model_cls, variant)]
            has_plain = [part for part, model_cls in loaded.items() if has_weights(root / part, model_cls)]
            if not has_variant and len(has_plain) == len(loaded):
                raise CheckpointError(f"{path_or_repo_id}: no part has {variant!r} variant weights (such as unet/"
                                      f"{with_variant('diffusion_pytorch_model.safetensors', variant)}): leave out "
                                      "variant= (sample.py / train.py --variant) to load its weights")
            if has_variant:   # as diffusers: the parts that have no such variant load their plain weights
                variants.update({part: None for part in has_plain if part not in has_variant})
        kw = dict(revision=revision, dtype=dtype, format=format)
        models = {part: model_cls.from_pretrained(root, subfolder=part, variant=variants[part], **kw)
                  for part, model_cls in loaded.items()}
        return cls(**models, **replaced, **extras, mesh=mesh, name=str(path_or_repo_id))

    @classmethod
    def from_single_file(cls, file, *, config: str | Path = DEFAULT_MODEL, revision: str | None = None,
                         dtype=jnp.float32, vae: AutoencoderKL | str | Path | None = None,
                         mesh=None, ema_weights: bool = False) -> "StableDiffusion":
        """Load a single-file checkpoint in the original Stable Diffusion layout (such as
        ``v1-5-pruned-emaonly.safetensors``, or a fine-tune saved by AUTOMATIC1111 / ComfyUI):
        ``.safetensors``, or a PyTorch ``.ckpt`` / ``.pt`` / ``.bin`` (needs torch; read with
        ``weights_only=True``). Where a file holds the UNet twice, the trained weights and their
        EMA copy (``model_ema.*``, as ``v1-5-pruned.ckpt``), the weights are used, as diffusers'
        ``from_single_file`` does; ``ema_weights=True`` loads the EMA copy (usually the better for
        images; what diffusers' SD v1.5 folder holds) and refuses a file without one. ``file`` is a
        local path or a Hugging Face Hub file URL (``https://huggingface.co/OWNER/NAME/blob/main/
        FILE``, downloaded into the Hub cache once).

        A single file has no configs or tokenizer: they come from ``config``, a diffusers pipeline
        folder or Hub repo id of the same architecture (only its config files, tokenizer and
        scheduler config are downloaded, ~2 MB), all but the UNet's input channels, which are the
        file's (its conv_in weight's, as AUTOMATIC1111 and diffusers tell the models apart): an
        inpainting checkpoint (``sd-v1-5-inpainting``: 9, the latents, the mask and the masked
        image's latents) loads with SD v1.5's configs as an inpainting UNet; other inputs
        (instruct-pix2pix's 8, depth's 5) are refused. ``vae``: a VAE to use in place of the
        file's, as in `from_pretrained`."""
        dtype = resolve_dtype(dtype)
        if mesh is not None:
            parallel.data_size(mesh)
        local_file = prepare_single_file(file)  # checked before the configs are fetched; a URL downloads later
        given = Path(str(config)).expanduser()
        if given.is_file():
            raise CheckpointError(f"{file}: config={config} is a file; a single file's configs and tokenizer come "
                                  "from a pipeline folder or Hub repo id (config=, sample.py/train.py --model-config)")
        if (given.is_dir() and not (given / "model_index.json").is_file()
                and (given.parent / "model_index.json").is_file()):
            raise CheckpointError(f"{file}: config={config} is the {given.name}/ folder of a pipeline; give the "
                                  f"pipeline folder, {given.parent}")
        patterns = ["model_index.json", "scheduler/scheduler_config.json", "tokenizer/*",
                    *(f"{part}/config.json" for part in PARTS)]
        try:
            root = resolve_model_dir(config, None, revision, allow_patterns=patterns)
        except CheckpointError as e:  # say why a folder or the Hub comes into it at all
            raise CheckpointError(f"{file}: a single file's configs and tokenizer come from a pipeline folder or "
                                  f"Hub repo (config=, sample.py/train.py --model-config): {e}") from e
        configs = _part_configs(root, vae)
        extras = _tokenizer_and_scheduler(root)
        replaced = {} if vae is None else {"vae": _as_vae(vae, configs.get("vae"), dtype)}
        check_parts_fit({**configs, **{part: model.config for part, model in replaced.items()}}, root)
        read = {part: cfg for part, cfg in configs.items() if part not in replaced}  # the file may lack the VAE
        models = {**load_single_file(local_file(), read, dtype=dtype, ema_weights=ema_weights), **replaced}
        return cls(**models, **extras, mesh=mesh, name=str(file))

    def save_pretrained(self, directory, *, format: str = "both", dtype=None, overwrite: bool = False) -> Path:
        """Write a diffusers pipeline folder that sdjax and diffusers' PyTorch pipeline both load.

        ``format``: ``"both"``, ``"pytorch"`` (safetensors) or ``"flax"`` (msgpack); ``dtype``
        casts the weights (e.g. ``"float16"``). A folder that exists and is not empty is refused
        unless ``overwrite=True``, which replaces the whole folder, files sdjax did not write
        included. The new folder is assembled beside it and renamed into place."""
        return save_pipeline(directory, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=self.unet,
                             vae=self.vae, scheduler_config=self.scheduler_config, format=format, dtype=dtype,
                             overwrite=overwrite)

    def save_single_file(self, file, *, dtype=None, overwrite: bool = False) -> Path:
        """Write the three models as one ``.safetensors`` file in the original Stable Diffusion
        layout, which AUTOMATIC1111, ComfyUI and diffusers' ``from_single_file`` load. ``dtype``
        casts the weights (``"float16"`` halves the file; default: as held). An existing file is
        refused unless ``overwrite=True`` (through a symlink, its target is replaced). Textual inversion
        embeddings (`load_textual_inversion`) are left out, with a warning: their token rows would make
        the file one that no loader reads."""
        rows = self.text_encoder.config.vocab_size
        if rows > self._token_rows:
            added = [t.content for _, t in sorted(self.tokenizer.added_tokens_decoder.items()) if not t.special]
            names = [t for t in added if not ((m := re.fullmatch(r"(.+)_\d+", t)) and m.group(1) in added)]
            warnings.warn(f"save_single_file: the textual inversion embeddings ({', '.join(names[:8])}"
                          f"{', ...' if len(names) > 8 else ''}) are not written: a single file holds the text "
                          f"encoder's {self._token_rows} token rows, which the web UIs and from_single_file load; "
                          "use the embedding files beside it", UserWarning, stacklevel=2)
        return save_single_file(file, text_encoder=self.text_encoder, unet=self.unet, vae=self.vae, dtype=dtype,
                                overwrite=overwrite, token_rows=self._token_rows)

    @_one_call_at_a_time
    def fuse_lora(self, file: str | Path, scale: float = 1.0) -> None:
        """Merge a LoRA file into the UNet's and text encoder's weights: each weight it changes
        becomes ``W + scale * alpha / rank * up @ down``, added in float32 and cast to the
        pipeline's dtype, as `set_params` does (the compiled sampler is reused). Several LoRAs stack
        (fuse each in turn). `unfuse_lora` undoes them: each weight a LoRA changes is kept as it was
        until then (device memory: those weights once more; for a LoRA of every attention and
        feed-forward layer of SD 1.5, as kohya's trainer makes by default, 352M weights: 0.7 GB in
        bfloat16 or float16, 1.4 GB in float32).

        Reads kohya / AUTOMATIC1111 files (``lora_unet_*``, ``lora_te_*``, LoCon convs included) and
        diffusers' (``unet.*.lora_A.weight``...), see `sdjax.weights.read_lora`; LoHa, LoKr, DoRA, a
        layer the models do not have or a shape that does not fit raise a ValueError
        (`CheckpointError`) naming the file and the key, before any weight is changed."""
        from flax.traverse_util import flatten_dict, unflatten_dict
        self._sync_state()   # (weights changed on the models since the last fuse: their own, to keep)
        deltas = read_lora(file, {"unet": self.unet.config, "text_encoder": self.text_encoder.config}, scale=scale)
        merged, before = {}, {}
        for part, changes in deltas.items():
            if not changes:
                continue
            current = flatten_dict(nnx.to_pure_dict(nnx.state(getattr(self, part), nnx.Param)))
            merged[part] = unflatten_dict({path: jnp.asarray(current[path], jnp.float32) + delta
                                           for path, delta in changes.items()})
            before[part] = {path: current[path] for path in changes}   # (the arrays themselves: no copy)
        if merged:
            self._replace_params(**merged, partial=True)
            for part, weights in before.items():   # (a weight an earlier LoRA changed: as it was before that one)
                self._before_lora[part] = {**weights, **self._before_lora.get(part, {})}

    @_one_call_at_a_time
    def unfuse_lora(self) -> None:
        """Undo `fuse_lora`: every weight the LoRAs fused since loading changed is put back as it
        was, bit for bit (the weights kept, not the changes subtracted), and the compiled sampler
        is reused. With nothing fused (or new weights since, by `set_params` or on the models
        themselves, which stay), nothing changes.
        To compare LoRA scales without loading the model again::

            for scale in (0.4, 0.8):
                pipe.fuse_lora("style.safetensors", scale)
                images[scale] = pipe("a castle", seeds=range(4)).images
                pipe.unfuse_lora()
        """
        from flax.traverse_util import unflatten_dict
        self._sync_state()   # (weights changed on the models since: kept, and nothing to undo)
        if self._before_lora:
            self._replace_params(**{part: unflatten_dict(w) for part, w in self._before_lora.items()}, partial=True)
        self._before_lora = {}

    @_one_call_at_a_time
    def load_controlnet(self, controlnet: ControlNetModel | str | Path | Sequence | None, *,
                        revision: str | None = None, variant: str | None = None) -> ControlNetModel | tuple[ControlNetModel, ...] | None:
        """Steer the images by a ControlNet: a `ControlNetModel`, a diffusers ControlNet folder or Hub
        repo id (``lllyasviel/control_v11p_sd15_canny``, ``.../control_v11f1p_sd15_depth``; ``variant`` picks
        its variant weights where it has them, else its plain ones, as for a pipeline's parts), or a file in
        the original layout (``control_v11p_sd15_canny.pth``, AUTOMATIC1111's ``models/ControlNet`` files:
        `sdjax.weights.load_controlnet_file`), loaded in the pipeline's dtype; ``None`` takes it away.
        Its control images are ``pipe(..., control_images=...)``; a call without them is made as before,
        by the program of before. A ControlNet made for another model (other block widths or text
        width, or control images at another scale than the VAE's) raises a `CheckpointError` naming
        the fields. Its weights are taken now: after changing them, load it again. Several ControlNets
        (a list: diffusers' ``MultiControlNetModel``, A1111's units) steer
        together, their residuals added; each call then gives a list of their control images. ControlNets
        of one architecture (lllyasviel's SD 1.5 canny, depth, ...) loaded in turn share one compiled
        program. Returns the ControlNet (a tuple of them)."""
        if isinstance(controlnet, (list, tuple)) and not controlnet:
            raise ValueError("load_controlnet([]): give a ControlNet, a list of them, or None")
        if controlnet is not None:   # (all loaded and checked before the pipeline's changes)
            given = controlnet if isinstance(controlnet, (list, tuple)) else [controlnet]
            models = tuple(self._checked_controlnet(c, revision, variant) for c in given)
            controlnet = models if len(models) > 1 else models[0]
            self._controlnet_state = parallel.replicate(
                jax.tree.map(lambda m: nnx.to_pure_dict(nnx.state(m)), controlnet,
                             is_leaf=lambda x: isinstance(x, ControlNetModel)), self.mesh)
            _hold_replicated(models, self._controlnet_state if len(models) > 1 else [self._controlnet_state])
        self.controlnet = controlnet
        self._build_controlled()
        return controlnet

    def _checked_controlnet(self, controlnet, revision, variant) -> ControlNetModel:
        """`load_controlnet`'s one ControlNet, loaded and checked against this pipeline."""
        if not isinstance(controlnet, ControlNetModel):
            path = Path(controlnet).expanduser()
            if path.suffix in SINGLE_FILE_SUFFIXES and not path.exists():
                raise CheckpointError(f"{controlnet}: no such ControlNet file")
            if path.is_file():   # (a folder or repo id is diffusers')
                controlnet = load_controlnet_file(controlnet, self.unet.config, dtype=self.unet.dtype)
            else:
                try:
                    controlnet = ControlNetModel.from_pretrained(controlnet, revision=revision, variant=variant,
                                                                 dtype=self.unet.dtype)
                except CheckpointError:
                    if variant is None:
                        raise
                    # (as a pipeline's part without the variant: its plain weights)
                    controlnet = ControlNetModel.from_pretrained(controlnet, revision=revision,
                                                                 dtype=self.unet.dtype)
        cn, unet = controlnet.config, self.unet.config
        for name, mine, theirs in (
                ("the residuals' channels (block_out_channels, layers_per_block)", skip_channels(cn),
                 skip_channels(unet)),
                ("down_block_types", cn.down_block_types, unet.down_block_types),
                ("cross_attention_dim", cn.cross_attention_dim, unet.cross_attention_dim),
                ("in_channels", cn.in_channels, self.vae.config.latent_channels),
                ("control image pixels a latent (conditioning_embedding_out_channels)", cn.image_scale,
                 self.vae_scale)):
            if mine != theirs:
                raise CheckpointError(f"the ControlNet's {name} are {mine}, this pipeline's {theirs}: a ControlNet "
                                      "made for another model (SD 1.x ControlNets steer SD 1.x models)")
        return controlnet

    @_one_call_at_a_time
    def load_textual_inversion(self, file: str | Path, token: str | None = None) -> str:
        """Add a textual inversion embedding's vectors to the tokenizer and text encoder, as diffusers'
        ``load_textual_inversion`` does, and return its token: write that word in a prompt (or a
        negative prompt) to use it. An embedding of n vectors becomes the tokens ``T``, ``T_1``, ...,
        ``T_{n-1}``, which prompts spell out from ``T`` alone (`sdjax.text.tokenize`); the tokenizer
        matches them in any letter case.

        Reads diffusers' files (``learned_embeds.safetensors`` / ``.bin``, token: the one inside) and
        AUTOMATIC1111's (``.safetensors``, ``.pt``, token: the file's name, ``EasyNegative``), see
        `sdjax.weights.read_textual_inversion`; ``token`` replaces the file's. A token the tokenizer
        already knows (a word of its vocabulary, an embedding loaded before) or that would be read as
        another embedding's further vector (``T_2`` beside ``T``), vectors of another width
        than the text encoder's or an unreadable file raise a ValueError (`CheckpointError`) naming
        them, before anything changes. The sampler compiles again at the next call (the text encoder's
        table grew). ``save_pretrained`` keeps the tokens and their vectors."""
        file = Path(file).expanduser()
        token, vectors = read_textual_inversion(file, token)
        width = self.text_encoder.config.hidden_size
        if vectors.shape[1] != width:
            raise CheckpointError(f"{file}: its vectors have width {vectors.shape[1]}; this text encoder's is {width} "
                                  "(an embedding made for another model?)")
        tokens = [token] + [f"{token}_{i}" for i in range(1, len(vectors))]
        vocab = self.tokenizer.get_vocab()
        known = {t.lower() for t in self.tokenizer.added_tokens_encoder}
        for t in tokens:
            if t in vocab or t.lower() in known or f"{t.lower()}</w>" in vocab:
                raise CheckpointError(f"{file}: the token {t!r} is already known to the tokenizer (a word of its "
                                      "vocabulary or an embedding loaded before): give the embedding another "
                                      "(token=...; an AUTOMATIC1111 file's is its name: rename the file)")
        # T_1, T_2, ... are T's further vectors (expand_embedding_tokens spells them out from T): a token
        # T_k beside an embedding T, or T beside a T_1, would make one embedding the other's rows
        base = re.fullmatch(r"(.+)_\d+", token)
        if (base and base.group(1).lower() in known) or f"{token.lower()}_1" in known:
            other = base.group(1) if base and base.group(1).lower() in known else f"{token}_1"
            raise CheckpointError(f"{file}: the token {token!r} would be read as a further vector of the embedding "
                                  f"{other!r} (an embedding of n vectors T is the tokens T, T_1, ..., T_{{n-1}}): "
                                  "give the embedding another (token=...; an AUTOMATIC1111 file's is its name)")
        embedding = self.text_encoder.text_model.embeddings.token_embedding
        table = embedding.embedding.get_value()
        self.tokenizer.add_tokens(tokens)
        ids = self.tokenizer.convert_tokens_to_ids(tokens)
        rows = max(table.shape[0], max(ids) + 1)
        grown = jnp.zeros((rows, width), table.dtype).at[: table.shape[0]].set(table)
        embedding.embedding.set_value(grown.at[jnp.asarray(ids)].set(jnp.asarray(vectors, table.dtype)))
        embedding.num_embeddings = rows
        self.text_encoder.config = dataclasses.replace(self.text_encoder.config, vocab_size=rows)
        self._build_programs()
        self._refresh_state()
        return token

    @property
    def vae_scale(self) -> int:
        """Pixels per latent along each side: 8 for SD's VAE (a downsampling per block but the last)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    # ------------------------------------------------------------------ sampling
    def make_scheduler(self, scheduler: str = "pndm", num_inference_steps: int = 50, **options):
        """The ``scheduler`` the way diffusers' StableDiffusionPipeline builds it from this model's
        scheduler config: with an outdated ``steps_offset`` or ``clip_sample: true`` corrected, as
        the pipeline does (a warning says so), then `schedulers.make_scheduler`. ``options``
        override config keys (and win over the corrections)."""
        config, changes = pipeline_scheduler_config(scheduler, self.scheduler_config)
        if changes and (scheduler, *changes) not in self._warned:   # once per pipeline and correction
            self._warned.add((scheduler, *changes))
            warnings.warn(f"{self.name or 'the model'}: scheduler/scheduler_config.json has outdated settings, "
                          f"corrected as diffusers' StableDiffusionPipeline does: {', '.join(changes)}", stacklevel=2)
        return make_scheduler(scheduler, config, num_inference_steps, **options)

    @_one_call_at_a_time
    def __call__(self, prompts: str | Sequence[str], negative_prompts: str | Sequence[str] | None = None,
                 seeds: int | Sequence[int] | np.ndarray | jax.Array = 0, num_inference_steps: int = 50,
                 guidance_scale: float = 7.5, height: int | None = None, width: int | None = None,
                 scheduler: str = "pndm", latents: np.ndarray | jax.Array | None = None,
                 *, batch_size: int | None = None, return_intermediates: int | Sequence[int] | None = None,
                 scheduler_options: dict | None = None, progress: bool | str | _Bar = False, clip_skip: int = 1,
                 init_images: Any = None, strength: float | None = None, mask_images: Any = None,
                 mask_padding: int | None = None, mask_blur: float = 0, masked_content: str = "original",
                 control_images: Any = None,
                 controlnet_conditioning_scale: float = 1.0, control_guidance_start: float = 0.0,
                 control_guidance_end: float = 1.0, control_mode: str | Sequence[str] = "balanced",
                 prompt_weighting: bool = False,
                 hires: HiresFix | None = None, hires_control_images: Any = None,
                 hires_control_mode: str | Sequence[str] | None = None, emphasis: str = "original",
                 variation_seeds: int | Sequence[int] | np.ndarray | None = None,
                 variation_strength: float = 0.0,
                 seed_resize_from: tuple[int, int] | None = None) -> StableDiffusionOutput:
        """Generate one image per (prompt, seed) (all of them in memory at the end: `batches`
        hands them over one batch at a time instead).

        ``prompts`` and ``seeds`` broadcast: one prompt with many seeds, many prompts with one seed
        (each image then gets that seed), or equal-length lists. ``negative_prompts`` likewise
        (default "": unconditional). ``latents``: optional initial noise [B, H/8, W/8, 4], unscaled
        N(0, 1), in place of the seeds' (its batch B broadcasts like the lists: B images, or one
        noise for every image when B is 1; the seeds still key the per-step noise of euler_a,
        dpmpp_2m_sde, ddpm and ddim with eta > 0, so give each image its own there). ``guidance_scale <= 1`` skips the
        unconditional pass. ``batch_size`` images are generated per compiled call (default: 4 per
        device), split over every device and so rounded up to a multiple of the device count; a
        last batch that is short is padded to the same shape, so one program serves the whole call.
        ``return_intermediates``: a count of evenly spaced steps, or the step indices, at which to
        return the predicted clean image (the "noise resolving into a picture" view; img2img: indices
        from the one its strength starts at).
        ``progress``: ``True`` or ``"steps"`` shows a bar over the denoising steps of every batch;
        ``"batches"`` one over batches; or pass your own bar (any object with ``update(n)``, e.g.
        a ``tqdm``), advanced once per UNet evaluation (PNDM: steps + 1). Step bars add one host
        callback per step to the compiled sampler (compiled once more, then reused); ``"batches"``
        and ``False`` add none.
        ``clip_skip``: "Clip skip" as AUTOMATIC1111 numbers it (model cards' "Clip skip: 2"): 1 (default)
        conditions on the text encoder's last layer, N on the N-th layer from the end (N-1 layers
        skipped), through the final layer norm either way; diffusers' ``clip_skip=k`` is N = k + 1. An
        integer in 1..num_hidden_layers; each value compiles its own program.
        ``height``, ``width``: pixels, multiples of 8 (default 512, or the init images' size).
        ``init_images`` (img2img): start from these images instead of pure noise, as diffusers'
        StableDiffusionImg2ImgPipeline does: each is encoded (a draw from the VAE posterior, keyed by
        its seed), noised to the point of the schedule that leaves ``strength`` of it to run (default
        0.8; 1 is almost text-to-image, small values keep the image), and denoised from there, so
        ``int(num_inference_steps * strength)`` steps run. A PIL image, a list of them, or an array
        [B or 1, H, W, 3] (NHWC) of uint8 pixels or floats in [0, 1]; its batch broadcasts like the
        lists (one image for every prompt and seed, or one per image). ``latents`` is then the noise
        added to them. Each strength compiles its own program (its step count is static).
        ``mask_images`` (inpainting, with ``init_images``): repaint the white part of each init image and keep
        the rest, as diffusers' StableDiffusionInpaintPipeline does. A PIL image (taken as grayscale), a list
        of them, or an array [B or 1, H, W] of bools, uint8 pixels or floats in [0, 1], of the init images'
        size, binarized at 0.5 (`sdjax.images.mask_batch`); its batch broadcasts like the init images'. The
        default ``strength`` is then 1 (from pure noise; below 1, from the noised init images). An
        inpainting model (a UNet of 9 input channels, e.g. stable-diffusion-inpainting) sees the mask and
        the masked image at every step; a text-to-image model's latents are put back to the init images'
        (noised to each step's level) where the mask is black, after every step. An inpainting model also
        makes images without a mask (text-to-image, img2img), conditioned as AUTOMATIC1111 does there.
        ``mask_padding`` (pixels, with one init image and one mask): "only masked" inpainting (AUTOMATIC1111's
        Inpaint area, diffusers' ``padding_mask_crop``): the box around the mask, that much wider on each side
        and grown to the aspect of ``height`` x ``width`` (default 512 x 512), is cut out of the picture,
        resized to ``height`` x ``width``, inpainted there, and put back (`sdjax.images.mask_crop_region`,
        `resize_to_fill`, `paste_into`); ``images`` are the picture's size, the picture itself (in 8 bits: a
        float picture's pixels rounded) where the mask is black. Small masks in large pictures get the
        model's full resolution. Not with ``return_intermediates``. The mask is cut at half gray first (as
        AUTOMATIC1111 cuts it): its box and paste are the black-and-white mask's, where diffusers boxes every
        pixel above black (a soft edge, a JPEG's near-black noise) and blends the paste with its grays: the
        same for black-and-white masks.
        ``mask_blur`` (pixels, default 0: none): AUTOMATIC1111's Mask blur, which softens the seam between the
        repainted part and the picture. Each mask (cut at half gray) is blurred by a Gaussian of that standard
        deviation (`sdjax.images.blur_mask`) and cut at half gray again for the model; the picture is then laid
        back over each image through the blurred mask, as A1111 does: with ``mask_padding``, the paste's mask;
        without, its grays doubled (A1111's overlay: the repainted part whole up to the cut, fading out
        beyond it) and ``images`` the init images' where it is black (an 8-bit picture's pixels exactly).
        Without a blur the images are the model's everywhere, as diffusers' (A1111 lays the picture back over
        them at 0 too). The intermediates are the model's.
        ``masked_content`` (with masks): AUTOMATIC1111's Masked content, what the repainted part starts from
        below strength 1: "original" (default: the picture), "fill" (the pictures with the part painted over
        by the colours around it before they are encoded, `sdjax.images.fill_masked`, through the blurred
        mask with ``mask_blur``), "latent_noise" or "latent_nothing" (so filled, then the seed's noise or
        zeros in the part's latents, `sdjax.sampling.generate`'s ``masked_noise_scale``; one compiled
        program for both), as A1111 makes them.
        ``control_images`` (with a ControlNet, `load_controlnet`): the control image (edges, depth, a pose) of
        each image, or one for all: a PIL image, a list of them, or an array [B or 1, H, W, 3] of uint8
        pixels or floats in [0, 1], of the images' size (``height`` x ``width``, which default to the
        control images'), as diffusers' StableDiffusionControlNetPipeline takes them (already processed: a
        canny edge map, not the photo; `sdjax.preprocess` makes one as A1111 does). The ControlNet's residuals,
        times ``controlnet_conditioning_scale``
        (default 1; an input: new scales compile nothing), are added to the UNet's at every step from
        ``control_guidance_start`` to ``control_guidance_end`` (shares of the steps run, default 0 and 1;
        AUTOMATIC1111's Guidance Start / End; diffusers' arguments, `sdjax.sampling.control_scales`). Also
        with img2img and inpainting (the ControlNet reads the latents alone, as diffusers' ControlNet img2img
        and inpainting pipelines do) and with ``hires``, in both passes, as A1111's ControlNet extension steers
        its Hires fix by default: the second with the window over its own steps and with
        ``hires_control_images``, control images at its size (``hires.size(height, width)``; A1111 resizes the
        control image given to each pass's size), by default the control images' 8-bit pictures resized to
        it with PIL's Lanczos; not with ``mask_padding``. With several ControlNets
        loaded: a list of their control images, one entry each, and scales and windows a number for all
        or a list of one each (diffusers' ``MultiControlNetModel``). ``control_mode`` (one for all, or a list
        of one each; static: each compiles its own program): AUTOMATIC1111's Control Mode, "balanced" (the
        above, default), "prompt" ("My prompt is more important": residual i of the n, the mid block's
        last, times 0.825 ** (n - 1 - i), ControlNet 1.1's soft weights) or "controlnet" ("ControlNet is more
        important": so weighted, and added to the prompt's rows of guidance alone, not the negative
        prompt's: ControlNet 1.1's guess mode), as A1111's extension applies them
        (`sdjax.sampling.ControlledUNet`); ``hires_control_mode`` the second pass's (default: ``control_mode``;
        A1111's extension takes "prompt"'s weights there after its canny preprocessor,
        `sdjax.preprocess.ControlUnit.hires_mode`).
        ``prompt_weighting``: read AUTOMATIC1111's emphasis syntax in the prompts and negative prompts, as
        A1111 does: ``(word)`` weights ``word`` by 1.1, ``[word]`` by 1/1.1, ``(word:1.5)`` by 1.5, nested
        groups multiply, ``\\(`` is a bracket (`sdjax.text.parse_prompt_attention`); each token's text
        states are multiplied by its weight and each prompt's states rescaled to their mean before
        (`sdjax.sampling.emphasize`). The weights are an input of the compiled program (new weights
        compile nothing); ``False`` (default): the brackets are words of the prompt, as in diffusers.
        With it, long prompts and ``BREAK`` are A1111's too (`sdjax.text.chunk_weighted`): a prompt is cut
        into chunks of 75 tokens (at ``BREAK``, and back to a comma among a full chunk's last 20 tokens;
        an embedding is not split), each encoded as a 77-token window of its own with its weights and
        mean restored per window, and the windows' states concatenated ([B, 77 * k, D]). k is the window
        count of the call's longest prompt (and apart from it, of its longest negative prompt), for every
        image (not per batch: `batches` compiles one program); shorter ones get empty windows (the empty
        prompt's) added. Where the two k differ, the prompt and the negative prompt go through the UNet
        apart (two calls a step), as A1111's default does. Each k compiles its own program; k = 1 is the
        program of before. Without weighting a prompt past 75 tokens is cut, as in diffusers.
        With it, A1111's prompt editing and alternation too (`sdjax.text.prompt_schedule`): ``a [cat:dog:0.5]``
        conditions the first half of the steps on the cat and the rest on the dog, ``[cat|dog]`` alternates
        step by step, in prompts and negative prompts, each model call on the text A1111's sampler takes
        (`sdjax.text.edited_prompts`). Each image's texts are encoded once and each call's picked from an
        input table (`sdjax.sampling.TextSchedule`); a call with editing compiles a program per count of
        texts, one without runs the program of before.
        With it, A1111's ``AND`` too (composable diffusion, `sdjax.text.composable_parts`): ``a cat AND a dog :0.8``
        guides each image by both parts at once, eps_u + g * sum_k w_k (eps_k - eps_u) (one UNet call of K + 1
        texts an image, `sdjax.sampling.Composition`); a prompt's trailing ``:number`` is its part's weight,
        also without ``AND`` (it scales the guidance); ``AND`` in a negative prompt is text, as in A1111. Needs
        ``guidance_scale`` above 1.
        ``emphasis`` (with ``prompt_weighting``): AUTOMATIC1111's Emphasis setting, one of
        `sdjax.text.EMPHASIS_MODES`: "original" (default, as above), "no_norm" (the weights without the mean
        restored), "ignore" (the syntax read, no weights applied), "none" (brackets and ``BREAK`` are words;
        windows, editing and ``AND`` are still read).
        ``variation_seeds`` and ``variation_strength`` (in [0, 1], default 0: none): AUTOMATIC1111's variation
        seed, each image's initial noise moved toward its variation seed's noise by the strength
        (`sdjax.sampling.vary_noise`, A1111's slerp): one seed with many variation seeds makes variations of
        one image. They broadcast like the seeds; not with ``latents``. The strength is an input (new
        strengths compile nothing); 0 leaves the noise as it is.
        ``seed_resize_from`` ((height, width) in pixels, multiples of 8): AUTOMATIC1111's "Seed resize from":
        each seed's noise (and its variation seed's) drawn at that size and laid over the middle of its
        noise at the images' size (`sdjax.sampling.seed_noise`), so that a seed's picture keeps its layout
        at another size; with ``hires``, the second pass's noise too. Not with ``latents``.
        ``hires``: AUTOMATIC1111's "Hires. fix", a `HiresFix`: each image is made at height x width as above
        (the first pass), enlarged (its latents resized, or its image with Lanczos) and denoised again at the
        larger size from the HiresFix's strength of its schedule on (img2img: the second pass, its noise drawn
        from the seed at the new latent size), with the same prompts, seeds, scheduler and settings (or the
        HiresFix's own scheduler, prompts and guidance scale); the images are the second pass's.
        Not with ``init_images`` or ``return_intermediates``. Each pass compiles its own program (the
        Lanczos upscaler's first pass is the program of a call without ``hires``).
        """
        outputs = list(self.batches(
            prompts, negative_prompts, seeds, num_inference_steps, guidance_scale, height, width, scheduler,
            latents, batch_size=batch_size, return_intermediates=return_intermediates,
            scheduler_options=scheduler_options, progress=progress, clip_skip=clip_skip,
            init_images=init_images, strength=strength, mask_images=mask_images, mask_padding=mask_padding,
            mask_blur=mask_blur, masked_content=masked_content, control_images=control_images,
            controlnet_conditioning_scale=controlnet_conditioning_scale, control_guidance_start=control_guidance_start,
            control_guidance_end=control_guidance_end, control_mode=control_mode, prompt_weighting=prompt_weighting,
            hires=hires, hires_control_images=hires_control_images, hires_control_mode=hires_control_mode,
            emphasis=emphasis,
            variation_seeds=variation_seeds, variation_strength=variation_strength,
            seed_resize_from=seed_resize_from))
        steps = outputs[0].intermediate_steps
        return StableDiffusionOutput(np.concatenate([o.images for o in outputs]),
                                     [p for o in outputs for p in o.prompts],
                                     [p for o in outputs for p in o.negative_prompts],
                                     [s for o in outputs for s in o.seeds],
                                     np.concatenate([o.intermediates for o in outputs], axis=1) if steps else None,
                                     steps)

    def batches(self, prompts: str | Sequence[str], negative_prompts: str | Sequence[str] | None = None,
                seeds: int | Sequence[int] | np.ndarray | jax.Array = 0, num_inference_steps: int = 50,
                guidance_scale: float = 7.5, height: int | None = None, width: int | None = None,
                scheduler: str = "pndm", latents: np.ndarray | jax.Array | None = None,
                *, batch_size: int | None = None, return_intermediates: int | Sequence[int] | None = None,
                scheduler_options: dict | None = None, progress: bool | str | _Bar = False, clip_skip: int = 1,
                init_images: Any = None, strength: float | None = None, mask_images: Any = None,
                mask_padding: int | None = None, mask_blur: float = 0, masked_content: str = "original",
                control_images: Any = None,
                controlnet_conditioning_scale: float = 1.0, control_guidance_start: float = 0.0,
                control_guidance_end: float = 1.0, control_mode: str | Sequence[str] = "balanced",
                prompt_weighting: bool = False,
                hires: HiresFix | None = None, hires_control_images: Any = None,
                hires_control_mode: str | Sequence[str] | None = None, emphasis: str = "original",
                variation_seeds: int | Sequence[int] | np.ndarray | None = None,
                variation_strength: float = 0.0,
                seed_resize_from: tuple[int, int] | None = None) -> Iterator[StableDiffusionOutput]:
        """The images of ``pipe(...)`` (same arguments, same images), one `StableDiffusionOutput`
        per compiled call of ``batch_size`` images, in order, for many seeds: write each batch's
        files and let it go, instead of holding every image. The arguments are checked now (a
        bad one raises here, before anything runs); the images are made as the iterator is
        consumed, the next batch dispatched to the devices before this one is handed over, so they
        keep working while the caller handles it. Leaving the loop early leaves that one batch to
        finish on the devices, unused. While iterating, other threads' calls on this pipeline
        wait; call it from within the loop only in the same thread (its step bar is then the
        inner call's).
        """
        for name, value in (("prompts", prompts), ("seeds", seeds)):
            if value is None:
                raise TypeError(f"{name} is required: {_EXPECTED[name]}")
        prompts, seeds = _as_list(prompts, "prompts"), _as_list(seeds, "seeds")
        try:
            variation_strength = float(variation_strength)
        except (TypeError, ValueError):
            raise TypeError(f"variation_strength={variation_strength!r} is not a number") from None
        if not 0.0 <= variation_strength <= 1.0:
            raise ValueError(f"variation_strength={variation_strength!r}: must be in [0, 1] (0: the seed's noise, 1: "
                             "the variation seed's)")
        if variation_strength and variation_seeds is None:
            raise ValueError(f"variation_strength={variation_strength:g} moves each image's noise toward its "
                             "variation seed's: give variation_seeds")
        variations = None if variation_seeds is None else _as_list(variation_seeds, "variation_seeds")
        negatives = _as_list(negative_prompts, "negative_prompts") or [""]
        if latents is not None:
            latents = np.asarray(latents, np.float32)
        if init_images is not None:
            from sdjax.images import image_batch
            init_images = image_batch(init_images)
        elif strength is not None:
            raise ValueError(f"strength={strength!r} is img2img's: it needs init_images to start from")
        if mask_images is not None:
            from sdjax.images import mask_batch
            if init_images is None:
                raise ValueError("mask_images mark what to repaint of init_images (inpainting): give init_images")
            mask_images = mask_batch(mask_images)
            if mask_images.shape[1:3] != init_images.shape[1:3]:
                raise ValueError(f"mask_images are {mask_images.shape[2]}x{mask_images.shape[1]} and init_images "
                                 f"{init_images.shape[2]}x{init_images.shape[1]} (width x height): give masks of "
                                 "the images' size")
            if strength is None:
                strength = 1.0   # (diffusers' inpainting default: the masked part from pure noise)
        if isinstance(mask_blur, (bool, np.bool_)) or not isinstance(mask_blur, (int, float, np.integer, np.floating)):
            raise TypeError(f"mask_blur={mask_blur!r} is not a number (of pixels)")
        blur = float(mask_blur)
        if not 0 <= blur < math.inf:
            raise ValueError(f"mask_blur={mask_blur!r}: must be a number of pixels >= 0 (0: no blur; A1111's default "
                             "is 4)")
        if blur and mask_images is None:
            raise ValueError(f"mask_blur={mask_blur!r} softens an inpainting mask's edge: give mask_images")
        soft = None   # A1111's Mask blur: the model gets the blur cut at half gray, the paste its grays
        if blur:
            from sdjax.images import blur_mask
            soft = blur_mask(mask_images, blur)
            mask_images = (soft >= 0.5).astype(np.float32)
        paste = None
        if mask_padding is not None:   # "only masked": the box around the mask is what is made
            if (isinstance(mask_padding, (bool, np.bool_)) or not isinstance(mask_padding, (int, np.integer))
                    or mask_padding < 0):
                raise ValueError(f"mask_padding={mask_padding!r}: must be a whole number of pixels >= 0")
            if mask_images is None or len(init_images) != 1 or len(mask_images) != 1:
                raise ValueError("mask_padding inpaints the box around a mask: give one init image and one mask "
                                 "(mask_images; a call per picture)")
            if return_intermediates is not None and return_intermediates is not False:
                raise ValueError("return_intermediates is not available with mask_padding (the images are pasted "
                                 "into the picture): leave either out")
            height, width = (512 if size is None else size for size in (height, width))
            for name, size in (("height", height), ("width", width)):
                if not isinstance(size, (int, np.integer)) or size <= 0 or size % 8:
                    raise ValueError(f"{name}={size!r}: must be a positive multiple of 8 (with mask_padding: the size "
                                     "the box around the mask is made at)")
            if not mask_images[0].any():   # (a gray mask below half gray too: said as such)
                blurred = f" after mask_blur={mask_blur!r}" if blur else ""
                raise ValueError(f"mask_images is black everywhere (cut at half gray{blurred}): mask_padding finds "
                                 "no box around it to repaint")
            kept = mask_images[:1] if soft is None else soft[:1]
            paste = (init_images[:1], kept, _crop_to_mask(init_images[0], kept[0], width, height, int(mask_padding)))
            init_images, mask_images = paste[2][:2]
        elif soft is not None:   # the picture laid back over each image through the blur, its grays doubled
            paste = (init_images, np.minimum(2 * soft, 1), None)
        if masked_content not in sampling.MASKED_CONTENTS:
            raise ValueError(f"masked_content={masked_content!r}: choose one of {', '.join(sampling.MASKED_CONTENTS)} "
                             "(AUTOMATIC1111's Masked content)")
        if masked_content != "original":   # (A1111 paints the part over first for each of them, through the blur)
            if mask_images is None:
                raise ValueError(f"masked_content={masked_content!r} is what the part an inpainting mask marks "
                                 "starts from: give mask_images")
            from sdjax.images import as_pil, fill_masked, image_batch, resize_to_fill
            fills = mask_images   # (the mask cut at half gray; with a blur, the blur: "only masked", its box's)
            if soft is not None:
                fills = soft if mask_padding is None else np.asarray(resize_to_fill(
                    as_pil(soft[0, :, :, 0]).crop(paste[2][2]), width, height), np.float32)[None, :, :, :1] / 255
            if len(init_images) > 1 and len(fills) > 1 and len(init_images) != len(fills):
                raise ValueError(f"init_images has {len(init_images)} entries and mask_images {len(fills)}: give as "
                                 "many of each, or one")
            init_images = image_batch([fill_masked(as_pil(init_images[k % len(init_images)]),
                                                   as_pil(fills[k % len(fills)][..., 0]))
                                       for k in range(max(len(init_images), len(fills)))])
        # ControlNets: one control image batch, scale and window each (several: lists, as diffusers takes them)
        several = len(self.controlnet) if isinstance(self.controlnet, tuple) else 0
        controls = None
        if control_images is not None:
            if self.controlnet is None:
                raise ValueError("control_images steer the images through a ControlNet: load one first "
                                 "(pipe.load_controlnet(...))")
            if mask_padding is not None:
                raise ValueError("control_images are not available with mask_padding: leave either out")
            from sdjax.images import image_batch
            if several and (not isinstance(control_images, (list, tuple)) or len(control_images) != several):
                raise ValueError(f"{several} ControlNets are loaded: control_images is a list of {several}, each "
                                 "ControlNet's control image (or images)")
            controls = ([image_batch(c, f"control_images[{k}]") for k, c in enumerate(control_images)] if several
                        else [image_batch(control_images, "control_images")])

        def each(value, name) -> list:   # one value a ControlNet
            if several and isinstance(value, (list, tuple)):
                if len(value) != several:
                    raise ValueError(f"{name} has {len(value)} entries for {several} ControlNets: one each, or one "
                                     "number for all")
                return list(value)
            return [value] * max(several, 1)
        windows = []
        for scale, start, end in zip(each(controlnet_conditioning_scale, "controlnet_conditioning_scale"),
                                     each(control_guidance_start, "control_guidance_start"),
                                     each(control_guidance_end, "control_guidance_end")):
            try:
                scale = float(scale)
            except (TypeError, ValueError):
                raise TypeError(f"controlnet_conditioning_scale={controlnet_conditioning_scale!r} is not a number"
                                + (" (or one a ControlNet)" if several else "")) from None
            if not math.isfinite(scale):
                raise ValueError(f"controlnet_conditioning_scale={controlnet_conditioning_scale!r} is not a finite "
                                 "number")
            for name, value in (("control_guidance_start", start), ("control_guidance_end", end)):
                if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)) \
                        or not 0 <= value <= 1:
                    raise ValueError(f"{name}={value!r}: must be a number in [0, 1] (a share of the steps run)")
            if start >= end:
                raise ValueError(f"control_guidance_start={start!r} must be below control_guidance_end={end!r}")
            windows.append((scale, float(start), float(end)))
        modes = each(control_mode, "control_mode")
        hires_modes = modes if hires_control_mode is None else each(hires_control_mode, "hires_control_mode")
        for name, given in (("control_mode", modes), ("hires_control_mode", hires_modes)):
            if bad := [mode for mode in given if not isinstance(mode, str) or mode not in sampling.CONTROL_MODES]:
                raise ValueError(f"{name}={bad[0]!r}: choose one of {', '.join(sampling.CONTROL_MODES)} "
                                 "(AUTOMATIC1111's Control Modes: Balanced, My prompt is more important, ControlNet "
                                 "is more important)")
        if hires_control_mode is not None and (controls is None or hires is None):
            raise ValueError("hires_control_mode is the Control Mode of the Hires fix's second pass: give "
                             "control_images and hires too")
        if hires is not None:
            if not isinstance(hires, HiresFix):
                raise TypeError(f"hires must be a HiresFix (sdjax.HiresFix(scale=2.0, ...)) or None, got "
                                f"{type(hires).__name__}")
            if init_images is not None:
                raise ValueError("hires (the Hires fix) is text-to-image in two passes: not with init_images (for "
                                 "img2img at another size, resize the images)")
            if return_intermediates is not None and return_intermediates is not False:
                raise ValueError("return_intermediates is not available with hires (the Hires fix): leave either out")
        hires_controls = None   # (the Hires fix's second pass's own control images, at its size)
        if hires_control_images is not None:
            if controls is None or hires is None:
                raise ValueError("hires_control_images steer the Hires fix's second pass: give control_images and "
                                 "hires too")
            if several and (not isinstance(hires_control_images, (list, tuple))
                            or len(hires_control_images) != several):
                raise ValueError(f"{several} ControlNets are loaded: hires_control_images is a list of {several}, "
                                 "each ControlNet's second-pass control image (or images)")
            hires_controls = ([image_batch(c, f"hires_control_images[{k}]") for k, c in enumerate(hires_control_images)]
                              if several else [image_batch(hires_control_images, "hires_control_images")])
        # latents' and images' batches count too: pipe("a cat", latents=four_noises) makes four images
        n_latents = latents.shape[0] if latents is not None and latents.ndim == 4 else 1   # else: the shape error
        n_init = 1 if init_images is None else init_images.shape[0]
        sizes = {"prompts": len(prompts), "seeds": len(seeds), "negative_prompts": len(negatives),
                 "latents": n_latents, "init_images": n_init, "variation_seeds": len(variations or [None]),
                 "mask_images": 1 if mask_images is None else mask_images.shape[0],
                 **{f"{name}[{k}]" if several else name: len(c) for name, given in (
                     ("control_images", controls), ("hires_control_images", hires_controls))
                    for k, c in enumerate(given or [])},
                 **{f"hires.{name}": len(getattr(hires, name)) for name in ("prompts", "negative_prompts")
                    if hires is not None and getattr(hires, name) is not None}}
        n = max(sizes.values())
        longest = max(sizes, key=sizes.get)   # (named in the error: the list the others must match)
        for name, size in sizes.items():
            if size not in (1, n):
                raise ValueError(f"{name} has {size} entries; expected 1 or {n} to match {longest} ({n} entries)")
        prompts, seeds, negatives = ([x[0]] * n if len(x) == 1 else x for x in (prompts, seeds, negatives))
        hires_texts = None   # (the second pass's own prompts and negative prompts: A1111's Hires prompt)
        if hires is not None and (hires.prompts is not None or hires.negative_prompts is not None):
            hires_texts = [list(own) * (n // len(own)) if own is not None else call
                           for own, call in ((hires.prompts, prompts), (hires.negative_prompts, negatives))]
        if variations is not None:
            variations = [v.item() if isinstance(v, (np.ndarray, jax.Array)) and v.ndim == 0 else v
                          for v in (variations * n if len(variations) == 1 else variations)]
            for v in variations:
                if (isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer))
                        or not 0 <= int(v) <= MAX_SEED):
                    raise ValueError(f"variation seed {v!r} is not an integer in [0, 2**32 - 1]")
            if variation_strength and latents is not None:
                raise ValueError("variation_seeds vary the seeds' noise: not with latents given (vary your own)")
            variations = np.asarray(variations, np.uint32) if variation_strength else None   # (0: no variation)
        given_shape = None if latents is None else latents.shape   # for the error, before broadcasting
        if latents is not None and latents.ndim == 4 and n_latents == 1 < n:   # one initial noise for every image
            latents = np.repeat(latents, n, axis=0)
        seeds = [s.item() if isinstance(s, (np.ndarray, jax.Array)) and s.ndim == 0 else s for s in seeds]
        for s in seeds:
            if isinstance(s, (bool, np.bool_)) or not isinstance(s, (int, np.integer)) or not 0 <= int(s) <= MAX_SEED:
                raise ValueError(f"seed {s!r} is not an integer in [0, 2**32 - 1]")
        if not all(isinstance(p, str) for p in prompts + negatives):
            raise TypeError("prompts and negative_prompts must be strings")
        if init_images is not None:   # the images' size, which height and width may only repeat
            image_h, image_w = init_images.shape[1:3]
            for name, given, size in (("height", height, image_h), ("width", width, image_w)):
                if given is not None and given != size:
                    raise ValueError(f"{name}={given!r} but init_images are {image_w}x{image_h} (width x height): "
                                     f"leave {name} out, or resize the images")
                if size % 8:
                    raise ValueError(f"init_images are {image_w}x{image_h} (width x height): each side must be a "
                                     "multiple of 8 (resize or crop them)")
            height, width = image_h, image_w
        if controls is not None:   # (their size, where none is given: as diffusers' ControlNet pipeline)
            height, width = (controls[0].shape[i] if size is None else size for i, size in ((1, height), (2, width)))
        height, width = (512 if size is None else size for size in (height, width))
        for name, size in (("height", height), ("width", width)):
            if not isinstance(size, (int, np.integer)) or size <= 0 or size % 8:
                raise ValueError(f"{name}={size!r}: must be a positive multiple of 8")
        for k, c in enumerate(controls or []):
            if c.shape[1:3] != (height, width):
                raise ValueError(f"control_images{f'[{k}]' if several else ''} are {c.shape[2]}x{c.shape[1]} and the "
                                 f"images {width}x{height} (width x height): give control images of the images' size")
        try:
            guidance_scale = float(guidance_scale)   # also a JAX/numpy scalar: it decides a static argument
        except (TypeError, ValueError):
            raise TypeError(f"guidance_scale={guidance_scale!r} is not a number") from None
        if not math.isfinite(guidance_scale):
            raise ValueError(f"guidance_scale={guidance_scale!r} is not a finite number")
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer))
                                       or batch_size < 1):
            raise ValueError(f"batch_size={batch_size!r}: must be a whole number >= 1 (or None: 4 per device)")
        if scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {scheduler!r}: choose one of {', '.join(SCHEDULERS)}")
        if not isinstance(prompt_weighting, (bool, np.bool_)):
            raise TypeError(f"prompt_weighting={prompt_weighting!r}: must be True or False")
        check_emphasis(emphasis)
        if emphasis != "original" and not prompt_weighting:
            raise ValueError(f"emphasis={emphasis!r} is a setting of AUTOMATIC1111's prompt syntax: it needs "
                             "prompt_weighting=True")
        clip_skip = sampling.check_clip_skip(clip_skip, self.text_encoder.config.num_hidden_layers)
        sched = self.make_scheduler(scheduler, num_inference_steps, **(scheduler_options or {}))
        first_call = 0   # the loop index denoising begins at: img2img's strength skips the start of the schedule
        if init_images is not None:
            first_call = sampling.img2img_start(num_inference_steps, strength)
            sched.starting_at(first_call)   # a schedule that cannot begin midway: raises now
        latent_shape = (height // self.vae_scale, width // self.vae_scale, self.vae.config.latent_channels)
        if latents is not None:
            if latents.shape != (n, *latent_shape):
                expected = f"{(n, *latent_shape)}" + (f" or {(1, *latent_shape)}" if n > 1 else "")
                raise ValueError(f"latents have shape {given_shape}; expected {expected} "
                                 f"([batch, height/{self.vae_scale}, width/{self.vae_scale}, channels], NHWC)")
        resize_hw = None   # (A1111's Seed resize from, at the latents' size)
        if seed_resize_from is not None:
            if latents is not None:
                raise ValueError("seed_resize_from draws the seeds' noise at another size: not with latents given")
            if (not isinstance(seed_resize_from, (tuple, list)) or len(seed_resize_from) != 2
                    or any(isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or v <= 0
                           or v % self.vae_scale for v in seed_resize_from)):
                raise ValueError(f"seed_resize_from={seed_resize_from!r}: must be (height, width) in pixels, positive "
                                 f"multiples of {self.vae_scale}, or None")
            resize_hw = tuple(int(v) // self.vae_scale for v in seed_resize_from)
        steps = self._intermediate_steps(return_intermediates, sched.num_model_calls, first_call)
        second = None
        if hires is not None:   # the second pass's schedule, size and text inputs (prompt editing: over its calls)
            hires_steps = int(hires.steps or num_inference_steps)
            name2, options2 = hires.second_scheduler(scheduler, scheduler_options)
            sched2 = self.make_scheduler(name2, hires_steps, **options2)
            first2 = sampling.img2img_start(hires_steps, hires.strength)
            sched2.starting_at(first2)   # (PNDM's Runge-Kutta warm-up cannot begin midway: raises now)
            h2, w2 = hires.size(height, width)
            shape2 = (h2 // self.vae_scale, w2 // self.vae_scale, latent_shape[2])
            g2 = float(guidance_scale if hires.guidance_scale is None else hires.guidance_scale)
            second = dict(hires=hires, sched=sched2, first_call=first2, latent_shape=shape2, size=(h2, w2),
                          guidance_scale=g2)
            if controls is not None:   # (the ControlNets steer the second pass too, at its size and over its steps)
                for k, c in enumerate(hires_controls or []):
                    if c.shape[1:3] != (h2, w2):
                        raise ValueError(f"hires_control_images{f'[{k}]' if several else ''} are {c.shape[2]}x"
                                         f"{c.shape[1]} and the second pass's images {w2}x{h2} (width x height): "
                                         "give control images of its size")
                second["controls"] = hires_controls or [_lanczos(c, h2, w2) for c in controls]
                second["control_scales"] = [sampling.control_scales(sched2.num_model_calls - first2, *window)
                                            for window in windows]
                second["control_modes"] = tuple(hires_modes)

        text_inputs = {}   # (empty: no input, the default program unchanged)
        if prompt_weighting:
            ids, neg_ids, text_inputs = _weighted_text(self.tokenizer, prompts, negatives, num_inference_steps,
                                                       sched.num_model_calls - first_call, emphasis)
            if second is not None and (hires_texts or any("phases" in name for name in text_inputs)):
                # the second pass's own texts, or prompt editing in it: over its own steps and calls (as img2img's)
                second["ids"], second["neg_ids"], second["text_inputs"] = _weighted_text(
                    self.tokenizer, *(hires_texts or (prompts, negatives)), hires_steps,
                    second["sched"].num_model_calls - second["first_call"], emphasis)
            passes = [(prompts, text_inputs, guidance_scale, "")]
            if second is not None:
                passes.append(((hires_texts or [prompts])[0], second.get("text_inputs", text_inputs),
                               second["guidance_scale"], " in the Hires fix's second pass"))
            for texts, inputs, scale, where in passes:
                if "cond_part_weights_BK" in inputs and scale <= 1.0:
                    composed = next(p for p in texts if [w for _, w in composable_parts(p)] != [1.0])
                    raise ValueError(f"prompt {composed!r} has AND or a weight (\":2\" at its end: AUTOMATIC1111's "
                                     "composable diffusion), which acts through guidance: guidance_scale must be "
                                     f"above 1 (it is {scale:g}{where})")
        else:
            ids = tokenize(self.tokenizer, prompts)
            neg_ids = tokenize(self.tokenizer, negatives, kind="negative prompt")
            if hires_texts:
                second.update(ids=tokenize(self.tokenizer, hires_texts[0]), text_inputs={},
                              neg_ids=tokenize(self.tokenizer, hires_texts[1], kind="negative prompt"))
        vocab = self.text_encoder.config.vocab_size
        own = [] if second is None or "ids" not in second else [second["ids"], second["neg_ids"]]
        biggest = max(x.max() for x in (ids, neg_ids, *own))
        if biggest >= vocab:   # the embedding lookup would give NaN images
            raise ValueError(f"the tokenizer gave token id {biggest}, outside the text encoder's "
                             f"vocabulary 0..{vocab - 1} (a tokenizer with added tokens needs an embedding resized "
                             "to match)")
        # Every call has the same batch shape (the last one padded), so a run compiles one program.
        per_call = min(parallel.padded_size(batch_size or 4 * parallel.data_size(self.mesh), self.mesh),
                       parallel.padded_size(n, self.mesh))
        seeds = np.asarray(seeds, np.uint32)
        if second is not None and "ids" not in second:   # the first pass's texts serve the second too
            second.update(ids=ids, neg_ids=neg_ids, text_inputs=text_inputs)
        variation = {} if variations is None else dict(variation_seeds_B=variations,
                                                           variation_strength=np.float32(variation_strength))
        return self._batches(prompts, negatives, seeds, ids, neg_ids, latents, init_images, first_call, sched,
                             latent_shape, guidance_scale, steps, per_call, progress, clip_skip, text_inputs, second,
                             variation, mask_images, paste, masked_content,
                             None if controls is None else (controls, [sampling.control_scales(
                                 sched.num_model_calls - first_call, *window) for window in windows],
                                 self._controlled, self._controlnet_state, bool(several), tuple(modes)),
                             resize_hw)

    def _batches(self, prompts, negatives, seeds, ids, neg_ids, latents, init_images, first_call, sched,
                 latent_shape, guidance_scale, steps, per_call, progress, clip_skip,
                 text_inputs, second=None, variation=None, masks=None, paste=None, masked_content="original",
                 control=None, resize_hw=None) -> Iterator[StableDiffusionOutput]:
        """`batches`' generator, on its checked arguments: dispatches batch k + 1 before fetching batch k
        (with the Hires fix's Lanczos upscaler, the first pass's images are fetched in between)."""
        with self._lock:
            state = self.state
            # one init image for every image: encoded once per batch from one replicated copy
            one_init = None if init_images is None or len(init_images) > 1 else parallel.replicate(
                init_images, self.mesh)
            one_mask = None if masks is None or len(masks) > 1 else parallel.replicate(masks, self.mesh)
            # (a ControlNet's: its own program, and its weights as they were when batches() was called)
            program = self._generate if control is None else control[2]
            several = control is not None and control[4]
            one = lambda xs: tuple(xs) if several else xs[0]  # noqa: E731   (several ControlNets: tuples)
            # one control image for every image (a ControlNet's): replicated once; the Hires fix's second pass's too
            one_control = [] if control is None else [
                [None if len(c) > 1 else parallel.replicate(c, self.mesh) for c in controls]
                for controls in (control[0], *([] if second is None else [second["controls"]]))]
            starts = range(0, len(prompts), per_call)
            calls = sched.num_model_calls - first_call
            if second is not None:
                calls += second["sched"].num_model_calls - second["first_call"]
            step_bar, own_bar, show_batches = _progress_bars(progress, len(starts) * calls)
            batch_bar = None
            if show_batches:
                from tqdm.auto import tqdm
                batch_bar = tqdm(total=len(starts), desc="batches", unit="batch")

            def dispatch(start):
                stop = min(start + per_call, len(prompts))
                shard = lambda a: parallel.shard_batch(  # noqa: E731
                    parallel.pad_batch(a[start:stop], per_call), self.mesh)
                lanczos = second is not None and second["hires"].upscaler == "lanczos"
                # per-image inputs split over the devices; scalars (a strength, a static flag) as they are
                inputs = lambda d: {k: v if np.ndim(v) == 0 else shard(v) for k, v in d.items()}  # noqa: E731
                varied = inputs(variation or {})

                def resized(shape) -> dict:   # (Seed resize from, a static argument: only where it changes the noise)
                    return {} if resize_hw is None or resize_hw == tuple(shape[:2]) else dict(
                        seed_resize_from_hw=resize_hw)
                masked = {} if masks is None else dict(mask_BHW1=one_mask if one_mask is not None else shard(masks))
                if masked_content in ("latent_noise", "latent_nothing"):   # (an input: both one program)
                    masked["masked_noise_scale"] = np.float32(masked_content == "latent_noise")

                def controlled(k: int) -> dict:   # pass k's ControlNet inputs (1: the Hires fix's second pass)
                    if control is None:
                        return {}
                    images, scales, modes = (control[0], control[1], control[5]) if k == 0 else (
                        second["controls"], second["control_scales"], second["control_modes"])
                    return dict(controlnet_state=control[3], control_scale=one(scales), control_mode=one(modes),
                                control_images_BHWC=one([o if o is not None else shard(c)
                                                         for o, c in zip(one_control[k], images)]))
                out = program(
                    state, sched, shard(ids), shard(neg_ids), shard(seeds),
                    None if latents is None else shard(latents), jnp.float32(guidance_scale),
                    one_init if one_init is not None or init_images is None else shard(init_images),
                    latent_shape_HWC=latent_shape, use_guidance=guidance_scale > 1.0,
                    return_predictions=bool(steps), on_step=None if step_bar is None else self._ticker,
                    clip_skip=clip_skip, start=first_call,
                    **inputs(text_inputs), **varied, **masked, **controlled(0), **resized(latent_shape),
                    # (the latent upscaler's first pass returns latents, undecoded; the Lanczos one's is the
                    # plain program, its static arguments left at their defaults: one compilation for both)
                    **({} if second is None or lanczos else dict(return_latents=True, decode=False)))
                if second is not None:   # the Hires fix's second pass: img2img at the larger size
                    h2, w2 = second["size"]
                    if lanczos:   # (on the host: PIL's resize of each 8-bit image)
                        _wait_interruptibly([out.images])
                        init = dict(init_images_BHWC=parallel.shard_batch(
                            _lanczos(parallel.to_host(out.images), h2, w2), self.mesh))
                    else:
                        init = dict(init_latents_BHWC=_upscale(out.latents, size_hw=second["latent_shape"][:2]))
                    out = program(
                        state, second["sched"], shard(second["ids"]), shard(second["neg_ids"]), shard(seeds), None,
                        jnp.float32(second["guidance_scale"]), latent_shape_HWC=second["latent_shape"],
                        use_guidance=second["guidance_scale"] > 1.0,
                        on_step=None if step_bar is None else self._hires_ticker, clip_skip=clip_skip,
                        start=second["first_call"],
                        **inputs(second["text_inputs"]), **init, **varied, **controlled(1),
                        **resized(second["latent_shape"]))
                # Indexed one step at a time: iterating over an array spread over several
                # processes is not allowed. Each [B, H, W, 3], decoded right behind the batch.
                decoded = [self._decode(state.vae, out.predictions[s - first_call]) for s in steps]
                return start, stop, out.images, decoded

            def fetch(batch, last: bool) -> StableDiffusionOutput:
                start, stop, images, decoded = batch
                _wait_interruptibly([images, *decoded])
                images = parallel.to_host(images)[: stop - start]
                if paste is not None:   # (mask_padding, mask_blur) the picture laid back over each image
                    images = _pasted(images, start, *paste)
                inter = np.stack([parallel.to_host(d) for d in decoded])[:, : stop - start] if steps else None
                if step_bar is not None:
                    if last:
                        jax.effects_barrier()  # the outputs can be ready before the last callbacks have run
                    # the last model call (of each pass): the ticker counts each call when the next starts
                    step_bar.update(1 if second is None else 2)
                if batch_bar is not None:
                    batch_bar.update(1)
                return StableDiffusionOutput(images, prompts[start:stop], negatives[start:stop],
                                             [int(s) for s in seeds[start:stop]], inter, steps or None)

            # a call made inside another's loop gives them back
            outer = [(t, t.bar, t.first) for t in (self._ticker, self._hires_ticker)]
            self._ticker.bar, self._ticker.first = step_bar, first_call
            self._hires_ticker.bar = step_bar if second is not None else None
            self._hires_ticker.first = 0 if second is None else second["first_call"]
            try:
                ahead = dispatch(starts[0])
                for start in starts[1:]:
                    current, ahead = ahead, dispatch(start)
                    yield fetch(current, last=False)
                yield fetch(ahead, last=True)
            finally:
                for ticker, bar, first in outer:
                    ticker.bar, ticker.first = bar, first
                if own_bar:
                    step_bar.close()
                if batch_bar is not None:
                    batch_bar.close()

    @staticmethod
    def _intermediate_steps(request, num_calls: int, start: int = 0) -> list[int]:
        if request is None or request is False:
            return []
        if request is True or isinstance(request, np.bool_):
            raise TypeError("return_intermediates: a number of steps or a list of step indices, not True")
        if isinstance(request, (int, np.integer)):
            if request < 1:
                raise ValueError("return_intermediates must be >= 1 (a number of steps) or a list of steps")
            return sorted({int(round(x)) for x in np.linspace(start, num_calls - 1,
                                                             min(int(request), num_calls - start))})
        try:
            steps = [int(s) for s in request]
        except TypeError:
            raise TypeError(f"return_intermediates={request!r}: a number of steps or a list of step indices") from None
        bad = [s for s in steps if not start <= s < num_calls]
        if bad:   # (img2img runs from its start index on)
            raise ValueError(f"intermediate steps {bad} are outside {start}..{num_calls - 1}")
        return sorted(set(steps))
