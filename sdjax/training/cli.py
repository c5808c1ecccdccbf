"""``train.py``'s command line: every `TrainConfig` field is a flag and a YAML config key.

Precedence: built-in defaults < ``--config`` YAML < flags given on the command line.
"""
from __future__ import annotations

import argparse
import dataclasses
import shlex
import typing
from pathlib import Path
from typing import Any, Sequence

from sdjax.cli_utils import (COMPILATION_CACHE_HELP, OneLineErrorParser, UsageError, parse_seeds, read_yaml_mapping,
                             resolve_config_path, setting_name)
from sdjax.training.loop import RUN_CONFIG_FILE, SET_ASIDE_DIR, TrainConfig, absolute_paths, recorded_settings

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "train"  # sample.py presets sit one level up

HELP = {
    "model": "Hub repo id, local diffusers pipeline folder, or single-file checkpoint (original SD layout; a path or "
             "a Hub file URL) to fine-tune",
    "model_config": "for a single-file --model: the pipeline folder or Hub repo id whose configs, tokenizer and "
                    "scheduler config it uses",
    "adam_b1": "AdamW beta1",
    "adam_b2": "AdamW beta2",
    "image_key": "TFDS: the image feature's name",
    "vae": "a VAE in place of the model's own, as sample.py --vae takes it (e.g. stabilityai/sd-vae-ft-mse or "
           "vae-ft-mse-840000-ema-pruned.safetensors): it encodes the training images and goes into final/",
    "variant": "load the model folder's variant weight files, e.g. fp16 (about half the download; trained in fp32)",
    "ema_weights": "for a single-file --model that holds the UNet twice (a training checkpoint such as "
                   "v1-5-pruned.ckpt: its weights and their EMA copy, model_ema.*): start from the EMA copy "
                   "(what diffusers' SD v1.5 folder holds)",
    "caption_key": "TFDS: the caption feature's name (several captions per image: one per epoch); a folder's "
                   "metadata.jsonl / metadata.csv: the caption column (default there: text, else caption)",
    "tfds_data_dir": "TFDS: the data_dir the dataset was prepared in (none: TFDS's default)",
    "seed": "seed of the data order, the noise and the timesteps (a run with the same seed repeats exactly)",
    "keep_checkpoints": "how many of the newest checkpoints to keep",
    "log_every": "print and log the loss every N steps",
    "sample_steps": "denoising steps of the sample images",
    "sample_guidance_scale": "guidance scale of the sample images",
    "export_format": "layout of OUTPUT_DIR/final: both, pytorch (safetensors) or flax (msgpack)",
    "spike_factor": "report a loss above this many times the median of the last 50 as a spike",
    "export_single_file": "also write OUTPUT_DIR/final.safetensors, the original SD single-file layout that "
                          "AUTOMATIC1111 and ComfyUI load, in this dtype: float16, bfloat16 or float32",
    "train_data": "folder with train_images/ and image_captions.csv, or images with metadata.jsonl or "
                  "metadata.csv (imagefolder), or images each with a caption file (a.png + a.txt), or "
                  "tfds:NAME[/CONFIG][:SPLIT]",
    "output_dir": "where checkpoints/, metrics.jsonl, samples/, tensorboard/ and final/ go",
    "resolution": "training image size (shorter side resized, then cropped square)",
    "batch_size": "images per device per micro-batch",
    "gradient_accumulation": "micro-batches averaged per optimizer update",
    "max_steps": "optimizer updates to run (500-1000 to start)",
    "learning_rate": "peak AdamW learning rate (1e-6 to 5e-5; lower if the loss is unstable)",
    "lr_schedule": "'constant' (or its diffusers name 'constant_with_warmup'), 'cosine', 'linear' (both to 0 at "
                   "--max-steps), 'cosine_with_restarts' or 'polynomial', each after --warmup-steps (diffusers' "
                   "schedules of those names)",
    "lr_num_cycles": "cosine_with_restarts: how many cosine decays to 0, each restarting at the peak",
    "lr_power": "polynomial: the exponent of the decay to 1e-7 (1: linear)",
    "warmup_steps": "linear learning-rate warmup steps",
    "weight_decay": "AdamW decoupled weight decay",
    "max_grad_norm": "global-norm gradient clipping (0 or none: off)",
    "ema_decay": "keep an EMA of the trained weights (e.g. 0.9999) and export it",
    "mixed_precision": "'bf16': bf16 activations with fp32 master weights; 'no': fp32",
    "gradient_checkpointing": "recompute UNet activations in the backward pass (less memory on GPUs, slower; no saving on the CPU)",
    "min_snr_gamma": "Min-SNR-gamma loss weighting (e.g. 5.0)",
    "noise_offset": "add a per-image, per-channel constant of this scale to the noise (e.g. 0.05-0.1): lets the "
                    "model learn very dark and very bright images (diffusers' --noise_offset)",
    "input_perturbation": "add noise of this scale (e.g. 0.1) to the UNet's input but not to its target, which "
                          "lessens the gap between training and sampling (diffusers' --input_perturbation)",
    "prediction_type": "train the model to predict 'epsilon' or 'v_prediction' (default: what its scheduler "
                       "config says); final/ records the new one. Changing it retrains the model: thousands of "
                       "steps, not hundreds",
    "caption_dropout": "probability of training on the empty caption (keeps guidance working)",
    "train_text_encoder": "also fine-tune the CLIP text encoder (with --lora-rank: LoRA of its attention too)",
    "lora_rank": "train LoRA of this rank (4-32 is usual) on the UNet's attention projections instead of the whole "
                 "model: far less memory, a small file: OUTPUT_DIR/final/pytorch_lora_weights.safetensors, which "
                 "sample.py --lora, diffusers and the web UIs load (none: train the whole model)",
    "lora_alpha": "LoRA's alpha: the changes are scaled by alpha / rank (none: the rank, a scale of 1)",
    "center_crop": "centre crop (else random crop)",
    "random_flip": "random horizontal flips",
    "cache_latents": "VAE-encode the dataset once instead of every step (needs centre crop, no flips)",
    "skip_bad_rows": "skip and count bad rows instead of stopping",
    "checkpoint_every": "save a checkpoint every N steps",
    "sample_every": "write sample images every N steps (0: only at the end)",
    "validation_prompts": "prompts for the sample images",
    "validation_seeds": "seeds for the sample images",
    "resume": "continue from the latest checkpoint in OUTPUT_DIR/checkpoints, with the settings in "
              "OUTPUT_DIR/train_config.json (flags given override them)",
}


