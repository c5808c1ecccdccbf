"""Fine-tuning Stable Diffusion: the run behind ``train.py``.

Data-parallel over every device and host (global batch = per-device batch x devices x
accumulation), Orbax checkpoints with the data position for exact resume, metrics.jsonl +
TensorBoard + loss curve, sample images during training, and a final pipeline export in both
diffusers layouts.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import json
import math
import numbers
import os
import re
import threading
import time
import typing
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sdjax import parallel
from sdjax.models import CLIPTextModel, UNet2DConditionModel
from sdjax.models.layers import attention_setting_problem
from sdjax.cli_utils import UsageError, count, unwritable_folder
from sdjax.pipeline import MAX_SEED, StableDiffusion, load_pipeline, model_options_problem
from sdjax.schedulers import make_noise_schedule
from sdjax.text import too_long, tokenize
from sdjax.training import lora
from sdjax.training import step as S
from sdjax.training.checkpoint import Checkpointer, CheckpointUnreadable, checkpoint_steps, read_data_position
from sdjax.training.data import (CAPTIONS_FILENAME, DEFAULT_CAPTION_KEY, METADATA_FILENAMES, RUN_CONFIG_FILENAME,
                                TFDS_PREFIX, BatchIterator, DataError, load_captioned_images, preprocess_image)
from sdjax.training.monitor import MetricsLog
from sdjax.images import atomic_write, image_grid, save_png
from sdjax.weights import LORA_FILE_NAME, abstract_model, save_lora


RUN_CONFIG_FILE = RUN_CONFIG_FILENAME   # in the output folder: the settings a run was started with
SET_ASIDE_DIR = "abandoned_checkpoints"  # in the output folder: the checkpoints after a resume_step
MIXED_PRECISIONS = ("no", "bf16")
LR_SCHEDULES = S.LR_SCHEDULES
EXPORT_FORMATS = ("both", "pytorch", "flax")
SINGLE_FILE_DTYPES = ("float16", "bfloat16", "float32")
SAMPLE_SCHEDULER = "pndm"               # of the validation samples
TRAINABLE_PREDICTION_TYPES = ("epsilon", "v_prediction")
# The settings that decide the tree a checkpoint holds (EMA or not, the clipping stage of the
# optimizer or not, the text encoder's parameters or not, LoRA of which rank or the models): a resume
# must keep them.
STATE_STRUCTURE_SETTINGS = {"ema_decay": lambda v: v is not None, "max_grad_norm": bool,
                            "train_text_encoder": bool, "lora_rank": lambda v: v}


class SettingError(ValueError):
    """A bad `TrainConfig` setting: ``setting`` names it and ``rule`` says what it must be (for a
    message naming the preset file and key when the value came from one)."""

    def __init__(self, message: str, *, setting: str, rule: str):
        super().__init__(message)
        self.setting, self.rule = setting, rule


# metrics.jsonl's images_per_s: over the logged intervals of at least this many steps (a read that
# comes a step late makes one interval long and the next short: the error is one step in this many)
RATE_STEPS = 20


@dataclasses.dataclass
class TrainConfig:
    """Every setting of a fine-tuning run (``train.py`` flags and ``configs/*.yaml`` keys)."""
    model: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # Hub id, pipeline folder or single file
    model_config: str | None = None    # a single file's configs (default: X/ beside X.safetensors, else SD v1.5's)
    vae: str | None = None             # a VAE in place of the model's own (file, folder or Hub repo id)
    variant: str | None = None         # load a pipeline folder's variant weight files, e.g. "fp16"
    ema_weights: bool = False          # a single-file training checkpoint's UNet from its EMA copy
    train_data: str = ""               # folder with train_images/ + image_captions.csv, or tfds:NAME[/CONFIG]
    output_dir: str = "finetune"
    resolution: int = 512
    batch_size: int = 1                # per device; global batch = batch_size x devices x accumulation
    gradient_accumulation: int = 1
    max_steps: int = 1000              # optimizer updates
    learning_rate: float = 1e-5
    lr_schedule: str = "constant"      # or "cosine", "linear" (to 0 at max_steps, after the warmup), ...
    lr_num_cycles: int = 1             # cosine_with_restarts: the decays to 0 before max_steps
    lr_power: float = 1.0              # polynomial: the exponent of the decay (1: linear)
    warmup_steps: int = 0
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    weight_decay: float = 1e-2
    max_grad_norm: float | None = 1.0
    ema_decay: float | None = None     # e.g. 0.9999; the export then uses the EMA weights
    mixed_precision: str = "no"        # "bf16": bf16 activations, fp32 master weights
    gradient_checkpointing: bool = False
    min_snr_gamma: float | None = None
    noise_offset: float = 0.0          # e.g. 0.05-0.1: darker darks and brighter brights (diffusers' --noise_offset)
    input_perturbation: float = 0.0    # e.g. 0.1: extra noise in the UNet's input only (diffusers' --input_perturbation)
    prediction_type: str | None = None  # train for "epsilon" or "v_prediction"; None: the model's own
    caption_dropout: float = 0.0
    train_text_encoder: bool = False
    lora_rank: int | None = None       # train LoRA of this rank (e.g. 4-32), not the model; final/ is a LoRA file
    lora_alpha: float | None = None    # LoRA's alpha: changes are scaled by alpha / rank (none: the rank, scale 1)
    center_crop: bool = True           # False: random crop
    random_flip: bool = False
    cache_latents: bool = False        # VAE-encode the dataset once (needs center_crop, no random_flip)
    image_key: str = "image"           # TFDS feature names
    caption_key: str = DEFAULT_CAPTION_KEY   # ... and a metadata.jsonl/csv's caption column (default there: text)
    tfds_data_dir: str | None = None
    skip_bad_rows: bool = False
    seed: int = 0
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    log_every: int = 1
    sample_every: int = 0              # 0: only at the end
    validation_prompts: list = dataclasses.field(default_factory=list)  # default: the first two captions
    validation_seeds: list = dataclasses.field(default_factory=lambda: [0])
    sample_steps: int = 25
    sample_guidance_scale: float = 7.5
    export_format: str = "both"        # final/ layout: "both", "pytorch" or "flax"
    export_single_file: str | None = None  # also final.safetensors (original SD layout) in this dtype
    resume: bool = False
    spike_factor: float = 3.0

    def __post_init__(self):
        for field in dataclasses.fields(self):   # NumPy numbers (a sweep's np.arange) as Python's, which JSON records
            value = getattr(self, field.name)
            if isinstance(value, np.generic):
                setattr(self, field.name, value.item())
            elif isinstance(value, (list, tuple)) and any(isinstance(v, np.generic) for v in value):
                setattr(self, field.name, [v.item() if isinstance(v, np.generic) else v for v in value])
        for name in ("model", "model_config", "vae", "train_data"):   # a Path is a path's text
            if isinstance(getattr(self, name), os.PathLike):
                setattr(self, name, os.fspath(getattr(self, name)))
        for name in ("output_dir", "tfds_data_dir"):   # "~/run" is a folder in $HOME, not ./~/run
            value = getattr(self, name)
            if isinstance(value, (str, os.PathLike)) and "://" not in os.fspath(value):
                setattr(self, name, os.path.expanduser(os.fspath(value)))

    def validate(self, *, need_data: bool = True) -> None:
        """Raises ValueError naming the setting, its value and its train.py flag for any bad
        setting, before anything is loaded. ``need_data=False``: no --train-data needed (export)."""
        def bad(name: str, rule: str) -> ValueError:
            return SettingError(f"{name}={getattr(self, name)!r} {rule} (--{name.replace('_', '-')})",
                                setting=name, rule=rule)

        def number(name: str) -> float:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise bad(name, "must be a finite number")
            return value

        hints = typing.get_type_hints(TrainConfig)
        for field in dataclasses.fields(self):   # types first: none, or a string for a true/false setting
            value, hint = getattr(self, field.name), hints[field.name]
            kinds = tuple(k for k in (typing.get_args(hint) or (hint,)) if k is not type(None))
            if value is None and type(None) not in typing.get_args(hint):
                raise bad(field.name, "must be set (none is not a value for it)")
            if value is not None and kinds == (bool,) and not isinstance(value, bool):
                raise bad(field.name, "must be true or false")
            if value is not None and kinds == (str,) and not isinstance(value, str):
                raise bad(field.name, "must be text")
            if kinds == (list,) and not isinstance(value, (list, tuple)):
                raise bad(field.name, "must be a list")
        for name in ("model", "model_config", "vae"):
            if getattr(self, name) is not None and not getattr(self, name).strip():
                raise bad(name, "is empty: leave it out, or give a path or Hub repo id")
        if not all(isinstance(p, str) for p in self.validation_prompts):
            raise bad("validation_prompts", "must be a list of prompts (text)")
        problem = (model_options_problem(self.model, self.model_config, self.variant, self.ema_weights)
                   or attention_setting_problem())
        if problem:
            raise ValueError(problem)
        if need_data and not self.train_data:
            raise ValueError("no training data: pass --train-data DIR (train_images/ + image_captions.csv) or tfds:NAME")
        for name, least in (("resolution", 1), ("batch_size", 1), ("gradient_accumulation", 1), ("max_steps", 1),
                            ("checkpoint_every", 1), ("keep_checkpoints", 1), ("log_every", 1), ("sample_steps", 1),
                            ("lr_num_cycles", 1),
                            ("warmup_steps", 0), ("sample_every", 0), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise bad(name, "must be a whole number")
            if value < least:
                raise bad(name, f"must be >= {least}")
        if self.seed > MAX_SEED:
            raise bad("seed", f"must be <= {MAX_SEED}")
        if self.resolution % 8:
            raise bad("resolution", "must be a multiple of 8")
        if not 0.0 <= number("caption_dropout") < 1.0:
            raise bad("caption_dropout", "must be in [0, 1)")
        for name, choices in (("mixed_precision", MIXED_PRECISIONS), ("lr_schedule", LR_SCHEDULES),
                              ("export_format", EXPORT_FORMATS)):
            if getattr(self, name) not in choices:
                raise bad(name, "is not one of " + ", ".join(map(repr, choices)))
        if self.export_single_file is not None and self.export_single_file not in SINGLE_FILE_DTYPES:
            raise bad("export_single_file", "is not one of " + ", ".join(map(repr, SINGLE_FILE_DTYPES)) + " or none")
        if number("learning_rate") <= 0:
            raise bad("learning_rate", "must be a positive number")
        if number("lr_power") <= 0:
            raise bad("lr_power", "must be a positive number")
        if self.lr_schedule == "polynomial" and self.learning_rate <= S.POLYNOMIAL_END_LR:
            raise bad("learning_rate", f"must be above {S.POLYNOMIAL_END_LR}, where the polynomial schedule ends")
        for name in ("adam_b1", "adam_b2"):
            if not 0.0 <= number(name) < 1.0:
                raise bad(name, "must be in [0, 1)")
        if number("weight_decay") < 0:
            raise bad("weight_decay", "must be >= 0")
        if self.max_grad_norm is not None and number("max_grad_norm") < 0:
            raise bad("max_grad_norm", "must be >= 0 (0 or none: no clipping)")
        if self.min_snr_gamma is not None and number("min_snr_gamma") <= 0:
            raise bad("min_snr_gamma", "must be > 0 (none: off)")
        for name in ("noise_offset", "input_perturbation"):
            if number(name) < 0:
                raise bad(name, "must be >= 0 (0: off)")
        if self.prediction_type is not None and self.prediction_type not in TRAINABLE_PREDICTION_TYPES:
            raise bad("prediction_type", "is not one of " + ", ".join(map(repr, TRAINABLE_PREDICTION_TYPES))
                      + " or none (the model's own)")
        if self.ema_decay is not None and not 0.0 < number("ema_decay") < 1.0:
            raise bad("ema_decay", "must be in (0, 1) (none: off)")
        if number("spike_factor") <= 0:
            raise bad("spike_factor", "must be > 0")
        number("sample_guidance_scale")
        if not isinstance(self.output_dir, str) or not self.output_dir or "://" in self.output_dir:
            raise bad("output_dir", "must be a folder of the file system (a bucket URL is not: mount it, e.g. with "
                      "gcsfuse, and pass the mount's path; on several hosts it must be a folder every host sees)")
        seeds = list(self.validation_seeds)
        if not seeds:
            raise bad("validation_seeds", "must hold at least one seed")
        if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and 0 <= v <= MAX_SEED for v in seeds):
            raise bad("validation_seeds", f"must be whole numbers in [0, {MAX_SEED}]")
        if not isinstance(self.caption_key, str) or not self.caption_key.strip():
            raise bad("caption_key", "must name a TFDS feature or a metadata file's column")
        if self.train_data and not str(self.train_data).startswith("tfds:"):   # a folder: no TFDS features
            for name in ("image_key", "tfds_data_dir"):   # (caption_key: also a metadata file's column)
                if getattr(self, name) != getattr(TrainConfig, name):
                    raise bad(name, f"is a TFDS setting, and train_data={self.train_data!r} is a folder "
                                    "(remove it, or train on tfds:NAME)")
        if self.lora_rank is not None:
            if isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, numbers.Integral):
                raise bad("lora_rank", "must be a whole number (none: train the whole model)")
            if self.lora_rank < 1:
                raise bad("lora_rank", "must be >= 1 (none: train the whole model)")
            if self.export_single_file is not None:
                raise bad("export_single_file", "is for whole-model runs: a LoRA run exports a LoRA file (fuse it into "
                          "a model with sample.py --lora, or load it beside the model in a web UI)")
        if self.lora_alpha is not None:
            if self.lora_rank is None:
                raise bad("lora_alpha", "is a LoRA setting: it needs --lora-rank")
            if number("lora_alpha") <= 0:
                raise bad("lora_alpha", "must be a positive number (none: the rank)")
        if self.cache_latents and (self.random_flip or not self.center_crop):
            raise ValueError("cache_latents needs fixed images: use center_crop and no random_flip "
                             "(--cache-latents with --center-crop and --no-random-flip)")

    @classmethod
    def from_run(cls, output_dir: str | os.PathLike, **overrides) -> "TrainConfig":
        """The settings to continue the run in ``output_dir`` with: those it was started with (its
        train_config.json), then ``overrides``, with ``resume=True``. What ``train.py --output-dir
        DIR --resume`` does, from Python::

            train(TrainConfig.from_run("finetune", max_steps=2000))

        Raises UsageError when the folder holds no recorded run, and ValueError for ``resume=False``
        (a new run with its settings: ``TrainConfig(**recorded_settings(DIR), output_dir=NEW)``)."""
        output_dir = os.path.expanduser(os.fspath(output_dir))
        if overrides.get("resume", True) is not True:
            raise ValueError(f"TrainConfig.from_run({output_dir!r}) continues that run, in its folder: for a new run "
                             "with its settings, use TrainConfig(**recorded_settings(" + repr(output_dir)
                             + "), output_dir=...) (sdjax.training.loop.recorded_settings)")
        recorded = recorded_settings(output_dir)
        if recorded is None:
            raise UsageError(f"{output_dir} has no {RUN_CONFIG_FILE} (the settings a run was started with): "
                             "is it the output_dir of a training run?")
        return cls(**{**recorded, **overrides, "output_dir": output_dir, "resume": True})


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf; the last good checkpoint is kept."""


class StopRequest:
    """A graceful stop asked for from outside the training loop (train.py's SIGTERM handler, a
    preempted VM): `Trainer.run` finishes the step in flight, saves a checkpoint of it and raises
    `Stopped`. On several processes JAX's preemption service plays this part (every process stops
    at the same step), see `Trainer.run`. A request is not cleared: give each run a new StopRequest
    (one already requested stops the next run after its first step)."""

    def __init__(self):
        self._requested = threading.Event()
        self._interrupted = threading.Event()
        self.watched = False   # a Trainer.run loop is running and will act on it

    def request(self) -> bool:
        """Ask for the stop; True when a running loop will act on it (False: nothing is training,
        so the caller should stop at once)."""
        self._requested.set()
        return self.watched

    @property
    def requested(self) -> bool:
        """Whether `request` was called."""
        return self._requested.is_set()

    def interrupt(self) -> None:
        """Note a Ctrl-C (train.py's SIGINT handler, before it raises KeyboardInterrupt): should that
        exception be swallowed (Python drops one raised inside a garbage-collection callback, which
        JAX has), `Trainer.run` raises KeyboardInterrupt at the end of the step."""
        self._interrupted.set()

    @property
    def interrupted(self) -> bool:
        """Whether `interrupt` was called."""
        return self._interrupted.is_set()


class Stopped(Exception):
    """The run stopped on request (`StopRequest`, or a preemption notice on several processes)
    after saving a checkpoint of ``step``."""

    def __init__(self, step: int):
        super().__init__(f"stopped on request after saving a checkpoint of step {step}")
        self.step = step


# The calls this process made to JAX's preemption check, over every run in it. The service aligns the
# processes on this counter (a notice makes the sync point the largest count any process has reached,
# plus one), so it must grow by one per check: a training step's number would not (a resumed run
# starts past 1, where a notice received while loading puts the sync point).
_preemption_checks = itertools.count(1)


def _preemption_sync_point():
    """On several processes, JAX's preemption check, to call once per training step on every
    process (a SIGTERM to any process makes all of them return True at the same call); None on one
    process or where the service is off."""
    if jax.process_count() == 1:
        return None
    from jax.experimental import multihost_utils

    def reached() -> bool:
        try:
            return multihost_utils.reached_preemption_sync_point(next(_preemption_checks))
        except RuntimeError:   # jax_enable_preemption_service off
            return False
    return reached


def _pure(module) -> dict:
    return nnx.to_pure_dict(nnx.state(module, nnx.Param))


def _build_model(cfg: TrainConfig, mesh):
    """(pipeline, graphdefs, step config, optimizer, lr schedule, initial state on the mesh, the
    frozen models' weights a LoRA run changes: {"unet", "text_encoder"} pure dicts, else None)."""
    compute = jnp.bfloat16 if cfg.mixed_precision == "bf16" else jnp.float32
    # fp32 whatever the files hold (a variant="fp16" is upcast): the master weights of training. A LoRA run
    # trains none of them: they load in the compute dtype (bf16 halves them, and the step casts nothing:
    # the same values as the step's cast of fp32 ones, so the same losses)
    pipe = load_pipeline(cfg.model, model_config=cfg.model_config, variant=cfg.variant, vae=cfg.vae,
                         ema_weights=cfg.ema_weights, dtype=compute if cfg.lora_rank is not None else jnp.float32,
                         mesh=mesh)
    inputs, latent = pipe.unet.config.in_channels, pipe.vae.config.latent_channels
    if inputs != latent:   # (the pipeline takes an inpainting UNet: 2 * latent + 1)
        raise UsageError(f"{cfg.model}: its UNet takes {inputs} input channels, the VAE's {latent} latent ones and "
                         f"{inputs - latent} more (an inpainting model's mask and masked image); sdjax's training "
                         "makes no masks from its data, so it fine-tunes text-to-image models only (UNet in_channels "
                         "= the VAE's latent_channels)")
    prediction_type = pipe.scheduler_config.get("prediction_type", "epsilon")
    if cfg.lora_rank is not None and cfg.prediction_type not in (None, prediction_type):
        raise UsageError(f"--prediction-type {cfg.prediction_type} with --lora-rank: a LoRA file does not say what "
                         f"the model predicts, and {cfg.model} predicts {prediction_type}; retrain the whole model "
                         "(leave out --lora-rank)")
    if cfg.prediction_type not in (None, prediction_type):
        # The pipeline's scheduler config says what the weights now predict: the samples, the
        # exported final/ (diffusers' script exports the model's old config here) and a resume.
        pipe.scheduler_config = {**pipe.scheduler_config, "prediction_type": cfg.prediction_type}
        prediction_type = cfg.prediction_type
    if prediction_type not in TRAINABLE_PREDICTION_TYPES:
        raise UsageError(f"{cfg.model}: its scheduler config has prediction_type={prediction_type!r}; sdjax "
                         f"fine-tunes {' and '.join(map(repr, TRAINABLE_PREDICTION_TYPES))} models (or "
                         "retrains one for another with --prediction-type)")
    try:  # the samples' schedule, here, not after training time has been spent (the loader checked the noise's)
        pipe.make_scheduler(SAMPLE_SCHEDULER, cfg.sample_steps)
    except (ValueError, NotImplementedError) as e:
        raise UsageError(f"{cfg.model}: its scheduler config with --sample-steps {cfg.sample_steps}: {e}") from e
    unet_gd, _ = abstract_model(UNet2DConditionModel, pipe.unet.config, dtype=compute,
                                remat=cfg.gradient_checkpointing)
    te_gd, _ = abstract_model(CLIPTextModel, pipe.text_encoder.config, dtype=compute)
    vae_gd, _ = abstract_model(type(pipe.vae), pipe.vae.config, dtype=compute)
    graphdefs = S.Graphdefs(unet_gd, te_gd, vae_gd)
    base, spec = None, None
    if cfg.lora_rank is not None:   # the models stay as loaded; LoRA of their attention projections trains
        base = {"unet": _pure(pipe.unet), "text_encoder": _pure(pipe.text_encoder)}
        spec = lora.lora_spec({k: v for k, v in base.items() if k == "unet" or cfg.train_text_encoder},
                              rank=cfg.lora_rank, alpha=cfg.lora_alpha)
        # keyed by the seed, apart from the steps' keys (fold_in(seed key, step): a step no run reaches)
        params = {"lora": lora.init_lora(spec, base, jax.random.fold_in(jax.random.key(cfg.seed), 0xFFFFFFFF))}
    else:
        params = {"unet": _pure(pipe.unet)}
        if cfg.train_text_encoder:
            params["text_encoder"] = _pure(pipe.text_encoder)
    optimizer, lr = S.make_optimizer(cfg.learning_rate, warmup_steps=cfg.warmup_steps, schedule=cfg.lr_schedule,
                                     num_cycles=cfg.lr_num_cycles, power=cfg.lr_power,
                                     total_steps=cfg.max_steps, b1=cfg.adam_b1, b2=cfg.adam_b2,
                                     weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm)
    state = S.init_state(parallel.replicate(params, mesh), optimizer, cfg.seed, ema=cfg.ema_decay is not None,
                         mesh=mesh)
    step_cfg = S.StepConfig(prediction_type=prediction_type,
                            min_snr_gamma=cfg.min_snr_gamma, noise_offset=float(cfg.noise_offset),
                            input_perturbation=float(cfg.input_perturbation),
                            caption_dropout=cfg.caption_dropout,
                            train_text_encoder=cfg.train_text_encoder, ema_decay=cfg.ema_decay,
                            compute_dtype=compute, lora=spec)
    return pipe, graphdefs, step_cfg, optimizer, lr, state, base


def recorded_settings(output_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The settings a run was started with, from ``OUTPUT_DIR/train_config.json``, as TrainConfig
    fields (without ``output_dir`` and ``resume``, which belong to the run now asking); None when
    the folder has no such file. Raises UsageError naming the file when it is not a JSON object of
    TrainConfig fields."""
    path = Path(output_dir) / RUN_CONFIG_FILE
    if not path.is_file():
        return None
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    if not isinstance(recorded, dict):
        raise UsageError(f"{path}: must be a JSON object of settings, got {type(recorded).__name__}")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(recorded) - known)
    if unknown:
        raise UsageError(f"{path}: unknown key {unknown[0]!r} (known keys: {', '.join(sorted(known))})")
    return {k: v for k, v in recorded.items() if k not in ("output_dir", "resume")}


def _read_run_config(out: Path) -> dict | None:
    """`recorded_settings`, or None where the file is missing or unreadable (for error hints)."""
    try:
        return recorded_settings(out)
    except UsageError:
        return None


def _record(cfg: TrainConfig) -> dict[str, Any]:
    """``cfg`` as train_config.json stores it: local paths made absolute, so that a ``--resume``
    or ``from_run`` from another working directory finds the same model and data."""
    return absolute_paths(dataclasses.asdict(cfg))


def absolute_paths(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` (TrainConfig fields, some or all) with the local paths made absolute, as
    train_config.json records them; Hub repo ids, ``tfds:`` sources and URLs stay as they are."""
    def absolute(path: str) -> str:
        return os.path.abspath(os.path.expanduser(path))
    out = dict(settings)
    for name in ("model", "model_config", "vae"):
        if isinstance(out.get(name), str) and out[name] and Path(out[name]).expanduser().exists():   # else a repo id
            out[name] = absolute(out[name])
    if isinstance(out.get("train_data"), str) and out["train_data"] and not out["train_data"].startswith("tfds:"):
        out["train_data"] = absolute(out["train_data"])
    if isinstance(out.get("tfds_data_dir"), str) and out["tfds_data_dir"] and "://" not in out["tfds_data_dir"]:
        out["tfds_data_dir"] = absolute(out["tfds_data_dir"])   # gs://... stays as it is
    if isinstance(out.get("output_dir"), str):
        out["output_dir"] = absolute(out["output_dir"])
    return out


def _restore_unet_only_ema(checkpoints: Checkpointer, state, step: int | None):
    """A checkpoint of sdjax from before the EMA covered every trained model (its EMA was the UNet's
    tree alone), restored into this state's layout; None if it is not one. With a trained text
    encoder, its EMA starts from the restored text encoder's weights (a warning says so). A LoRA
    run's EMA ({"lora": ...}) never had that layout."""
    if state.ema is None or "unet" not in state.ema:
        return None
    try:
        restored, position = checkpoints.restore(state._replace(ema=state.ema["unet"]), step)
    except ValueError:
        return None
    ema = {"unet": restored.ema}
    if "text_encoder" in state.ema:   # a copy, placed as the EMA is (split over the devices)
        placement = jax.tree.map(lambda a: a.sharding, state.ema["text_encoder"])
        ema["text_encoder"] = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree), out_shardings=placement)(
            restored.params["text_encoder"])
        warnings.warn(f"{checkpoints.directory}: saved by an earlier sdjax, whose EMA held the UNet alone; the text "
                      "encoder's EMA starts from its weights at this checkpoint")
    return restored._replace(ema=ema), position


def _lora_write_leftovers(directory: Path) -> list[Path]:
    """The temporary files of LoRA exports into ``directory`` that were killed while writing
    (`atomic_write`'s ``.NAME.<hex>.tmp``): never a complete file, and not the user's."""
    pattern = re.compile(rf"\.{re.escape(LORA_FILE_NAME)}\.[0-9a-f]{{32}}\.tmp")
    return [p for p in directory.iterdir() if pattern.fullmatch(p.name)] if directory.is_dir() else []


def lora_export_problem(directory: Path) -> str | None:
    """Why a LoRA export cannot be written into ``directory``: it holds files other than an earlier
    LoRA export (the export writes its file alone in its folder); None when it can."""
    if not directory.is_dir():
        return None
    leftovers = set(_lora_write_leftovers(directory))
    others = sorted(p.name for p in directory.iterdir() if p.name != LORA_FILE_NAME and p not in leftovers)
    if not others:
        return None
    return (f"{directory} holds {', '.join(others[:3])}{', ...' if len(others) > 3 else ''}: a LoRA export writes "
            f"{LORA_FILE_NAME} alone in its folder")


def _lora_alpha(settings: dict) -> float:
    """A LoRA run's alpha (its rank when none is set) from its settings (TrainConfig fields)."""
    return float(settings["lora_rank"] if settings["lora_alpha"] is None else settings["lora_alpha"])


def _layout_change(cfg: TrainConfig, recorded: dict | None, where: Path) -> UsageError | None:
    """The error for resuming checkpoint ``where`` with a setting that decides what a checkpoint
    holds (`STATE_STRUCTURE_SETTINGS`) or a LoRA's alpha changed from the ``recorded`` run's; None if
    none is."""
    changed = [name for name, on in STATE_STRUCTURE_SETTINGS.items()
               if recorded is not None and name in recorded and on(recorded[name]) != on(getattr(cfg, name))]
    if not changed and recorded is not None and cfg.lora_rank is not None and "lora_alpha" in recorded:
        if (was := _lora_alpha(recorded)) != (now := _lora_alpha(dataclasses.asdict(cfg))):
            return UsageError(f"cannot restore {where}: its LoRA was trained with alpha {was:g} (now {now:g}), "
                              "which scales every change it learned by alpha / rank; resume or export with the "
                              "recorded setting (leave out --lora-alpha; scale a LoRA where it is loaded, e.g. "
                              "sample.py --lora FILE:0.8), or start a new run in another --output-dir")
    if not changed:
        return None
    settings = ", ".join(f"{name}={recorded[name]!r} (now {getattr(cfg, name)!r})" for name in changed)
    return UsageError(f"cannot restore {where}: the run that saved it had {settings}, which decides what a "
                      "checkpoint holds; resume with the recorded setting (leave out the flag that changes it; from "
                      "Python, TrainConfig.from_run(OUTPUT_DIR) keeps it), or start a new run in another --output-dir")


def _unreadable(error: CheckpointUnreadable, flag: str, steps: list[int]) -> UsageError:
    """A checkpoint that cannot be read, as a UsageError naming ``flag`` (--resume-step or
    --export-step) and the other checkpoints of its folder it can take instead."""
    others = [s for s in steps if s != error.step]
    use = "resume from" if flag == "--resume-step" else "export"
    return UsageError(f"{error}; pass {flag} N to {use} another of its checkpoints: {', '.join(map(str, others))}"
                      if others else f"{error}; {error.directory} has no other checkpoint to {use}")


def _restore(checkpoints: Checkpointer, state, step: int | None, cfg: TrainConfig, recorded: dict | None,
             flag: str):
    """`Checkpointer.restore`, with a checkpoint whose tree does not fit this run's state (Orbax's
    ValueError) reported as a UsageError naming the settings that differ from the recorded run,
    and one that cannot be read as a UsageError naming ``flag`` and the other checkpoints."""
    try:
        try:
            return checkpoints.restore(state, step)
        except ValueError as e:
            if (older := _restore_unet_only_ema(checkpoints, state, step)) is not None:
                return older
            step = checkpoints.latest_step() if step is None else step
            where = checkpoints.directory / str(step)
            changed = _layout_change(cfg, recorded, where)
            if changed is not None:
                raise changed from e
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UsageError(f"cannot restore {where}: it does not fit this run's model and settings ({first}); "
                             f"use the --model and the {', '.join(STATE_STRUCTURE_SETTINGS)} settings of the run "
                             "that saved it") from e
    except CheckpointUnreadable as e:   # (also when read in the earlier EMA layout)
        raise _unreadable(e, flag, sorted(checkpoints.all_steps())) from e


def _check_processes_loaded_the_same_data(dataset, error: DataError | None, source: str) -> None:
    """Every process loads the training data itself; the global batch is only right when all of them
    hold the same rows. One exchange tells every process which ones could not load the data, or
    loaded other rows (a missing file skipped on one host's local copy), instead of letting the
    others wait forever in the first collective or train on mismatched batches. Raises the
    process's own DataError, or a DataError naming the processes that differ."""
    fingerprint = dataset.fingerprint if dataset is not None else "0" * 14
    mine = [error is None, len(dataset) if dataset is not None else 0, int(fingerprint[:7], 16),
            int(fingerprint[7:14], 16)]
    rows = parallel.gather_from_processes(np.array(mine))
    if error is not None:
        raise error
    failed = [i for i, row in enumerate(rows) if not row[0]]
    if failed:
        raise DataError(f"{source}: processes {', '.join(map(str, failed))} could not load the training data "
                        "(their logs say why)")
    differ = [i for i, row in enumerate(rows) if (row != rows[0]).any()]
    if differ:
        sizes = ", ".join(f"process {i}: {row[1]} rows" for i, row in enumerate(rows))
        raise DataError(f"{source}: the processes loaded different training data ({sizes}; processes "
                        f"{', '.join(map(str, differ))} differ from process 0 in their rows or captions); every "
                        "host needs the same copy of the data")


def _output_dir_is_the_walked_data(cfg: TrainConfig, out: Path) -> bool:
    """Whether ``out`` is the training-data folder itself in the layout of a caption file beside
    each image, which is read by walking the folder (a run's folder inside it is left out, not the
    folder itself): the run's own images would become rows without captions. A folder read from
    its image_captions.csv or metadata file reads only the images listed there."""
    data = Path(cfg.train_data).expanduser()
    return (not cfg.train_data.startswith(TFDS_PREFIX) and data.is_dir() and data.resolve() == out.resolve()
            and not any((data / name).is_file() for name in (CAPTIONS_FILENAME, *METADATA_FILENAMES)))


def _sample_step(path: Path) -> int:
    """The step of a ``samples/step-NNNNNN.png`` (-1 for another name matching ``step-*.png``)."""
    digits = path.stem.removeprefix("step-")
    return int(digits) if digits.isdigit() else -1


def _set_aside_checkpoints_after(out: Path, step: int, existing: list[int]) -> list[Path]:
    """Move the checkpoints after ``step`` to ``OUTPUT_DIR/abandoned_checkpoints/STEP`` (``STEP-2``...
    where a folder of that name is there from an earlier fallback): a resume takes the newest
    checkpoint, and Orbax would save no step below them. Process 0 moves them; every process waits
    for it, and all raise its error. Returns where they went (on process 0)."""
    moved, error = [], None
    later = [s for s in existing if s > step]
    if later and jax.process_index() == 0:
        aside = out / SET_ASIDE_DIR
        try:
            aside.mkdir(exist_ok=True)
            for s in later:
                target, n = aside / str(s), 2
                while target.exists():
                    target, n = aside / f"{s}-{n}", n + 1
                os.replace(out / "checkpoints" / str(s), target)   # a rename: the same file system
                moved.append(target)
        except OSError as e:
            error = UsageError(f"--resume-step {step}: cannot move the later checkpoints to {aside}: {e}")
    failed = parallel.processes_that_failed(error is None)
    if error is not None:
        raise error
    if failed:
        raise UsageError(f"--resume-step {step}: process 0 could not move the later checkpoints (its log says why)")
    return moved


def _check_processes_share_the_output_dir(out: Path, *, create: bool) -> None:
    """Multi-host runs need one output folder that every host sees: Orbax writes a checkpoint from
    every process and commits it from process 0, and a resume or an export must find the same steps
    on every host. On host-local disks the processes would disagree (one resumes, another starts at
    step 0) and hang in their first collective. Each process writes a file named by a token all of
    them know, then reports which of the others' files it sees; every process raises the same
    UsageError naming the processes that see another folder or cannot write to it. ``create``
    makes the folder first (a fresh run); without it, a folder no process has is left to the
    caller's own error (an export's "no checkpoint"). One process with ``create``: only that the
    folder, or the nearest folder above it that exists, can be written."""
    if jax.process_count() == 1:
        problem = create and unwritable_folder(out)   # before the model and data load; touches nothing of out
        if problem:
            raise UsageError(f"--output-dir {out}: {problem}")
        return
    needs = "a multi-host run needs an output folder every host shares (NFS, or a bucket mounted with gcsfuse)"
    me = jax.process_index()
    tokens = parallel.gather_from_processes(np.random.default_rng().integers(0, 2**31 - 1, size=1))[:, 0]
    names = [f".sdjax-host-check-{i}-{token}" for i, token in enumerate(tokens)]
    try:
        if create:
            out.mkdir(parents=True, exist_ok=True)
        (out / names[me]).touch()
        wrote = True
    except OSError:
        wrote = False
    failed = parallel.processes_that_failed(wrote)   # also: every file is written now
    sees = parallel.gather_from_processes(np.array([(out / name).is_file() for name in names]))
    if wrote:
        (out / names[me]).unlink(missing_ok=True)
    if not create and len(failed) == len(names):
        return
    if failed:
        raise UsageError(f"--output-dir {out}: processes {', '.join(map(str, failed))} cannot write there"
                         + ("" if create else " (is the folder missing on their hosts?)") + f"; {needs}")
    blind = [i for i, row in enumerate(sees) if not row.all()]
    if blind:
        raise UsageError(f"--output-dir {out}: processes {', '.join(map(str, blind))} of {len(sees)} do not see "
                         f"the files the others write there; {needs}")


@dataclasses.dataclass
class Trainer:
    """Everything a run holds; built by `Trainer.create` (training) or `Trainer.for_export` (a
    checkpoint's weights only: no data, step function or metrics log), driven by `run` (or `train`)."""
    cfg: TrainConfig
    out: Path
    mesh: Any
    pipe: StableDiffusion            # master (fp32) models + tokenizer + scheduler config; its
                                     # arrays are the state's and frozen's (one copy on each device)
    graphdefs: S.Graphdefs
    frozen: S.Frozen | None          # None from for_export
    state: S.TrainState
    data: BatchIterator | None       # None from for_export
    checkpoints: Checkpointer
    step_cfg: S.StepConfig           # the static settings `step_fn` was compiled with
    step_fn: Any                     # None from for_export
    log: MetricsLog | None           # None from for_export
    latent_cache: tuple | None = None   # (mean, std) float32 [N, h, w, 4] per dataset image
    # LoRA runs: the models' weights as loaded, which the trained LoRA changes ({"unet", "text_encoder"})
    base: dict | None = None
    # int32 [captions, 77]: every caption of every example tokenized once, the examples' one after
    # another; example i's start at caption_starts[i] (int64 [N]). None from for_export.
    caption_ids: np.ndarray | None = None
    caption_starts: np.ndarray | None = None
    closed: bool = dataclasses.field(default=False, init=False, repr=False)   # set by `close`

    @classmethod
    def create(cls, cfg: TrainConfig, *, mesh=None, resume_step: int | None = None) -> "Trainer":
        """A run ready to train: a fresh one, or with ``cfg.resume`` the one whose checkpoints are
        in ``OUTPUT_DIR/checkpoints`` (from its latest). Raises UsageError, before anything in the
        output folder is touched, for a fresh run in a folder that has checkpoints: its own would
        never be saved (Orbax skips a step not above the newest) and a later resume or export
        would take the old run's weights.

        ``resume_step`` (with ``cfg.resume``): resume from that checkpoint instead, e.g. one from
        before a divergence. The later checkpoints are moved, once everything has loaded, to
        ``OUTPUT_DIR/abandoned_checkpoints/`` (nothing is deleted), and the metrics after it dropped."""
        out = Path(cfg.output_dir)
        try:
            cfg.validate()
        except ValueError as e:
            if cfg.resume and (out / RUN_CONFIG_FILE).is_file():   # from Python, with the run's settings left out
                raise ValueError(f"{e}; to resume with the settings recorded in {out / RUN_CONFIG_FILE}, build the "
                                 f"config with TrainConfig.from_run({str(out)!r}, ...)") from e
            raise
        parallel.initialize_distributed()
        mesh = mesh or parallel.data_mesh()
        if parallel.data_size(mesh) != mesh.size:
            raise ValueError(f"training splits each batch over every device of its mesh, and this one has axes "
                             f"{dict(mesh.shape)}: pass a mesh whose only axis of more than one device is "
                             f"{parallel.DATA_AXIS!r} (sdjax.parallel.data_mesh(devices))")
        main = jax.process_index() == 0
        _check_processes_share_the_output_dir(out, create=True)
        existing = checkpoint_steps(out / "checkpoints")
        if not (cfg.resume and existing) and _output_dir_is_the_walked_data(cfg, out):
            raise UsageError(f"--output-dir {out} is the --train-data folder, whose images (each with a caption file "
                             "beside it) are found by walking it: the run's samples and loss curve would be read as "
                             "images without captions, bad rows that a --resume stops at; choose another "
                             "--output-dir (a folder inside the data is left out of it)")
        if resume_step is not None and (not cfg.resume or resume_step not in existing or resume_step > cfg.max_steps):
            raise UsageError(f"--resume-step {resume_step}: " + (
                "only with --resume" if not cfg.resume else
                f"past --max-steps {cfg.max_steps}" if resume_step in existing else
                f"no checkpoint {resume_step} in {out / 'checkpoints'} (it has "
                f"{', '.join(map(str, existing)) or 'none'})"))
        if existing and not cfg.resume:
            raise UsageError(f"{out / 'checkpoints'} has checkpoints up to step {existing[-1]}: pass --resume to "
                             f"continue that run (from Python, TrainConfig.from_run({str(out)!r}, ...)), or choose "
                             "another --output-dir")
        export = [p.name for p in (out / "final", cls.single_file_path(out / "final"))   # (an empty final/: a mount)
                  if p.is_file() or (p.is_dir() and any(p.iterdir()))]
        if export and not existing:   # its checkpoints deleted to free the disk: the export is what is left of it
            raise UsageError(f"{out} holds an earlier run's export ({', '.join(export)}) and no checkpoints: this "
                             "run would replace it; choose another --output-dir, or move it away")
        recorded = _read_run_config(out)   # the settings of the run whose checkpoints these are
        if cfg.resume and existing and recorded and main:
            now = _record(cfg)
            changed = [f"{k}={now[k]!r} (was {v!r})" for k, v in recorded.items() if k in now and now[k] != v]
            if changed:
                print("resuming with settings changed from the recorded run: " + ", ".join(changed))
        # What the record and the checkpoint's data position can refuse is refused before the model
        # and the training state load (a minute or more for SD v1.5).
        resume_from = (existing[-1] if resume_step is None else resume_step) if cfg.resume and existing else None
        if resume_from is not None:
            if resume_from > cfg.max_steps:
                raise UsageError(f"--max-steps {cfg.max_steps}: the run in {out} is already at step {resume_from}; "
                                 "pass a larger --max-steps to train on, or export an earlier checkpoint with "
                                 "--export --export-step N")
            changed = _layout_change(cfg, recorded, out / "checkpoints" / str(resume_from))
            if changed is not None:
                raise changed
            if cfg.lora_rank is not None and (problem := lora_export_problem(out / "final")):
                raise UsageError(f"{problem}, and this run exports there once trained: move them away first")
        if cfg.warmup_steps >= cfg.max_steps and main:
            warnings.warn(f"warmup_steps={cfg.warmup_steps} is not below max_steps={cfg.max_steps}: the learning "
                          f"rate reaches {(cfg.max_steps - 1) / cfg.warmup_steps:.0%} of {cfg.learning_rate:g} at the "
                          "last update (lower --warmup-steps)", stacklevel=2)
        if cfg.gradient_checkpointing and jax.default_backend() == "cpu" and main:
            warnings.warn("gradient_checkpointing saves no memory on the CPU: XLA:CPU drops jax.checkpoint's "
                          "optimization barriers before its last CSE and scheduling passes, so the recomputation "
                          "is merged back into the forward pass or scheduled early (BENCHMARKS.md); XLA:GPU "
                          "drops them only after scheduling.", stacklevel=2)
        try:
            dataset, error = load_captioned_images(cfg.train_data, image_key=cfg.image_key,
                                                   caption_key=cfg.caption_key, data_dir=cfg.tfds_data_dir,
                                                   skip_bad_rows=cfg.skip_bad_rows), None
        except DataError as e:
            if cfg.resume and existing and not Path(cfg.train_data).expanduser().exists() and ":" not in cfg.train_data:
                e = DataError(f"{e}; the run being resumed was trained on it: if it has moved, pass --train-data "
                              "with its new place")
            dataset, error = None, e
        _check_processes_loaded_the_same_data(dataset, error, cfg.train_data)
        global_batch = cfg.batch_size * cfg.gradient_accumulation * parallel.data_size(mesh)
        if len(dataset) < global_batch:   # before the model is loaded: an epoch would have no step
            # (a resume's settings not given as flags are the record's, perhaps from an earlier resume)
            recorded_note = f", the ones not given as flags from {out / 'train_config.json'}" if resume_from else ""
            raise UsageError(f"{cfg.train_data}: {count(len(dataset), 'usable example')}, fewer than one global batch "
                             f"of {global_batch} (--batch-size {cfg.batch_size} x {parallel.data_size(mesh)} devices x "
                             f"--gradient-accumulation {cfg.gradient_accumulation}{recorded_note}): lower them, use "
                             "fewer devices (e.g. CUDA_VISIBLE_DEVICES=0), or add examples")
        per_process = cfg.batch_size * cfg.gradient_accumulation * len(mesh.local_devices)
        data = BatchIterator(dataset, resolution=cfg.resolution, batch_size_per_process=per_process,
                             process_index=jax.process_index(), process_count=jax.process_count(), seed=cfg.seed,
                             center_crop=cfg.center_crop, random_flip=cfg.random_flip,
                             micro_batches=cfg.gradient_accumulation)
        checkpoints, log, set_aside = None, None, []
        try:   # on any failure from here on, the loader threads and Orbax's manager are closed
            if resume_from is not None:   # a changed seed, global batch or dataset: refused before the model loads
                try:
                    position = read_data_position(out / "checkpoints", resume_from)
                except CheckpointUnreadable as e:
                    raise _unreadable(e, "--resume-step", existing) from e
                data.restore(position)
            pipe, graphdefs, step_cfg, optimizer, lr, state, base = _build_model(cfg, mesh)
            all_captions = [text for texts in dataset.caption_sets for text in texts]
            caption_ids = tokenize(pipe.tokenizer, all_captions, warn=False)   # once, not per step
            caption_starts = np.cumsum([0] + [len(texts) for texts in dataset.caption_sets[:-1]], dtype=np.int64)
            if main:
                long = too_long(pipe.tokenizer, all_captions)
                several = len(all_captions) > len(dataset)
                print(f"training data: {count(len(dataset), 'example')}"
                      + (f" with {count(len(all_captions), 'caption')} (one per epoch)" if several else "")
                      + f" from {cfg.train_data}"
                      + (f" ({count(len(dataset.skipped), 'bad row')} skipped)" if dataset.skipped else "")
                      + (f"; {count(len(long), 'caption')} over {pipe.tokenizer.model_max_length} tokens, cut to the "
                         f"first {pipe.tokenizer.model_max_length} (CLIP's window)" if long else ""))
                small = dataset.smaller_than(cfg.resolution)
                if small:
                    examples = ", ".join(f"{dataset.names[i]} {dataset.shorter_sides[i]} px" for i in small[:3])
                    warnings.warn(f"{cfg.train_data}: {len(small)} of {count(len(dataset), 'image')} are smaller than "
                                  f"--resolution {cfg.resolution} on their shorter side ({examples}"
                                  f"{', ...' if len(small) > 3 else ''}): they are upscaled, so they teach blurred "
                                  "detail; lower --resolution, or leave them out", stacklevel=2)
            frozen = S.Frozen(vae=_pure(pipe.vae),
                              text_encoder=(base["text_encoder"] if base is not None else
                                            None if cfg.train_text_encoder else _pure(pipe.text_encoder)),
                              unet=base["unet"] if base is not None else None,
                              alphas_cumprod=jnp.asarray(make_noise_schedule(pipe.scheduler_config)),
                              empty_ids=jnp.asarray(tokenize(pipe.tokenizer, [""])[0]),
                              scaling_factor=jnp.float32(pipe.vae.scaling_factor))
            frozen = parallel.replicate(frozen, mesh)
            step_fn = S.jit_train_step(mesh, graphdefs=graphdefs, cfg=step_cfg, optimizer=optimizer, lr_schedule=lr)
            checkpoints = Checkpointer(out / "checkpoints", max_to_keep=cfg.keep_checkpoints)
            resumed = None
            if cfg.resume and checkpoints.latest_step() is not None:
                # (its data position: above)
                state, _ = _restore(checkpoints, state, resume_step, cfg, recorded, "--resume-step")
                resumed = int(state.step)
                if resume_step is not None and resume_step < existing[-1]:   # all checked: move the later ones
                    checkpoints.close()   # Orbax lists the steps when opened: it must not see the later ones
                    checkpoints = None
                    set_aside = _set_aside_checkpoints_after(out, resume_step, existing)
                    checkpoints = Checkpointer(out / "checkpoints", max_to_keep=cfg.keep_checkpoints)
                if main:
                    print(f"resumed from {checkpoints.directory} at step {resumed}"
                          + (f"; the later checkpoints moved to {set_aside[0].parent}: "
                             + ", ".join(p.name for p in set_aside) if set_aside else ""))
            elif cfg.resume and main:
                print(f"--resume: no checkpoint in {checkpoints.directory} yet, starting from step 0")
            if main:
                out.mkdir(parents=True, exist_ok=True)
                record = json.dumps(_record(cfg), indent=2) + "\n"  # atomically: a resume and an export need it
                atomic_write(out / RUN_CONFIG_FILE, lambda tmp: tmp.write_text(record))
                for old in (out / "samples").glob("step-*.png"):   # a fresh run: an earlier run's would pass
                    if resumed is None or _sample_step(old) > resumed:   # for its own; a resume: those past it
                        old.unlink()
            log = MetricsLog(out, enabled=main, spike_factor=cfg.spike_factor, resume_from_step=resumed)
            trainer = cls(cfg, out, mesh, pipe, graphdefs, frozen, state, data, checkpoints, step_cfg, step_fn, log,
                          caption_ids=caption_ids, caption_starts=caption_starts, base=base)
            if resumed is not None:
                trainer._share_state_weights()
            if cfg.cache_latents:
                trainer.latent_cache = trainer.encode_dataset()
        except BaseException:
            for part in (checkpoints, log, data):
                if part is not None:
                    part.close()
            raise
        return trainer

    @classmethod
    def for_export(cls, cfg: TrainConfig, *, step: int | None = None, mesh=None) -> "Trainer":
        """The model of checkpoint ``step`` (default: the latest) of the run in ``cfg.output_dir``,
        for `export` and `sampling_pipeline`. Loads no training data and writes nothing: no
        metrics log, no train_config.json (on several hosts, only the shared-folder check's marker
        files, removed at once). Raises UsageError, before loading the model, when there
        is no such checkpoint."""
        cfg.validate(need_data=False)
        parallel.initialize_distributed()
        mesh = mesh or parallel.data_mesh()
        out = Path(cfg.output_dir)
        _check_processes_share_the_output_dir(out, create=False)
        directory = out / "checkpoints"
        existing = checkpoint_steps(directory)
        if not existing:
            raise UsageError(f"--export: no checkpoint in {directory.absolute()}")
        if step is not None and step not in existing:
            raise UsageError(f"--export-step {step}: no checkpoint {step} in {directory.absolute()} "
                             f"(it has {', '.join(map(str, existing))})")
        recorded = _read_run_config(out)   # a changed structure or LoRA alpha: refused before the model loads
        if (changed := _layout_change(cfg, recorded, directory / str(existing[-1] if step is None else step))):
            raise changed
        pipe, graphdefs, step_cfg, _, _, state, base = _build_model(cfg, mesh)
        checkpoints = Checkpointer(directory, max_to_keep=cfg.keep_checkpoints, create=False)
        try:
            state, _ = _restore(checkpoints, state, step, cfg, recorded, "--export-step")
        except BaseException:
            checkpoints.close()
            raise
        trainer = cls(cfg, out, mesh, pipe, graphdefs, None, state, None, checkpoints, step_cfg, None, None, base=base)
        trainer._share_state_weights()
        return trainer

    def encode_dataset(self, batch_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
        """The VAE posterior (mean, std) of every dataset image, for ``cache_latents``; each call's
        ``batch_size`` images (rounded up to a multiple of the devices) split over the devices."""
        @jax.jit
        def encode(graphdef, state, pixels):
            posterior = nnx.merge(graphdef, state).encode(pixels)
            return posterior.mean, posterior.std

        vae_state, n = self.frozen.vae, len(self.data.dataset)
        per_call = parallel.padded_size(batch_size, self.mesh)   # every call the same shape: one compile
        means, stds = [], []
        for start in range(0, n, per_call):
            stop = min(start + per_call, n)
            pixels = np.stack([preprocess_image(self.data.dataset.get_image(i, min_side=self.cfg.resolution),
                                                resolution=self.cfg.resolution)
                               for i in range(start, stop)])
            sharded = parallel.shard_batch(parallel.pad_batch(pixels, per_call), self.mesh)
            mean, std = encode(self.graphdefs.vae, vae_state, sharded)
            means.append(parallel.to_host(mean)[: stop - start].astype(np.float32))
            stds.append(parallel.to_host(std)[: stop - start].astype(np.float32))
        return np.concatenate(means), np.concatenate(stds)

    # ------------------------------------------------------------------ the loop
    def next_batch(self) -> dict:
        """The next global batch as [accumulation, B, ...] arrays split over the data axis (each
        process holds its columns of every micro-batch, see `BatchIterator`)."""
        if self.latent_cache is not None:  # no image decoding: look the posterior up
            step = self.data.step
            indices = self.data.indices_for_step(step)
            picks = self.data.caption_picks(step, indices)
            self.data.step += 1
            host = {"latent_mean": self.latent_cache[0][indices], "latent_std": self.latent_cache[1][indices]}
        else:
            batch = next(self.data)
            indices, picks = batch["indices"], batch["caption_picks"]
            host = {"pixel_values": np.asarray(batch["pixel_values"], np.float32)}
        host["input_ids"] = self.caption_ids[self.caption_starts[indices] + picks]
        accum = self.cfg.gradient_accumulation
        return {k: parallel.shard_process_batch(a.reshape(accum, a.shape[0] // accum, *a.shape[1:]), self.mesh, axis=1)
                for k, a in host.items()}

    def _check_open(self, action: str) -> None:
        if self.closed:
            raise RuntimeError(f"cannot {action}: this Trainer is closed (its checkpoint manager and metrics log are "
                               "released); to train on from its last checkpoint, build another: Trainer.create("
                               f"TrainConfig.from_run({str(self.out)!r}, max_steps=...))")

    def save_checkpoint(self) -> None:
        """Start saving the state and the data position as checkpoint ``state.step`` in the background
        (`close`, or the next save, waits for it). Raises RuntimeError for a step not above the newest
        checkpoint (Orbax would skip it), and after `close`."""
        self._check_open("save a checkpoint")
        self.checkpoints.save(int(self.state.step), self.state, self.data.state())

    def run(self, *, progress: bool = True, stop: StopRequest | None = None) -> S.TrainState:
        """Train to ``max_steps``: log, sample, checkpoint; stop (keeping the last good checkpoint)
        on a NaN loss. Returns the final state; ``self.pipe`` then holds its weights (their EMA where
        kept). During the run the pipeline shares the state's arrays, which each step
        replaces (``sampling_pipeline`` points it at the current ones).

        ``stop``: once requested, the run saves a checkpoint of the step in flight and raises
        `Stopped`. On several processes a SIGTERM to any of them (JAX's preemption service) does
        the same, every process at the same step."""
        self._check_open("run")
        cfg, main = self.cfg, jax.process_index() == 0
        preempted = _preemption_sync_point()
        start = int(self.state.step)
        bar = None
        if progress and main:
            from tqdm.auto import tqdm
            bar = tqdm(total=cfg.max_steps, initial=start, desc="training", unit="step")
        global_batch = cfg.batch_size * parallel.data_size(self.mesh) * cfg.gradient_accumulation
        # images/s over the last RATE_STEPS steps or more, on a clock that stops for saves and
        # samples: (step, clock) marks of logged steps; the first row alone includes compilation.
        timing = {"paused": 0.0, "first_row": True}
        marks = collections.deque([(start, time.perf_counter())])

        def report(step: int, metrics: dict, log_now: bool, check: bool = True) -> None:
            """Read a step's metrics on the host: stop on a NaN/inf loss or gradient norm, and log.
            Reading waits for the step to finish, so images/s is timed between finished steps (the
            times of dispatch, which is asynchronous, jump around saves and the first steps). A
            read can still come late (a host thread busy with a save; a dispatch that waited), the
            next one then early: over several intervals that evens out."""
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            finished = time.perf_counter() - timing["paused"]
            bad = next((k for k in ("loss", "grad_norm") if not math.isfinite(metrics[k])), None)
            if bad and check:
                self.log.record(step, metrics)
                raise TrainingDiverged(f"{'loss' if bad == 'loss' else 'gradient norm'} is {metrics[bad]} at step "
                                       f"{step}; stopped without saving. {self._divergence_hint()}")
            if log_now:
                marks.append((step, finished))
                while len(marks) > 2 and step - marks[1][0] >= RATE_STEPS:
                    marks.popleft()
                since_step, since = marks[0]
                metrics["images_per_s"] = global_batch * (step - since_step) / (finished - since)
                if timing["first_row"]:   # later rows leave the compilation out
                    timing["first_row"] = False
                    marks.popleft()
                if self.log.record(step, metrics) and main:
                    msg = f"warning: loss spike at step {step}: {metrics['loss']:.4g}"
                    (bar.write if bar else print)(msg)
                if bar:
                    bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}",
                                    img_s=f"{metrics['images_per_s']:.2f}")

        # A logged step's metrics are read once the next step is queued, so the devices never wait for
        # the host's logging and batch assembly; before a save or a sample they are read at once: a
        # diverged state (NaN/inf loss or gradients) must never become a checkpoint.
        pending = None   # (step, metrics, log_now) of a logged step not read yet
        failure = None   # the error the run stops with
        if stop is not None:
            stop.watched = True
        try:
            for step in range(start + 1, cfg.max_steps + 1):
                self.state, metrics = self.step_fn(self.state, self.frozen, self.next_batch())
                if pending is not None:
                    done, pending = pending, None   # cleared first: a NaN raised here logs its row once
                    report(*done)
                log_now = step % cfg.log_every == 0 or step == cfg.max_steps
                save_now = step % cfg.checkpoint_every == 0 or step == cfg.max_steps
                sample_now = bool(cfg.sample_every) and step % cfg.sample_every == 0 and step != cfg.max_steps
                if save_now or sample_now:
                    report(step, metrics, log_now)
                elif log_now:
                    pending = (step, metrics, log_now)
                if bar:
                    bar.update(1)
                paused = time.perf_counter()   # images_per_s counts training steps, not saves and samples
                if save_now:
                    self.save_checkpoint()
                if sample_now:
                    self.write_samples(step)
                    self._share_state_weights()
                timing["paused"] += time.perf_counter() - paused
                self.checkpoints.check()   # a background save that failed (a full disk) stops the run now
                if stop is not None and stop.interrupted:   # a Ctrl-C whose KeyboardInterrupt was swallowed
                    raise KeyboardInterrupt
                # The preemption check on every step, by every process, as JAX's service requires.
                if (preempted is not None and preempted()) or (stop is not None and stop.requested):
                    if not (save_now or sample_now):
                        pending = None
                        report(step, metrics, log_now)   # a diverged state must not become a checkpoint
                    if not save_now:
                        self.save_checkpoint()
                    raise Stopped(step)
        except BaseException as e:
            failure = e
            if pending is not None:   # the step ran: its row still goes into metrics.jsonl (Ctrl-C, a crash)
                try:
                    report(*pending, check=False)
                except Exception:   # noqa: BLE001  (the error being raised matters more)
                    pass
            raise
        finally:
            if bar:
                bar.close()
            with _after(failure):
                self.checkpoints.wait()   # a second SIGTERM meanwhile is taken as the same stop
            with _after(failure):
                self.log.plot_loss()
            if stop is not None:
                stop.watched = False
        if self.pipe is not None:
            self.sampling_pipeline()   # the pipeline's weights were the state's, which the steps donated
        return self.state

    def _divergence_hint(self) -> str:
        """What to do after a NaN loss, naming the checkpoints to fall back to. Checkpoint k holds the
        weights after update k; only a finite loss at a later step vouches for them, so the newest
        one may be where the divergence began."""
        saved = [self.checkpoints.directory / str(k) for k in sorted(self.checkpoints.all_steps())]
        if len(saved) > 1:
            return (f"The newest checkpoint is {saved[-1]} (finite, but its weights may be diverging). Lower "
                    f"--learning-rate and --resume; if that diverges again, resume from the one before with "
                    f"--resume-step {saved[-2].name}.")
        if saved:
            return (f"The only checkpoint is {saved[0]} (finite, but its weights may be diverging). Lower "
                    "--learning-rate and --resume; if that diverges again, start a new run with a lower "
                    "--learning-rate in another --output-dir.")
        return ("No checkpoint was saved before it: run again with a lower --learning-rate (the same command; "
                "there is nothing to resume).")

    # ------------------------------------------------------------------ samples and export
    def _share_state_weights(self) -> None:
        """Point the pipeline at the state's weights, which are replicated like its own (no copy):
        after a restore (else it keeps the loaded ones beside them) and after mid-run samples (else
        it keeps the EMA, split over the devices in the state, gathered whole on every device). A LoRA
        run's pipeline gets the loaded weights back (it keeps no merged copy of the changed kernels)."""
        if self.base is not None:
            spec = self.step_cfg.lora
            self.pipe.set_params(**{part: lora.target_kernels(self.base[part], spec, part) for part in spec.parts},
                                 partial=True)
            return
        self.pipe.set_params(unet=self.state.params["unet"], text_encoder=self.state.params.get("text_encoder"))

    def trained_params(self, *, use_ema: bool = True) -> dict:
        """``{"unet": ..., ["text_encoder": ...]}``: the trained weights, their EMA when kept (a LoRA
        run's: ``{"lora": {kohya module name: {"down", "up"}}}``)."""
        return self.state.ema if (use_ema and self.state.ema is not None) else self.state.params

    def sampling_pipeline(self, *, use_ema: bool = True) -> StableDiffusion:
        """The pipeline with the current trained weights (EMA when kept; a LoRA run's merged into the
        loaded weights)."""
        trained = self.trained_params(use_ema=use_ema)
        if self.base is not None:
            spec, changes = self.step_cfg.lora, parallel.replicate(trained["lora"], self.mesh)   # (the EMA's: split)
            self.pipe.set_params(**{part: lora.merged(self.base[part], changes, spec, part, only_targets=True)
                                    for part in spec.parts}, partial=True)
            return self.pipe
        self.pipe.set_params(unet=trained["unet"], text_encoder=trained.get("text_encoder"))
        return self.pipe

    def validation_prompts(self) -> list[str]:
        """The prompts of the run's samples: ``validation_prompts``, else the first two distinct captions."""
        if self.cfg.validation_prompts:
            return list(self.cfg.validation_prompts)
        if self.data is None:
            raise ValueError("no validation prompts: set validation_prompts (a Trainer from for_export has no "
                             "dataset to take the first captions from)")
        return list(dict.fromkeys(self.data.dataset.captions))[:2]

    def write_samples(self, step: int) -> list[Path]:
        """Sample every validation prompt with every validation seed (PNDM, ``sample_steps``) with the
        current (EMA) weights, and write them as one grid, ``samples/step-NNNNNN.png`` (process 0;
        the others return [])."""
        pipe = self.sampling_pipeline()
        prompts, seeds = self.validation_prompts(), [int(s) for s in self.cfg.validation_seeds]
        jobs = [(p, s) for p in prompts for s in seeds]
        out = pipe([p for p, _ in jobs], seeds=[s for _, s in jobs], num_inference_steps=self.cfg.sample_steps,
                   guidance_scale=self.cfg.sample_guidance_scale, height=self.cfg.resolution,
                   width=self.cfg.resolution, scheduler=SAMPLE_SCHEDULER)
        if jax.process_index() != 0:
            return []
        directory = self.out / "samples"
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"step-{step:06d}.png"
        save_png(image_grid(out.images, columns=len(seeds)), path)
        return [path]

    def export(self, directory: str | os.PathLike | None = None) -> Path | None:
        """A LoRA run: the folder ``directory`` (default ``OUTPUT_DIR/final``) with the trained LoRA
        (EMA when kept) as ``pytorch_lora_weights.safetensors`` in kohya's format, which
        ``sample.py --lora``, ``StableDiffusion.fuse_lora``, diffusers' ``load_lora_weights(folder)``,
        AUTOMATIC1111 and ComfyUI load; a folder holding other files is refused (FileExistsError).

        Otherwise a complete pipeline folder with the trained weights (EMA when kept), loadable by
        sdjax and by diffusers' PyTorch StableDiffusionPipeline; with ``export_single_file``, also
        ``<directory>.safetensors`` beside it, the single file AUTOMATIC1111 and ComfyUI load
        (without, an earlier export's single file there is removed). The folder is replaced whole: a
        ``directory`` given that holds something other than a pipeline (no ``model_index.json``) is
        refused with FileExistsError, and weights that are not finite (the state after a
        `TrainingDiverged`: export a checkpoint from before it, `for_export`) with ValueError. Returns
        the folder (None on processes other than 0, which write nothing)."""
        trained = self.trained_params()
        if not _finite(trained):
            raise ValueError(f"the trained weights at step {int(self.state.step)} are not finite (a diverged run): "
                             "not exported; export a checkpoint from before it (Trainer.for_export, --export-step)")
        pipe = self.sampling_pipeline()
        given, directory = directory is not None, Path(directory or self.out / "final")
        if self.base is not None:
            return self._export_lora(directory, trained["lora"])
        if jax.process_index() != 0:
            return None
        if given and directory.is_dir() and any(directory.iterdir()) and not (directory / "model_index.json").exists():
            raise FileExistsError(f"{directory} holds files and no model_index.json: an export replaces its folder "
                                  "with everything in it; export to a new or empty folder, or over an earlier export")
        single_file = self.single_file_path(directory)
        prediction_type = pipe.scheduler_config.get("prediction_type", "epsilon")
        if self.cfg.export_single_file and prediction_type != "epsilon":
            # The original layout has no place for it: a loader given the file alone assumes epsilon.
            warnings.warn(f"{single_file.name} holds a {prediction_type} model, which nothing in the file says: "
                          f"load it with {directory.name}/'s configs (sdjax: --model-config {directory}, the "
                          "default beside it; diffusers: from_single_file(..., config=...)) or set v-prediction "
                          f"in the tool (AUTOMATIC1111: a copy of v1-inference.yaml named {single_file.stem}.yaml "
                          "beside it, with parameterization: \"v\" added under model.params; ComfyUI: a "
                          "ModelSamplingDiscrete node set to v_prediction)", stacklevel=2)
        if not self.cfg.export_single_file:
            pipe.save_pretrained(directory, format=self.cfg.export_format, overwrite=True)
            single_file.unlink(missing_ok=True)  # an earlier export's: it would pass for this one
            return directory
        # The pair is replaced together: the single file is written first under a temporary name, so a
        # failure in either write leaves the earlier export's folder and file as they were.
        pending = single_file.with_name(f".{single_file.stem}.pending.safetensors")
        try:
            # overwrite: a killed export's leftover
            pipe.save_single_file(pending, dtype=self.cfg.export_single_file, overwrite=True)
            pipe.save_pretrained(directory, format=self.cfg.export_format, overwrite=True)
            os.replace(pending, single_file)
        finally:
            pending.unlink(missing_ok=True)
        return directory

    def _export_lora(self, directory: Path, trained: dict) -> Path | None:
        """`export` of a LoRA run (see there)."""
        if problem := lora_export_problem(directory):   # every process (a shared folder): none joins the gather
            raise FileExistsError(f"{problem}; export to a new or empty folder, or over an earlier LoRA export")
        on_host = jax.tree.map(parallel.to_host, trained)   # every process: the EMA's arrays are split over them
        if jax.process_index() != 0:
            return None
        for leftover in _lora_write_leftovers(directory):   # of an export killed while writing
            leftover.unlink(missing_ok=True)
        spec = self.step_cfg.lora
        metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(spec.rank),
                    "ss_network_alpha": f"{spec.alpha:g}", "ss_base_model_version": "sd_v1",
                    "ss_output_name": self.out.name, "sdjax_step": str(int(self.state.step))}
        save_lora(directory / LORA_FILE_NAME, on_host, alpha=spec.alpha, metadata=metadata)
        return directory

    @staticmethod
    def single_file_path(directory: Path) -> Path:
        """Where `export` writes the single file of an export folder: ``final`` -> ``final.safetensors``."""
        return directory.with_name(directory.name + ".safetensors")

    def close(self) -> None:
        """Wait for the checkpoint being written, then close Orbax's manager, the metrics log and the
        data loader's threads. The trainer still samples and exports afterwards; `run` and
        `save_checkpoint` raise RuntimeError. Also at the end of a ``with Trainer.create(cfg) as
        trainer:`` block."""
        self.closed = True
        with contextlib.ExitStack() as closing:   # all three, also after a failed save's error (a full disk)
            if self.data is not None:
                closing.callback(self.data.close)
            if self.log is not None:
                closing.callback(self.log.close)
            self.checkpoints.close()

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        with _after(exc):   # as in `train`: a full disk met again while closing keeps the first error
            self.close()


def train(cfg: TrainConfig, *, progress: bool = True, stop: StopRequest | None = None,
          resume_step: int | None = None) -> Path | None:
    """Run a whole fine-tune: train, export ``final/``, write samples. Returns the export folder (None
    on processes other than 0).
    ``stop``: see `Trainer.run` (a requested stop raises `Stopped` after a checkpoint);
    ``resume_step``: see `Trainer.create`."""
    trainer = Trainer.create(cfg, resume_step=resume_step)
    failure = None
    try:
        trainer.run(progress=progress, stop=stop)
        final = trainer.export()   # before the samples: a failure there must not cost the export
        trainer.write_samples(cfg.max_steps)
        return final
    except BaseException as e:
        failure = e
        raise
    finally:
        with _after(failure):
            trainer.close()


@jax.jit
def _finite(tree) -> jax.Array:
    """Whether every value of ``tree`` is finite (one compiled reduction, whatever the arrays' placement)."""
    return jnp.all(jnp.stack([jnp.isfinite(a).all() for a in jax.tree.leaves(tree)]))


def _after(failure: BaseException | None):
    """Where a run winds down after ``failure``: a disk error (OSError) there is dropped when the run
    already stops with one. That is the same full disk met again (the loss curve, TensorBoard's
    last flush), and would replace the first error, the one naming the folder that failed."""
    return contextlib.suppress(OSError) if isinstance(failure, OSError) else contextlib.nullcontext()
