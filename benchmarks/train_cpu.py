"""One fine-tuning step on this CPU: sdjax vs diffusers PyTorch, with and without gradient checkpointing.

    python benchmarks/train_cpu.py [--resolution 256] [--batch-size 1] [--steps 3] [--workdir /tmp/sdjax-bench]

Real SD v1.5 configs with random weights (no weights can be downloaded here), fp32, full UNet
fine-tuning with AdamW and global-norm clipping, VAE encode + CLIP text encoding under no-grad in the
step, as a fine-tune does. Four rows, each in a fresh subprocess (its own peak RSS, one host device):

- sdjax: ``Trainer.create(TrainConfig(...))`` then its jitted ``train_step`` on one fixed batch;
- sdjax remat: the same with ``TrainConfig(gradient_checkpointing=True)``;
- diffusers: ``UNet2DConditionModel`` forward + backward + ``torch.optim.AdamW`` (clip_grad_norm_ 1.0);
- diffusers ckpt: the same after ``unet.enable_gradient_checkpointing()``;
- sdjax LoRA / diffusers LoRA (opt-in, ``--sides sdjax-lora,diffusers-lora``): rank-16 LoRA of the UNet's
  attention projections with the UNet frozen, ``TrainConfig(lora_rank=16)`` and PEFT's ``unet.add_adapter(
  LoraConfig(r=16, target_modules=[to_q, to_k, to_v, to_out.0]))`` as diffusers' train_text_to_image_lora.py.

Images/s is measured warm: one untimed step first (sdjax: compile + run), then ``--steps`` timed
steps, median. Peak RSS is ``ru_maxrss`` of the child. Uses (or writes) the random-weight pipeline
folder WORKDIR/sd15-random that benchmarks/sample_cpu.py uses. Needs the test extra (torch, diffusers).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import common as C  # benchmarks/common.py (this script's folder is on sys.path)

GiB = 1024 ** 3
SIDES = ("sdjax", "sdjax-remat", "diffusers", "diffusers-ckpt")
LORA_SIDES = ("sdjax-lora", "diffusers-lora")
LORA_RANK = 16


def _peak_rss() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB


def _timed(step, steps: int) -> tuple[float, list[float]]:
    t0 = time.perf_counter()
    step()
    first = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return first, times


def run_sdjax(model: str, data: str, workdir: Path, resolution: int, batch: int, steps: int, remat: bool,
              lora_rank: int | None = None) -> dict:
    import jax
    from sdjax.training.loop import TrainConfig, Trainer
    cfg = TrainConfig(model=model, train_data=data, output_dir=str(workdir / "train-out"), resolution=resolution,
                      batch_size=batch, max_steps=1000, learning_rate=1e-5, gradient_checkpointing=remat,
                      checkpoint_every=10**6, lora_rank=lora_rank)
    trainer = Trainer.create(cfg)
    loaded_rss = _peak_rss()
    batch_arrays = trainer.next_batch()
    losses = []

    def step():
        trainer.state, metrics = trainer.step_fn(trainer.state, trainer.frozen, batch_arrays)
        losses.append(float(metrics["loss"]))  # blocks until the step is done

    first, times = _timed(step, steps)
    n_params = sum(x.size for x in jax.tree.leaves(trainer.state.params))
    trainer.close()
    return {"first_step_s": first, "times": times, "loss": losses[-1], "params_m": n_params / 1e6,
            "rss_after_load_gib": loaded_rss, "devices": jax.device_count()}


def run_diffusers(model: str, resolution: int, batch: int, steps: int, ckpt: bool, lora_rank: int | None = None
                  ) -> dict:
    import numpy as np
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet").train()
    if ckpt:
        unet.enable_gradient_checkpointing()
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae").eval().requires_grad_(False)
    text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder").eval().requires_grad_(False)
    tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    noise_scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    if lora_rank is not None:   # as diffusers' train_text_to_image_lora.py
        from peft import LoraConfig
        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_rank, init_lora_weights="gaussian",
                                    target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    # foreach=False: no multi-tensor temporaries (the lowest-memory AdamW, as sdjax's updates in place)
    optimizer = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-5, weight_decay=1e-2,
                                  foreach=False)
    loaded_rss = _peak_rss()
    rng = np.random.default_rng(0)
    pixels = torch.from_numpy(rng.uniform(-1, 1, (batch, 3, resolution, resolution)).astype(np.float32))
    captions = [C.PROMPTS[i % len(C.PROMPTS)] for i in range(batch)]  # as C.write_dataset captions them
    ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    losses = []

    def step():
        losses.append(C.torch_train_step(unet, vae, text_encoder, noise_scheduler, optimizer, pixels, ids).item())

    first, times = _timed(step, steps)
    return {"first_step_s": first, "times": times, "loss": losses[-1],
            "params_m": sum(p.numel() for p in unet.parameters() if p.requires_grad) / 1e6,
            "rss_after_load_gib": loaded_rss,
            "threads": torch.get_num_threads()}


def child(args) -> None:
    directory = C.pipeline_dir(args.workdir, "sd15")
    lora_rank = LORA_RANK if args.side in LORA_SIDES else None
    data = Path(args.workdir) / f"train-data-{args.resolution}"
    if args.side.startswith("sdjax"):
        out = run_sdjax(str(directory), str(data), Path(args.workdir), args.resolution, args.batch_size, args.steps,
                        remat=args.side == "sdjax-remat", lora_rank=lora_rank)
    else:
        out = run_diffusers(str(directory), args.resolution, args.batch_size, args.steps,
                            ckpt=args.side == "diffusers-ckpt", lora_rank=lora_rank)
    warm = statistics.median(out["times"])
    out.update(side=args.side, warm_step_s=warm, images_per_s=args.batch_size / warm, peak_rss_gib=_peak_rss())
    print(json.dumps(out))


def mem_available_gib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 / GiB
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def wait_for_memory(need_gib: float, timeout_s: float) -> None:
    """On a shared machine: start a ~15 GiB row only when that much is free (else it would OOM someone)."""
    deadline = time.time() + timeout_s
    while (free := mem_available_gib()) < need_gib:
        if time.time() > deadline:
            raise SystemExit(f"only {free:.1f} GiB available after {timeout_s:.0f} s; need {need_gib} GiB")
        print(f"  waiting for memory: {free:.1f} GiB available, need {need_gib} GiB", flush=True)
        time.sleep(15)


def versions() -> str:
    from importlib.metadata import version
    names = ("jax", "jaxlib", "flax", "optax", "numpy", "torch", "diffusers", "transformers")
    return f"Python {platform.python_version()}, " + ", ".join(f"{n} {version(n)}" for n in names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=C.DEFAULT_WORKDIR)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3, help="timed warm steps per row (median reported)")
    parser.add_argument("--sides", default=",".join(SIDES),
                        help="comma-separated subset of " + ",".join(SIDES + LORA_SIDES))
    parser.add_argument("--min-free-gib", type=float, default=17.0,
                        help="wait until this much memory is available before each row (fp32 AdamW on the full "
                             "UNet needs ~14-16 GiB)")
    parser.add_argument("--wait-s", type=float, default=1800, help="give up waiting for memory after this long")
    parser.add_argument("--side", choices=SIDES + LORA_SIDES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        child(args)
        return
    workdir = Path(args.workdir)
    C.ensure_pipeline(workdir, "sd15")
    C.write_dataset(workdir / f"train-data-{args.resolution}", args.batch_size, args.resolution)
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    env.pop("XLA_FLAGS", None)  # one host device, as a user would have
    results = []
    for side in args.sides.split(","):
        wait_for_memory(args.min_free_gib, args.wait_s)
        print(f"running {side} ...", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--side", side, "--workdir", args.workdir, "--resolution",
                               str(args.resolution), "--batch-size", str(args.batch_size), "--steps",
                               str(args.steps)], env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
            raise SystemExit(f"{side} failed (exit {proc.returncode})")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"  {side}: {json.dumps(results[-1])} ({time.perf_counter() - t0:.0f} s in all)", flush=True)
    print(f"\n{versions()}")
    print(f"SD v1.5 UNet fine-tuning step (random weights, fp32, AdamW), {args.resolution}x{args.resolution} "
          f"images, batch {args.batch_size}, median of {args.steps} warm steps\n")
    print("| implementation | trains | gradient checkpointing | images/s | s / step (warm) | first step s | "
          "peak RSS GiB | RSS after load GiB |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for r in results:
        impl = "sdjax" if r["side"].startswith("sdjax") else "diffusers PyTorch"
        remat = "yes" if r["side"] in ("sdjax-remat", "diffusers-ckpt") else "no"
        trains = f"LoRA r{LORA_RANK} ({r['params_m']:.1f} M)" if r["side"] in LORA_SIDES else (
            f"UNet ({r['params_m']:.1f} M)")
        print(f"| {impl} | {trains} | {remat} | {r['images_per_s']:.3f} | {r['warm_step_s']:.2f} | "
              f"{r['first_step_s']:.1f} | "
              f"{r['peak_rss_gib']:.2f} | {r['rss_after_load_gib']:.2f} |")


if __name__ == "__main__":
    main()
