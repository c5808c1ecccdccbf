"""Fine-tuning step speed on an accelerator: sdjax's jitted train step vs a diffusers PyTorch
training step, with and without gradient checkpointing, in one run.

    python benchmarks/gpu_train.py                       # 512 px, batch 8 and 16 per device, remat off/on
    python benchmarks/gpu_train.py --batches 8,16 --remat off,on --steps 10
    python benchmarks/gpu_train.py --dry-run             # tiny models, 32 px, batches 1,2: any device

Both sides train the UNet only (the text encoder and VAE frozen), on the same random-weight SD v1.5
pipeline folder as gpu_sample.py, with AdamW (lr 1e-5, weight decay 1e-2), global-norm clipping
at 1.0, epsilon prediction and MSE loss; one fixed batch of random images is reused, so data
loading is not timed:
- sdjax: ``Trainer.create(TrainConfig(mixed_precision="bf16", gradient_checkpointing=...))`` and
  its ``step_fn`` (fp32 master weights and optimizer, bf16 compute; VAE encode + CLIP inside the
  step), AOT-compiled once (compile s = lower + compile).
- diffusers/PyTorch: the step of diffusers' examples/text_to_image/train_text_to_image.py: fp32
  UNet under ``torch.autocast(bfloat16)``, VAE and CLIP in bf16 under no_grad, SDPA attention,
  ``unet.enable_gradient_checkpointing()`` for remat, ``torch.optim.AdamW`` (foreach).

Each (implementation, remat, batch) runs in a fresh subprocess (clean peak memory). Reported:
images/s (batch x devices / median step time), step s, compile s, peak device memory, MFU =
model FLOPs/s over the measured bf16 matmul peak, with model FLOPs per image = 3 x UNet forward
(one sample, 64x64 latents) + VAE encode + CLIP forward (no recompute or optimizer counted), from
XLA's cost_analysis of the lowered bf16 models. For sdjax also HFU: the step's own XLA
cost_analysis FLOPs (its lowered HLO: remat recompute and optimizer included) per second over the peak.

Needs: sdjax: jax (CUDA), flax, optax, orbax-checkpoint, transformers, safetensors, pillow, tensorboardX
(Trainer.create opens a TensorBoard writer; carry it as a wheel where missing);
PyTorch side: torch (CUDA), diffusers==0.42.x, transformers. A side whose packages are missing is
skipped with a message.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

NEEDS = {"sdjax": ["jax", "flax", "optax", "orbax", "transformers", "safetensors", "PIL", "tensorboardX"],
         "diffusers": ["torch", "diffusers", "transformers", "safetensors"]}
COLUMNS = [("implementation", "impl", ""), ("remat", "remat", ""), ("batch/device", "batch", "d"),
           ("devices", "devices", "d"), ("images/s", "images_per_s", ".2f"), ("step s", "median_step_s", ".3f"),
           ("compile s", "compile_s", ".1f"), ("peak mem GB", "peak_mem_gb", ".2f"), ("MFU", "mfu_pct", ".1f"),
           ("HFU", "hfu_pct", ".1f"), ("loss", "loss", ".4f"), ("spread (min-max) s", "spread", "")]


# ----------------------------------------------------------------------------- children
def run_sdjax(args) -> dict:
    import jax
    import numpy as np
    timer = C.CompileTimer()
    from sdjax.training.loop import Trainer, TrainConfig
    devices = jax.local_device_count()
    data = C.write_dataset(Path(args.workdir) / f"train-data-{args.resolution}", args.batch * devices,
                           args.resolution)
    out_dir = tempfile.mkdtemp(prefix="sdjax-train-bench-")
    cfg = TrainConfig(model=args.pipeline, train_data=str(data), output_dir=out_dir, resolution=args.resolution,
                      batch_size=args.batch, mixed_precision="bf16", gradient_checkpointing=args.remat == "on",
                      max_steps=10**6, checkpoint_every=10**6, learning_rate=1e-5, weight_decay=1e-2,
                      max_grad_norm=1.0, seed=0)
    t0 = time.perf_counter()
    trainer = Trainer.create(cfg)
    load_s = time.perf_counter() - t0
    batch = trainer.next_batch()
    timer.reset()
    t0 = time.perf_counter()
    lowered = trainer.step_fn.lower(trainer.state, trainer.frozen, batch)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    # The lowered step's count (on a GPU the compiled module's leaves out every cuDNN/cuBLAS call); that
    # module is the whole (global) step, before XLA splits it over the devices: per device, / devices.
    step_flops = C.lowered_flops(lowered) / jax.device_count()
    step_flops = step_flops if step_flops == step_flops else None
    state = trainer.state
    losses = []

    def step():
        nonlocal state
        state, metrics = compiled(state, trainer.frozen, batch)
        return metrics

    def sync(metrics):
        jax.block_until_ready((state, metrics))
        losses.append(float(metrics["loss"]))

    times = C.timed_repeats(step, warmup=args.warmup, repeats=args.steps, sync=sync)
    trainer.close()
    shutil.rmtree(out_dir, ignore_errors=True)  # metrics/TensorBoard files of this throwaway run
    return {"impl": "sdjax", "device": C.device_name(), "devices": jax.device_count(), "remat": args.remat,
            "batch": args.batch, "load_s": load_s, "compile_s": compile_s, "compile_breakdown_s": dict(timer.seconds),
            "times": times, "peak_mem_bytes": C.jax_peak_bytes(), "step_flops": step_flops,
            "loss": losses[-1], "loss_finite": bool(np.isfinite(losses).all())}


def run_torch(args) -> dict:
    import numpy as np
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    bf16 = torch.bfloat16
    t0 = time.perf_counter()
    unet = UNet2DConditionModel.from_pretrained(args.pipeline, subfolder="unet").to(device)  # fp32 masters
    vae = AutoencoderKL.from_pretrained(args.pipeline, subfolder="vae", torch_dtype=bf16).to(device)
    text_encoder = CLIPTextModel.from_pretrained(args.pipeline, subfolder="text_encoder", torch_dtype=bf16).to(device)
    tokenizer = CLIPTokenizer.from_pretrained(args.pipeline, subfolder="tokenizer")
    noise_scheduler = DDPMScheduler.from_pretrained(args.pipeline, subfolder="scheduler")
    load_s = time.perf_counter() - t0
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    unet.train()
    if args.remat == "on":
        unet.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-5, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    gen = torch.Generator(device).manual_seed(0)
    pixels = (torch.rand(args.batch, 3, args.resolution, args.resolution, generator=gen, device=device) * 2 - 1).to(bf16)
    prompts = [C.PROMPTS[i % len(C.PROMPTS)] for i in range(args.batch)]
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(device)
    losses = []

    def step():
        return C.torch_train_step(unet, vae, text_encoder, noise_scheduler, optimizer, pixels, ids,
                                  autocast=lambda: torch.autocast(device, dtype=bf16))

    def sync(loss):
        if cuda:
            torch.cuda.synchronize()
        losses.append(float(loss))

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    sync(step())
    first = time.perf_counter() - t0
    times = C.timed_repeats(step, warmup=args.warmup, repeats=args.steps, sync=sync)
    return {"impl": "diffusers-torch", "device": f"{device}:{torch.cuda.get_device_name(0) if cuda else 'cpu'}",
            "devices": 1, "remat": args.remat, "batch": args.batch, "load_s": load_s,
            "compile_s": max(first - statistics.median(times), 0.0), "times": times,
            "peak_mem_bytes": torch.cuda.max_memory_allocated() if cuda else None, "step_flops": None,
            "loss": losses[-1], "loss_finite": bool(np.isfinite(losses).all()),
            "attention_processors": sorted({type(p).__name__ for p in unet.attn_processors.values()})}


# ----------------------------------------------------------------------------- orchestration
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="8,16", help="comma-separated batch sizes per device")
    p.add_argument("--remat", default="off,on", help="gradient checkpointing settings to run: off, on")
    p.add_argument("--no-sdjax", action="store_true")
    p.add_argument("--no-torch", action="store_true", help="skip the diffusers/PyTorch side")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
    p.add_argument("--workdir", default=C.DEFAULT_WORKDIR)
    p.add_argument("--rebuild", action="store_true")
    p.add_argument("--skip-peak", action="store_true")
    p.add_argument("--peak-tflops", type=float)
    p.add_argument("--child-timeout", type=float)
    p.add_argument("--output", help="results JSON (default: $OUT/gpu_train.json when $OUT is set)")
    p.add_argument("--dry-run", action="store_true", help="tiny models, 32 px, batches 1,2, 2 steps")
    p.add_argument("--size", default="sd15", help=argparse.SUPPRESS)
    p.add_argument("--child", choices=["sdjax", "torch"], help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    p.add_argument("--pipeline", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.dry_run and not args.child:
        args.size, args.resolution = "tiny", 32
        args.batches = "1,2" if args.batches == p.get_default("batches") else args.batches
        args.steps, args.warmup = min(args.steps, 2), min(args.warmup, 1)
    args.batch_list = sorted({int(b) for b in args.batches.split(",") if b.strip()})
    args.remat_list = [r.strip() for r in args.remat.split(",") if r.strip()]
    if any(r not in ("off", "on") for r in args.remat_list):
        raise SystemExit("--remat takes off and/or on")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        C.emit(run_sdjax(args) if args.child == "sdjax" else run_torch(args))
        return
    env = C.env_info(("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "torch", "diffusers", "transformers"))
    print(f"# gpu_train: {'DRY RUN (tiny models) ' if args.dry_run else ''}{args.resolution} px, batches/device "
          f"{args.batch_list}, remat {args.remat_list}, {args.steps} timed steps  ({env['date']})")
    print(f"versions: {json.dumps(env['versions'])}")
    sides = [s for s, skip in (("sdjax", args.no_sdjax), ("torch", args.no_torch)) if not skip]
    runnable = []
    for side in sides:
        gone = C.missing(NEEDS["sdjax" if side == "sdjax" else "diffusers"])
        if gone:
            print(f"SKIPPING {side}: missing package(s) {', '.join(gone)} (see benchmarks/README.md)")
        else:
            runnable.append(side)
    gone = C.missing(["jax", "flax", "transformers", "torch"])
    if gone:
        raise SystemExit(f"cannot build the random pipeline or count FLOPs: missing {', '.join(gone)}")
    pipeline = C.ensure_pipeline(args.workdir, args.size, rebuild=args.rebuild)
    counts = C.flop_counts(args.size, args.resolution, cache_dir=args.workdir)
    flops_img = C.train_flops_per_image(counts["best"])
    print(f"\nFLOPs per image ({args.size} configs, {args.resolution} px; source: {counts['source']}):\n")
    C.print_flops(counts)
    print(f"\ntraining model FLOPs per image = 3 x UNet + VAE encode + CLIP = {flops_img / 1e12:.4g} TFLOP")
    peak = C.peak_of(args)

    output = args.output or C.default_results_path("gpu_train.json")
    rows, results = [], []
    for side in runnable:
        for remat in args.remat_list:
            for batch in args.batch_list:
                label = f"{side} remat={remat} batch={batch}"
                C.log(f"\n=== {label} (fresh process) ===")
                child = ["--child", side, "--batch", str(batch), "--remat", remat, "--pipeline", str(pipeline),
                         "--resolution", str(args.resolution), "--steps", str(args.steps), "--warmup",
                         str(args.warmup), "--workdir", args.workdir, "--size", args.size]
                out = C.run_child(__file__, child, env=C.child_env(), label=label, timeout=args.child_timeout)
                if out is None:
                    rows.append({"impl": side, "remat": remat, "batch": batch, "error": "failed (see log above)"})
                    continue
                results.append(out)
                med = statistics.median(out["times"])
                images_per_s = out["batch"] * out["devices"] / med
                row = {**out, "median_step_s": med, "images_per_s": images_per_s,
                       "peak_mem_gb": None if out["peak_mem_bytes"] is None else out["peak_mem_bytes"] / C.GB,
                       "model_tflops": images_per_s * flops_img / 1e12,
                       "spread": f"{min(out['times']):.3f}-{max(out['times']):.3f}"}
                if peak:
                    row["mfu_pct"] = 100 * row["model_tflops"] / peak["tflops"]
                    if out.get("step_flops"):
                        # step_flops is per device, as is the peak.
                        row["hfu_pct"] = 100 * out["step_flops"] / med / 1e12 / peak["tflops"]
                rows.append(row)
                C.log(f"[{label}] {images_per_s:.2f} images/s, step {med:.3f} s, compile {out['compile_s']:.1f} s")
                C.save_results(output, {"script": "gpu_train.py", "argv": sys.argv[1:], "env": env, "flops": counts,
                                        "peak": peak, "rows": rows, "columns": COLUMNS})
    print(f"\n## Results ({env['date']}; devices: {sorted({r['device'] for r in results}) or '-'})\n")
    print(C.markdown_table(rows, COLUMNS))
    print()
    for r in rows:
        if "error" in r:
            print(f"- {r['impl']} remat={r['remat']} batch={r['batch']}: {r['error']}")
        elif not r.get("loss_finite", True):
            print(f"- {r['impl']} remat={r['remat']} batch={r['batch']}: non-finite loss (random weights)")
    print(f"- MFU: model FLOPs ({flops_img / 1e12:.4g} TFLOP per image); HFU: the sdjax step's own "
          "cost_analysis FLOPs (lowered HLO: remat recompute and optimizer included), per device")
    if output:
        C.save_results(output, {"script": "gpu_train.py", "argv": sys.argv[1:], "env": env, "flops": counts,
                                "peak": peak, "rows": rows, "columns": COLUMNS})
        print(f"\nresults written to {output}")


if __name__ == "__main__":
    main()