def _field_type(field: dataclasses.Field) -> tuple[type, bool, bool]:
    """(element type, is_list, may be None) of a TrainConfig field, from its annotation."""
    hint = typing.get_type_hints(TrainConfig)[field.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if hint is list or typing.get_origin(hint) is list:
        return (int if field.name == "validation_seeds" else str), True, False
    base = args[0] if args else hint
    return base, False, type(None) in typing.get_args(hint)


def _convert(name: str, value: Any, origin: str) -> Any:
    field = {f.name: f for f in dataclasses.fields(TrainConfig)}[name]
    kind, is_list, optional = _field_type(field)
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null")
                         and (optional or kind is not str)):
        # A setting that takes no none: none (YAML's null, or a bare "key:") means its default, as
        # leaving the key out does (older runs recorded some that way in train_config.json).
        return None if optional else _default(field)
    if kind is str and isinstance(value, bool):
        if name == "mixed_precision" and value is False:   # YAML reads a bare `no` as false
            return "no"
        raise UsageError(f"{origin}: {name}={value!r}: YAML reads a bare yes/no/on/off/true/false as true or "
                         f"false; quote the text ({name}: \"{str(value).lower()}\")")

    def one(v):
        if kind is bool:
            if isinstance(v, bool):
                return v
            raise TypeError
        if kind is float and isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
        if kind is int and (isinstance(v, bool) or (isinstance(v, float) and not v.is_integer())):
            raise TypeError  # not silently 1 for 1.5 or true
        return kind(v)
    try:
        if name == "validation_seeds":   # sample.py's syntax too: 0-3, 3,7,9
            items = value if isinstance(value, (list, tuple)) else [value]
            return [seed for v in items for seed in (parse_seeds(v) if isinstance(v, str) else [one(v)])]
        if is_list:
            return [one(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
        return one(value)
    except UsageError as e:
        raise UsageError(f"{origin}: {name}={value!r}: {e}") from e
    except (TypeError, ValueError) as e:
        raise UsageError(f"{origin}: {name}={value!r} is not a valid {kind.__name__}") from e


def _default(field: dataclasses.Field) -> Any:
    return field.default if field.default is not dataclasses.MISSING else field.default_factory()


def _as_flag(name: str, value: Any) -> str:
    """``name=value`` as train.py's command-line flag (for messages)."""
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return flag if value else "--no-" + flag[2:]
    if value is None:
        return f"{flag} none"
    return " ".join([flag, *(shlex.quote(str(v)) for v in (value if isinstance(value, list) else [value]))])


def load_train_config(path: str | Path) -> dict[str, Any]:
    """A train.py preset (YAML) as TrainConfig fields, each converted to its type; an unknown key or
    a bad value is a UsageError naming the file and the key."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    out = {}
    for raw, value in read_yaml_mapping(path).items():
        key = setting_name(raw, out, path)
        if key not in known:
            raise UsageError(f"{path}: unknown key {raw!r} (known keys: {', '.join(sorted(known))})")
        out[key] = _convert(key, value, str(path))
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="train.py", description="Fine-tune Stable Diffusion v1.5 (sdjax).",
                                argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", help="YAML preset (a path, or a name in configs/train/: style, lora, "
                                         "low_memory)")
    parser.add_argument("--export", action="store_true",
                        help="only export OUTPUT_DIR/final from the latest checkpoint (or --export-step)")
    parser.add_argument("--export-step", type=int, help="checkpoint step to export")
    parser.add_argument("--resume-step", type=int,
                        help="resume from this checkpoint instead of the latest (e.g. one from before a divergence; "
                             f"implies --resume): the later ones are moved to OUTPUT_DIR/{SET_ASIDE_DIR}/")
    parser.add_argument("--compilation-cache", metavar="DIR",
                        help=COMPILATION_CACHE_HELP + ": a resumed run (after a preemption) loads the compiled "
                             "train step instead of compiling it again")
    for field in dataclasses.fields(TrainConfig):
        kind, is_list, _ = _field_type(field)
        flag = "--" + field.name.replace("_", "-")
        shown = {"train_data": "none, required for a new run", "validation_prompts": "the first two captions",
                 "model_config": "X/ beside X.safetensors when a pipeline folder, else SD v1.5's"}.get(
            field.name, _default(field))
        help_text = f"{HELP.get(field.name, field.name.replace('_', ' '))} (default: {shown})"
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        elif is_list:
            parser.add_argument(flag, nargs="+", help=help_text)
        else:
            parser.add_argument(flag, metavar=field.name.upper(), help=help_text)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> tuple[TrainConfig, argparse.Namespace]:
    """The run's settings: flags over a ``--config`` preset over the defaults. With ``--resume`` or
    ``--export``, the settings the run recorded in ``OUTPUT_DIR/train_config.json`` come between
    the flags and the preset (they already hold that run's preset and flags), so
    ``train.py --output-dir DIR --resume`` continues a run as it was started; ``args.recorded``
    is that file, or None. A preset key that differs from the record (and is not a flag) would
    do nothing there, so it is a UsageError naming the flags to give instead."""
    args = build_parser().parse_args(argv)
    preset, path = {}, None
    if getattr(args, "config", None) is not None:
        path = resolve_config_path(args.config, [CONFIG_DIR], other_tools={"sample.py": CONFIG_DIR.parent})
        preset = load_train_config(path)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {key: _convert(key, value, "command line") for key, value in vars(args).items() if key in known}
    recorded: dict[str, Any] = {}
    args.recorded = None
    export = getattr(args, "export", False)
    if getattr(args, "export_step", None) is not None and not export:
        raise UsageError(f"--export-step {args.export_step}: only with --export (which exports that checkpoint "
                         "instead of training)")
    if getattr(args, "resume_step", None) is not None:
        if export:
            raise UsageError(f"--resume-step {args.resume_step}: not with --export (--export-step picks the "
                             "checkpoint to export)")
        if given.get("resume") is False:
            raise UsageError(f"--resume-step {args.resume_step}: resumes the run; not with --no-resume")
        given["resume"] = True
    resume = given.get("resume", preset.get("resume"))
    missing_record = None   # why --resume/--export found no run in OUTPUT_DIR
    if resume or export:
        output_dir = Path(given.get("output_dir") or preset.get("output_dir") or TrainConfig.output_dir).expanduser()
        found = recorded_settings(output_dir)
        if found is not None:
            recorded = {k: _convert(k, v, str(output_dir / RUN_CONFIG_FILE)) for k, v in found.items()}
            args.recorded = output_dir / RUN_CONFIG_FILE
            # The record sits above the preset, so a preset key that differs from it would do nothing.
            # (Its paths compared as the record holds them: made absolute from this working folder.)
            as_recorded = absolute_paths(preset)
            overruled = [k for k in preset if k not in given and k in recorded and recorded[k] != as_recorded[k]]
            if overruled:
                flags = " ".join(_as_flag(k, preset[k]) for k in overruled)
                raise UsageError(
                    f"--config {args.config}: with --{'export' if export else 'resume'}, the settings recorded in "
                    f"{args.recorded} win over a preset, and the preset differs from them in "
                    + ", ".join(f"{k} ({preset[k]!r}, recorded {recorded[k]!r})" for k in overruled)
                    + f"; leave out --config (the record already holds the settings the run was started with), "
                    f"or, to change them for this run, give them as flags: {flags}")
        else:
            checkpoints = output_dir / "checkpoints"
            has_checkpoints = checkpoints.is_dir() and any(checkpoints.iterdir())
            missing_record = (f"--{'export' if export else 'resume'}: {output_dir} has no {RUN_CONFIG_FILE} (the "
                              "settings a run was started with)"
                              + ("" if has_checkpoints else " and no checkpoints")
                              + ": is --output-dir the folder of a training run?")
            if export:
                raise UsageError(missing_record)
    cfg = TrainConfig(**{**preset, **recorded, **given})
    try:
        cfg.validate(need_data=not export)
    except ValueError as e:
        if missing_record and not cfg.train_data:   # --resume in the wrong folder: say so, not "no --train-data"
            raise UsageError(f"{missing_record} (to start a run there, pass --train-data)") from e
        key = getattr(e, "setting", None)
        if key in preset and key not in given and key not in recorded:   # the file's value, not a flag's
            raise UsageError(f"{path}: key {key!r} has value {preset[key]!r}: {e.rule}") from e
        raise UsageError(str(e)) from e
    return cfg, args
