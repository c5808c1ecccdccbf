"""Text-to-image speed on an accelerator: sdjax (bf16; XLA and cuDNN attention) vs diffusers
PyTorch (fp16, SDPA attention; optionally torch.compile), both measured in one run.

    python benchmarks/gpu_sample.py                      # 512x512, 50 PNDM steps, guidance 7.5
    python benchmarks/gpu_sample.py --batches 1,4,16,64 --attention xla,cudnn --torch-compile
    python benchmarks/gpu_sample.py --dry-run            # tiny models, 2 steps, batches 1,2: any device

Random weights at the real SD v1.5 configs (built once by sdjax into --workdir, safetensors, so
both libraries load the same folder; no network). Each implementation runs in a fresh subprocess,
so its peak device memory is its own; batches run in the order given (``--batches 1,16,64,4``
puts the goal sizes first when time is short).

Per implementation and batch: images/s, s/image, it/s, compile s, peak device memory, MFU.
- it/s: guided denoising steps per second of a whole pipeline call for the batch, i.e.
  num_model_calls / seconds per call (PNDM with 50 steps makes 51 UNet calls; every call is one
  CFG pair per image). At batch 1 this is diffusers' progress-bar figure, except that our
  seconds include the text encoder and the VAE decode, so it is a little lower.
- compile s: sdjax: JAX's own tracing + lowering + XLA compile time of the first call (its
  monitoring events); diffusers: first call minus the warm median (torch.compile, cuDNN/cuBLAS
  heuristics, allocator warm-up).
- peak mem: jax ``device.memory_stats()["peak_bytes_in_use"]`` (the process peak so far: shown
  only for a batch larger than every earlier one, where it is that batch's); torch
  ``torch.cuda.max_memory_allocated`` (reset per batch). "-" where the device keeps no statistics
  (CPU).
- MFU: images/s x FLOPs per image / the device's measured bf16 matmul peak (8192^3 via jax,
  median of 10). FLOPs per image = 51 UNet calls x 2 samples + 2 CLIP passes + 1 VAE decode, from
  XLA's cost_analysis of the lowered bf16 models (analytic count printed beside it).
- Timing: the first call (compile) and --warmup more calls untimed, then --repeats timed calls;
  median. Results are numpy arrays on the host, so every timed call has finished on the device.

Needs: sdjax side: jax (with the CUDA plugin on a GPU), flax, optax, transformers, safetensors,
  numpy; diffusers side: torch (CUDA) and diffusers==0.42.x (carry it as a wheel where missing:
  see benchmarks/README.md); building the random pipeline: jax, flax, transformers, torch (the
  configs and tokenizer come from tests/reference.py). A side whose packages are missing is
  skipped with a message.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

NEEDS = {"sdjax": ["jax", "flax", "optax", "transformers", "safetensors"],
         "diffusers": ["torch", "diffusers", "transformers", "safetensors"]}
COLUMNS = [("implementation", "impl", ""), ("dtype", "dtype", ""), ("batch", "batch", "d"),
           ("images/s", "images_per_s", ".3f"), ("s/image", "s_per_image", ".3f"), ("it/s", "it_per_s", ".2f"),
           ("compile s", "compile_s", ".1f"), ("peak mem GB", "peak_mem_gb", ".2f"), ("MFU", "mfu_pct", ".1f"),
           ("first call s", "first_call_s", ".1f"), ("median call s", "median_call_s", ".3f"),
           ("spread (min-max) s", "spread", "")]


# ----------------------------------------------------------------------------- children
def prompts_and_seeds(batch: int) -> tuple[list[str], list[int]]:
    return [C.PROMPTS[i % len(C.PROMPTS)] for i in range(batch)], list(range(batch))


def attention_shapes(unet_config, h: int) -> list[tuple]:
    """(T, S, heads, head_dim) of every attention call in the UNet (an sdjax ``UNetConfig``) at
    h x h latents."""
    shapes, size = [], h
    chs = unet_config.block_out_channels
    for i, (ch, kind) in enumerate(zip(chs, unet_config.down_block_types)):
        heads = unet_config.num_attention_heads[i]
        if kind.startswith("CrossAttn"):
            shapes += [(size * size, size * size, heads, ch // heads), (size * size, 77, heads, ch // heads)]
        if i < len(chs) - 1:
            size = (size + 1) // 2
    heads = unet_config.num_attention_heads[-1]
    shapes += [(size * size, size * size, heads, chs[-1] // heads), (size * size, 77, heads, chs[-1] // heads)]
    return sorted(set(shapes))


def check_attention_impl(unet_config, h: int, batch: int) -> list[dict]:
    """For each attention shape of the UNet: does the traced bf16 attention use cuDNN's fused kernel
    (a ``__cudnn$fmha`` custom call in the lowered module) under the current SDJAX_ATTENTION?"""
    import jax
    import jax.numpy as jnp

    from sdjax.models import layers
    out = []
    for T, S, N, H in attention_shapes(unet_config, h):
        q = jax.ShapeDtypeStruct((2 * batch, T, N, H), jnp.bfloat16)
        kv = jax.ShapeDtypeStruct((2 * batch, S, N, H), jnp.bfloat16)
        try:
            text = jax.jit(layers.attention).lower(q, kv, kv).as_text()
            used = "cudnn" in text.lower()
        except Exception as e:  # noqa: BLE001
            used = f"error: {type(e).__name__}: {e}"[:200]
        out.append({"T": T, "S": S, "heads": N, "head_dim": H, "cudnn": used})
    return out


def run_sdjax(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    timer = C.CompileTimer()
    from sdjax import StableDiffusion
    from sdjax.models import layers
    t0 = time.perf_counter()
    pipe = StableDiffusion.from_pretrained(args.pipeline, dtype=jnp.bfloat16)
    load_s = time.perf_counter() - t0
    num_calls = pipe.make_scheduler("pndm", args.steps).num_model_calls
    h = args.resolution // pipe.vae_scale
    info = {"impl": args.impl, "device": C.device_name(), "devices": jax.device_count(), "load_s": load_s,
            "attention_setting": layers.ATTENTION_IMPLEMENTATION, "num_model_calls": num_calls,
            "attention_shapes": check_attention_impl(pipe.unet.config, h, 1), "rows": []}
    C.log(f"[{args.impl}] loaded in {load_s:.1f} s on {info['device']}; attention: "
          + ", ".join(f"T={a['T']} S={a['S']} d={a['head_dim']}: {'cudnn' if a['cudnn'] is True else a['cudnn']}"
                      for a in info["attention_shapes"]))
    for index, batch in enumerate(args.batch_list):
        prompts, seeds = prompts_and_seeds(batch)

        def call():
            return pipe(prompts, seeds=seeds, num_inference_steps=args.steps, guidance_scale=args.guidance,
                        height=args.resolution, width=args.resolution, batch_size=batch).images
        try:
            timer.reset()
            t0 = time.perf_counter()
            images = call()
            first = time.perf_counter() - t0
            compile_s = timer.total
            times = C.timed_repeats(call, warmup=args.warmup, repeats=args.repeats, sync=lambda x: x)
        except Exception as e:  # noqa: BLE001 - e.g. out of memory at a large batch: report, go on
            C.log(f"[{args.impl}] batch {batch} failed: {type(e).__name__}: {str(e)[:500]}")
            oom = C.out_of_memory(e)
            info["rows"].append({"batch": batch, "error": f"{type(e).__name__}: {str(e)[:300]}", "out_of_memory": oom})
            if oom:
                continue  # a smaller batch later in the list (1,16,64,4) may still fit
            break
        # JAX keeps one process-wide peak: it is this batch's only if no earlier batch was larger.
        peak = C.jax_peak_bytes() if batch > max(args.batch_list[:index], default=0) else None
        row = {"batch": batch, "dtype": "bf16", "first_call_s": first, "compile_s": compile_s, "times": times,
               "compile_breakdown_s": dict(timer.seconds), "peak_mem_bytes": peak,
               "images_finite": bool(np.isfinite(images).all()), "image_shape": list(images.shape)}
        info["rows"].append(row)
        C.log(f"[{args.impl}] batch {batch}: median {statistics.median(times):.3f} s/call, first {first:.1f} s "
              f"(compile {compile_s:.1f} s), peak {'-' if peak is None else f'{peak / C.GB:.2f} GB'}")
        C.save_results(args.partial, info)  # what the parent reads if this process is stopped
    return info


def run_diffusers(args) -> dict:
    import numpy as np
    import torch
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import logging as diffusers_logging
    diffusers_logging.disable_progress_bar()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = torch.float16 if cuda else torch.float32  # fp16 on a CPU is emulated: minutes for a dry run
    t0 = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(args.pipeline, torch_dtype=dtype, safety_checker=None,
                                                   requires_safety_checker=False).to(device)
    pipe.set_progress_bar_config(disable=True)
    load_s = time.perf_counter() - t0
    processors = sorted({type(p).__name__ for p in pipe.unet.attn_processors.values()})
    compiled = args.impl == "diffusers-compile"
    if compiled:  # as diffusers' "accelerate inference" guide does it
        import torch._inductor.config as inductor
        inductor.conv_1x1_as_mm = True
        inductor.coordinate_descent_tuning = True
        inductor.epilogue_fusion = False
        inductor.coordinate_descent_check_all_directions = True
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
        pipe.unet = torch.compile(pipe.unet, mode=args.torch_compile_mode, fullgraph=True)
        pipe.vae.decode = torch.compile(pipe.vae.decode, mode=args.torch_compile_mode, fullgraph=True)
    name = torch.cuda.get_device_name(0) if cuda else "cpu"
    info = {"impl": args.impl, "device": f"{device}:{name}", "load_s": load_s, "attention_processors": processors,
            "torch_compile_mode": args.torch_compile_mode if compiled else None, "rows": []}
    C.log(f"[{args.impl}] loaded in {load_s:.1f} s on {info['device']}; attention processors: {processors}")
    def sync(x):
        if cuda:
            torch.cuda.synchronize()
        return x

    for batch in args.batch_list:
        prompts, seeds = prompts_and_seeds(batch)

        def call():
            generators = [torch.Generator(device).manual_seed(s) for s in seeds]
            return pipe(prompts, num_inference_steps=args.steps, guidance_scale=args.guidance, height=args.resolution,
                        width=args.resolution, generator=generators, output_type="np").images
        try:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            images = sync(call())
            first = time.perf_counter() - t0
            times = C.timed_repeats(call, warmup=args.warmup, repeats=args.repeats, sync=sync)
        except Exception as e:  # noqa: BLE001
            C.log(f"[{args.impl}] batch {batch} failed: {type(e).__name__}: {str(e)[:500]}")
            oom = C.out_of_memory(e)
            info["rows"].append({"batch": batch, "error": f"{type(e).__name__}: {str(e)[:300]}", "out_of_memory": oom})
            if oom:
                continue
            break
        peak = torch.cuda.max_memory_allocated() if cuda else None
        row = {"batch": batch, "dtype": "fp16" if cuda else "fp32", "first_call_s": first,
               "compile_s": max(first - statistics.median(times), 0.0), "times": times, "peak_mem_bytes": peak,
               "images_finite": bool(np.isfinite(images).all()), "image_shape": list(images.shape),
               "num_model_calls": len(pipe.scheduler.timesteps)}
        info["rows"].append(row)
        C.log(f"[{args.impl}] batch {batch}: median {statistics.median(times):.3f} s/call, first {first:.1f} s, "
              f"peak {'-' if peak is None else f'{peak / C.GB:.2f} GB'}")
        C.save_results(args.partial, info)
    return info


# ----------------------------------------------------------------------------- orchestration
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="1,4,16,64", help="comma-separated batch sizes (images per call)")
    p.add_argument("--attention", default="xla,cudnn",
                   help="sdjax attention variants: xla, cudnn, blocked (SDJAX_ATTENTION)")
    p.add_argument("--no-sdjax", action="store_true", help="skip the sdjax side")
    p.add_argument("--no-diffusers", action="store_true", help="skip the diffusers side")
    p.add_argument("--torch-compile", action="store_true", help="also time diffusers with torch.compile (UNet + VAE decode)")
    p.add_argument("--torch-compile-mode", default="max-autotune",
                   help="torch.compile mode (default: %(default)s, as diffusers' speed guide; its autotuning takes "
                        "minutes per batch size: 'default' or 'reduce-overhead' compile faster)")
    p.add_argument("--child-timeout", type=float, help="seconds after which one implementation's process is stopped")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1, help="untimed calls after the first (compiling) one")
    p.add_argument("--workdir", default=C.DEFAULT_WORKDIR, help="where the random pipeline folder is kept")
    p.add_argument("--rebuild", action="store_true", help="rewrite the random pipeline folder")
    p.add_argument("--skip-peak", action="store_true", help="do not measure the matmul peak (MFU then '-')")
    p.add_argument("--peak-tflops", type=float, help="use this bf16 peak (TFLOP/s) instead of measuring it")
    p.add_argument("--output", help="results JSON (default: $OUT/gpu_sample.json when $OUT is set)")
    p.add_argument("--dry-run", action="store_true",
                   help="tiny models, --steps 2, 32x32 images, batches 1,2, small matmul: proves the logic on any device")
    p.add_argument("--size", default="sd15", help=argparse.SUPPRESS)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--impl", help=argparse.SUPPRESS)
    p.add_argument("--pipeline", help=argparse.SUPPRESS)
    p.add_argument("--partial", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.dry_run and not args.child:
        args.size, args.steps, args.resolution = "tiny", 2, 32
        args.batches = "1,2" if args.batches == p.get_default("batches") else args.batches
        args.repeats, args.warmup = min(args.repeats, 2), min(args.warmup, 1)
    args.batch_list = list(dict.fromkeys(int(b) for b in args.batches.split(",") if b.strip()))  # given order
    return args


def implementations(args) -> list[str]:
    impls = []
    if not args.no_sdjax:
        for a in [a.strip() for a in args.attention.split(",") if a.strip()]:
            if a not in ("xla", "cudnn", "blocked"):
                raise SystemExit(f"--attention {a!r}: use xla, cudnn and/or blocked")
            impls.append(f"sdjax-{a}")
    if not args.no_diffusers:
        impls.append("diffusers")
        if args.torch_compile:
            impls.append("diffusers-compile")
    return impls


def side_of(impl: str) -> str:
    return "sdjax" if impl.startswith("sdjax") else "diffusers"


def child_args(args, impl: str, pipeline: Path) -> list[str]:
    return ["--child", "--impl", impl, "--pipeline", str(pipeline), "--size", args.size, "--batches", args.batches,
            "--steps", str(args.steps), "--guidance", str(args.guidance), "--resolution", str(args.resolution),
            "--repeats", str(args.repeats), "--warmup", str(args.warmup),
            "--torch-compile-mode", args.torch_compile_mode]


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        C.emit(run_sdjax(args) if side_of(args.impl) == "sdjax" else run_diffusers(args))
        return
    env = C.env_info()
    print(f"# gpu_sample: {'DRY RUN (tiny models) ' if args.dry_run else ''}{args.resolution}x{args.resolution}, "
          f"{args.steps} PNDM steps, guidance {args.guidance}, batches {args.batch_list}  ({env['date']})")
    print(f"versions: {json.dumps(env['versions'])}")
    impls = implementations(args)
    runnable = []
    for impl in impls:
        gone = C.missing(NEEDS[side_of(impl)])
        if gone:
            print(f"SKIPPING {impl}: missing package(s) {', '.join(gone)} "
                  f"(the {side_of(impl)} side needs {', '.join(NEEDS[side_of(impl)])}; see benchmarks/README.md)")
        else:
            runnable.append(impl)
    gone = C.missing(["jax", "flax", "transformers", "torch"])
    if gone:
        raise SystemExit(f"cannot build the random pipeline or count FLOPs: missing {', '.join(gone)}")
    pipeline = C.ensure_pipeline(args.workdir, args.size, rebuild=args.rebuild)

    counts = C.flop_counts(args.size, args.resolution, cache_dir=args.workdir)
    print(f"\nFLOPs per image ({args.size} configs, {args.resolution} px; source for MFU: {counts['source']}):\n")
    C.print_flops(counts)
    peak = C.peak_of(args)

    results, rows = [], []
    output = args.output or C.default_results_path("gpu_sample.json")
    for impl in runnable:
        C.log(f"\n=== {impl} (fresh process) ===")
        env_child = C.child_env(SDJAX_ATTENTION=impl.split("-", 1)[1] if side_of(impl) == "sdjax" else None)
        partial = Path(args.workdir) / f"partial-{impl}.json"
        partial.unlink(missing_ok=True)
        out = C.run_child(__file__, child_args(args, impl, pipeline) + ["--partial", str(partial)], env=env_child,
                          label=impl, timeout=args.child_timeout)
        if out is None and partial.exists():  # stopped (timeout) or crashed after some batches: keep those
            out = json.loads(partial.read_text())
            out["rows"].append({"batch": "next", "error": "stopped or failed here (see log above)"})
        if out is None:
            rows.append({"impl": impl, "error": "failed (see log above)"})
        else:
            results.append(out)
            rows += derive_rows(out, counts, peak, guidance=args.guidance > 1)
        # Partial results survive a later implementation running out of time.
        C.save_results(output, {"script": "gpu_sample.py", "argv": sys.argv[1:], "env": env, "flops": counts,
                                "peak": peak, "results": results, "rows": rows, "columns": COLUMNS})
        C.log(C.markdown_table(rows, COLUMNS))
    report(rows, results, peak, env)
    if output:
        print(f"\nresults written to {output}")


def derive_rows(out: dict, counts: dict, peak: dict | None, *, guidance: bool) -> list[dict]:
    rows = []
    for r in out["rows"]:
        row = {"impl": out["impl"], **r}
        if "error" in r:
            rows.append(row)
            continue
        calls = r.get("num_model_calls") or out.get("num_model_calls")
        med = statistics.median(r["times"])
        flops_img = C.sample_flops_per_image(counts["best"], calls, guidance=guidance)
        row.update(median_call_s=med, images_per_s=r["batch"] / med, s_per_image=med / r["batch"],
                   it_per_s=calls / med, num_model_calls=calls, flops_per_image=flops_img,
                   achieved_tflops=r["batch"] / med * flops_img / 1e12,
                   peak_mem_gb=None if r["peak_mem_bytes"] is None else r["peak_mem_bytes"] / C.GB,
                   spread=f"{min(r['times']):.3f}-{max(r['times']):.3f}")
        if peak:
            row["mfu_pct"] = 100 * row["achieved_tflops"] / peak["tflops"]
        rows.append(row)
    return rows


def report(rows: list[dict], results: list[dict], peak: dict | None, env: dict) -> None:
    print(f"\n## Results ({env['date']}; devices: {sorted({o['device'] for o in results}) or '-'})\n")
    print(C.markdown_table(rows, COLUMNS))
    print()
    for r in rows:
        if "error" in r:
            print(f"- {r['impl']}{' batch ' + str(r['batch']) if 'batch' in r else ''}: {r['error']}")
    for o in results:
        if "attention_shapes" in o:
            used = [a for a in o["attention_shapes"] if a["cudnn"] is True]
            print(f"- {o['impl']}: cuDNN fused attention in {len(used)}/{len(o['attention_shapes'])} UNet attention "
                  f"shapes (SDJAX_ATTENTION={o['attention_setting']})"
                  + (f": {[(a['T'], a['S'], a['head_dim']) for a in used]}" if used else ""))
        if "attention_processors" in o:
            print(f"- {o['impl']}: attention processors {o['attention_processors']}"
                  + (f", torch.compile mode {o['torch_compile_mode']}" if o.get("torch_compile_mode") else ""))
        bad = [r["batch"] for r in o["rows"] if r.get("images_finite") is False]
        if bad:
            print(f"- {o['impl']}: non-finite pixels at batch {bad} (random weights in low precision; "
                  "does not change the timing)")
    flops = [r["flops_per_image"] for r in rows if "flops_per_image" in r]
    if flops:
        print(f"- FLOPs per image: {flops[0] / 1e9:,.5g} GFLOP (it/s = UNet calls per second of a whole call)")
    if peak is None:
        print("- MFU not computed (no matmul peak measured).")


if __name__ == "__main__":
    main()
