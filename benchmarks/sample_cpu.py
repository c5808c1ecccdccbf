"""sdjax vs diffusers PyTorch text-to-image on this CPU, both measured in one run.

Real SD v1.5 configs with random weights (no weights can be downloaded here), fp32, 2 prompts,
guidance 7.5, PNDM, the same initial latents on both sides. Each side runs in a fresh subprocess
(one JAX device, torch's default intra-op threads) so its peak RSS is its own:

    python benchmarks/sample_cpu.py --size 256 --steps 10 --repeats 2

Per side: the pipeline load, the first call (sdjax: tracing + XLA compilation + one run), the
warm call (best of ``--repeats``), peak RSS after those calls, and then, to split the warm time,
one UNet call alone (the CFG batch, 2 x prompts) and one VAE decode alone (best of 3 warm calls;
sdjax under ``jax.jit``, diffusers under ``torch.no_grad``). "compile s" is first call - warm
call. Prints a markdown table and the max abs difference between the two sides' images (float in
[0, 1]). Best-of-N rather than the median because the timings are only as good as the machine is
quiet: the 1-minute load average before and after each side is printed with the results.

The pipeline folder (4 GiB, safetensors) is written once to WORKDIR/sd15-random and reused.
Needs the test extra (diffusers, torch): pip install -e ".[test]".
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import common as C  # benchmarks/common.py (this script's folder is on sys.path)

PROMPTS = ["a photograph of an astronaut riding a horse", "a watercolor painting of a lighthouse"]


def child_env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("XLA_FLAGS", None)  # one host device, as a user has it (never the test suite's 8 devices)
    return env


def run_child(*args: str) -> dict:
    """This script in a fresh interpreter with a hidden sub-command; its last stdout line as JSON."""
    proc = subprocess.run([sys.executable, __file__, *args], env=child_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-5000:] + proc.stderr[-5000:])
        raise SystemExit(f"sub-command {args} failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def run_side(side: str, directory: str, size: int, steps: int, repeats: int) -> dict:
    import numpy as np
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((len(PROMPTS), size // 8, size // 8, 4)).astype(np.float32)
    # inputs of the UNet / VAE timings alone: the CFG batch at a mid timestep, and the final latents
    unet_x = rng.standard_normal((2 * len(PROMPTS), size // 8, size // 8, 4)).astype(np.float32)
    unet_ctx = rng.standard_normal((2 * len(PROMPTS), 77, 768)).astype(np.float32)
    vae_z = rng.standard_normal((len(PROMPTS), size // 8, size // 8, 4)).astype(np.float32)
    kw = dict(num_inference_steps=steps, height=size, width=size, guidance_scale=7.5)
    info: dict = {"side": side}
    t0 = time.perf_counter()
    if side == "sdjax":
        import jax
        import jax.numpy as jnp
        from flax import nnx

        from sdjax import StableDiffusion
        pipe = StableDiffusion.from_pretrained(directory)
        jax.block_until_ready(pipe._state)
        info["load_s"] = time.perf_counter() - t0
        info["devices"] = len(jax.devices())
        info["unet_calls"] = int(pipe.make_scheduler("pndm", steps).num_model_calls)
        call = lambda: pipe(PROMPTS, latents=latents, **kw).images  # noqa: E731

        def jitted(model, fn, *args):
            graphdef, state = nnx.split(model)
            f = jax.jit(lambda s, *a: fn(nnx.merge(graphdef, s), *a))
            args = [jnp.asarray(a) for a in args]
            return lambda: jax.block_until_ready(f(state, *args))

        unet_call = jitted(pipe.unet, lambda m, x, c: m(x, jnp.float32(501), c), unet_x, unet_ctx)
        vae_call = jitted(pipe.vae, lambda m, z: m.decode(z), vae_z)
    else:
        import torch
        from diffusers import StableDiffusionPipeline
        pipe = StableDiffusionPipeline.from_pretrained(directory, safety_checker=None)
        info["load_s"] = time.perf_counter() - t0
        info["torch_threads"] = torch.get_num_threads()
        pipe.set_progress_bar_config(disable=True)
        pipe.scheduler.set_timesteps(steps)
        info["unet_calls"] = len(pipe.scheduler.timesteps)
        torch_latents = torch.from_numpy(latents.transpose(0, 3, 1, 2))
        call = lambda: pipe(PROMPTS, latents=torch_latents, output_type="np", **kw).images  # noqa: E731
        nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))  # noqa: E731
        x, ctx, z = nchw(unet_x), torch.from_numpy(unet_ctx), nchw(vae_z)

        def unet_call():
            with torch.no_grad():
                return pipe.unet(x, torch.tensor(501), encoder_hidden_states=ctx).sample

        def vae_call():
            with torch.no_grad():
                return pipe.vae.decode(z).sample

    info["loadavg_before"] = os.getloadavg()[0]
    t0 = time.perf_counter()
    first = np.asarray(call())
    info["first_call_s"] = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        images = np.asarray(call())
        times.append(time.perf_counter() - t0)
    info["warm_calls_s"] = times
    info["warm_call_s"] = min(times)
    info["s_per_image"] = info["warm_call_s"] / len(PROMPTS)
    info["compile_s"] = max(info["first_call_s"] - info["warm_call_s"], 0.0)
    info["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB -> GiB
    info["first_equals_warm"] = bool(np.array_equal(first, images))
    np.save(Path(directory).parent / f"images-{side}.npy", images)
    unet_call(), vae_call()  # compile / warm up
    info["unet_call_s"] = _best_time(unet_call, 3)
    info["vae_decode_s"] = _best_time(vae_call, 3)
    info["loadavg_after"] = os.getloadavg()[0]
    return info


def versions() -> dict:
    import platform
    from importlib.metadata import version
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    return {"cpu": f"{cpu} ({os.cpu_count()} cores)", "python": platform.python_version(),
            **{p: version(p) for p in ("jax", "jaxlib", "flax", "torch", "diffusers", "transformers")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=C.DEFAULT_WORKDIR)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--sides", default="sdjax,diffusers", help="comma-separated, in run order")
    parser.add_argument("--_side", choices=["sdjax", "diffusers"], help=argparse.SUPPRESS)
    parser.add_argument("--_versions", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    directory = C.pipeline_dir(args.workdir, "sd15")
    if args._versions:
        print(json.dumps(versions()))
        return
    if args._side:
        print(json.dumps(run_side(args._side, str(directory), args.size, args.steps, args.repeats)))
        return

    C.ensure_pipeline(args.workdir, "sd15")  # written once (in a subprocess), then reused
    v = versions()
    print(" ".join(f"{k} {val}" for k, val in v.items()))
    results = []
    for side in args.sides.split(","):
        r = run_child("--_side", side, "--workdir", args.workdir, "--size", str(args.size), "--steps",
                      str(args.steps), "--repeats", str(args.repeats))
        print(json.dumps(r), file=sys.stderr, flush=True)
        results.append(r)
    print("1-minute load average before / after each side: " + ", ".join(
        f"{r['side']} {r['loadavg_before']:.1f} / {r['loadavg_after']:.1f}" for r in results))
    print(f"\n{len(PROMPTS)} prompts, {args.size}x{args.size}, {args.steps} PNDM steps "
          f"({results[0]['unet_calls']} UNet calls on the CFG batch of {2 * len(PROMPTS)}), guidance 7.5, fp32\n")
    print("| implementation | s / image (warm) | warm call s | first call s | compile s | load s | peak RSS GiB "
          "| UNet call s | VAE decode s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        print(f"| {r['side']} | {r['s_per_image']:.2f} | {r['warm_call_s']:.1f} | {r['first_call_s']:.1f} | "
              f"{r['compile_s']:.1f} | {r['load_s']:.1f} | {r['peak_rss_gb']:.2f} | {r['unet_call_s']:.2f} | "
              f"{r['vae_decode_s']:.2f} |")
    if len(results) == 2:
        import numpy as np
        a, b = (np.load(directory.parent / f"images-{r['side']}.npy") for r in results)
        print(f"\nmax |sdjax - diffusers| on the images (float, [0, 1]): {float(np.abs(a - b).max()):.2e}; "
              f"mean {float(np.abs(a - b).mean()):.2e}")


if __name__ == "__main__":
    main()
