"""Loading a full-size SD v1.5 (random weights) on the host: time and peak memory, and bf16 vs fp32 error.

    python benchmarks/load_weights.py [--workdir DIR] [--regenerate]

1. Writes the three SD v1.5 models (real configs, random weights from tests/reference.py) into
   DIR/safetensors (fp32, diffusers/transformers PyTorch layout), DIR/flax (fp32 Flax msgpack) and
   DIR/flax_bf16 (bf16 Flax msgpack, like the Hub's "bf16" revision). Existing files are reused
   unless --regenerate.
2. For each layout and dtype, in a fresh subprocess (a clean peak RSS): imports sdjax, records the
   RSS baseline, loads CLIP + UNet + VAE with ``from_pretrained`` and reports the load time and the
   peak RSS increase (``ru_maxrss`` - baseline) next to the total size of the weight files.
3. In one more subprocess: bf16-loaded vs fp32-loaded outputs of the full-size models (UNet at
   32x32 latents batch 2, CLIP last_hidden_state, VAE decode).

Prints a markdown table. Needs the test extra (torch, diffusers, psutil) for step 1.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PARTS = {"text_encoder": "clip", "unet": "unet", "vae": "vae"}  # folder -> reference.py kind
LAYOUTS = ("safetensors", "flax", "flax_bf16")
GiB = 1024 ** 3


def _child(*args: str) -> dict:
    """Run this script in a fresh interpreter with the given hidden sub-command; return its JSON line."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    env.pop("XLA_FLAGS", None)  # one host device, as a user would have
    proc = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"sub-command {args} failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _peak_rss_bytes() -> int:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


# ----------------------------------------------------------------------------- 1. checkpoints
def generate(part: str, workdir: Path) -> dict:
    """Write one model in every layout (runs in its own process: the UNet alone needs ~10 GiB here)."""
    import ml_dtypes
    import torch
    sys.path.insert(0, str(ROOT / "tests"))
    import reference as R

    torch.set_num_threads(os.cpu_count() or 1)
    kind = PARTS[part]
    make, config = {"clip": (R.torch_clip, R.SD15_CLIP), "unet": (R.torch_unet, R.SD15_UNET),
                    "vae": (R.torch_vae, R.SD15_VAE)}[kind]
    model = make(config, seed=0)
    files = {"safetensors": R.save_torch_layout(model, workdir / "safetensors" / part),
             "flax": R.save_flax_layout(model, workdir / "flax" / part, kind=kind),
             "flax_bf16": R.save_flax_layout(model, workdir / "flax_bf16" / part, kind=kind,
                                             dtype=ml_dtypes.bfloat16)}
    n_params = sum(p.numel() for p in model.parameters())
    return {"params": n_params, **{k: str(v) for k, v in files.items()}}


def weight_files(workdir: Path, layout: str) -> list[Path]:
    out = []
    for part in PARTS:
        files = [f for f in (workdir / layout / part).iterdir()
                 if f.suffix in (".safetensors", ".msgpack", ".bin")]
        if len(files) != 1:
            raise SystemExit(f"{workdir / layout / part}: expected one weights file, found {files}")
        out += files
    return out


# ----------------------------------------------------------------------------- 2. loading
def measure_load(layout: str, dtype_name: str, workdir: Path) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import sdjax
    jax.devices()  # start the backend before the baseline
    baseline = _rss_bytes()
    dtype = {"fp32": jnp.float32, "bf16": jnp.bfloat16}[dtype_name]
    fmt = "pytorch" if layout == "safetensors" else "flax"
    t0 = time.perf_counter()
    models = [cls.from_pretrained(workdir / layout, subfolder=part, dtype=dtype, format=fmt)
              for part, cls in (("text_encoder", sdjax.CLIPTextModel), ("unet", sdjax.UNet2DConditionModel),
                                ("vae", sdjax.AutoencoderKL))]
    jax.block_until_ready([nnx.state(m) for m in models])
    seconds = time.perf_counter() - t0
    param_bytes = sum(v.get_value().nbytes for m in models for _, v in nnx.to_flat_state(nnx.state(m, nnx.Param)))
    return {"seconds": seconds, "baseline": baseline, "peak": _peak_rss_bytes(), "after": _rss_bytes(),
            "param_bytes": param_bytes}


# ----------------------------------------------------------------------------- 3. bf16 vs fp32
def measure_bf16_error(workdir: Path) -> dict:
    import gc

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    import sdjax

    def jitted(model, fn):
        graphdef, state = nnx.split(model)
        call = jax.jit(lambda state, *args: fn(nnx.merge(graphdef, state), *args))
        return lambda *args: np.asarray(call(state, *args), np.float32)

    def compare(cls, part, fn, *inputs):
        outs, secs = {}, {}
        for name, dtype in (("fp32", jnp.float32), ("bf16", jnp.bfloat16)):
            model = cls.from_pretrained(workdir / "safetensors", subfolder=part, dtype=dtype)
            f = jitted(model, fn)
            f(*inputs)  # compile
            t0 = time.perf_counter()
            outs[name] = f(*inputs)
            secs[name] = time.perf_counter() - t0
            del model, f
            gc.collect()
        ref, out = outs["fp32"].astype(np.float64), outs["bf16"].astype(np.float64)
        return {"rel_l2": float(np.linalg.norm(out - ref) / np.linalg.norm(ref)),
                "max_abs": float(np.abs(out - ref).max()), "ref_max_abs": float(np.abs(ref).max()),
                "ref_rms": float(np.sqrt(np.mean(ref ** 2))), "shape": list(ref.shape),
                "seconds_fp32": secs["fp32"], "seconds_bf16": secs["bf16"]}

    rng = np.random.default_rng(0)
    ids = rng.integers(1, 49406, (2, 77))
    ids[:, 0] = 49406                                     # <|startoftext|>
    ids[0, 12:] = 49407                                    # a short prompt padded with <|endoftext|>
    ids[1, 76] = 49407
    latents = rng.standard_normal((2, 32, 32, 4)).astype(np.float32)
    context = rng.standard_normal((2, 77, 768)).astype(np.float32)
    timesteps = np.array([981, 301], np.int32)
    vae_latents = (rng.standard_normal((1, 32, 32, 4)) / 0.18215).astype(np.float32)  # decode to 256x256
    return {
        "clip last_hidden_state [2, 77, 768]": compare(
            sdjax.CLIPTextModel, "text_encoder", lambda m, x: m(x).last_hidden_state, jnp.asarray(ids)),
        "unet 32x32 latents, batch 2": compare(
            sdjax.UNet2DConditionModel, "unet", lambda m, x, t, c: m(x, t, c),
            jnp.asarray(latents), jnp.asarray(timesteps), jnp.asarray(context)),
        "vae decode 32x32 latents -> 256x256": compare(
            sdjax.AutoencoderKL, "vae", lambda m, z: m.decode(z), jnp.asarray(vae_latents)),
    }


# ----------------------------------------------------------------------------- driver
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/sdjax-bench-sd15"),
                        help="where the checkpoints go (about 10 GiB; reused between runs)")
    parser.add_argument("--regenerate", action="store_true", help="rewrite the checkpoints even if present")
    parser.add_argument("--skip-errors", action="store_true", help="only measure loading")
    args = parser.parse_args()
    workdir = args.workdir.resolve()

    for part in PARTS:
        done = all((workdir / layout / part / "config.json").is_file() for layout in LAYOUTS)
        if done and not args.regenerate:
            print(f"reusing {workdir}/*/{part}", file=sys.stderr)
            continue
        t0 = time.perf_counter()
        info = _child("--_generate", part, str(workdir))
        print(f"wrote {part} ({info['params'] / 1e6:.1f} M params) in {time.perf_counter() - t0:.0f} s",
              file=sys.stderr)

    versions = _child("--_versions")
    versions.pop("child_peak_rss")
    print(" ".join(f"{k} {v}" for k, v in versions.items()))
    print("(weight files warm in the page cache: they were just written or read)")

    rows = []
    for layout, dtype in (("safetensors", "fp32"), ("flax", "fp32"), ("safetensors", "bf16"),
                          ("flax", "bf16"), ("flax_bf16", "bf16")):
        files = weight_files(workdir, layout)
        size = sum(f.stat().st_size for f in files)
        r = _child("--_load", layout, dtype, str(workdir))
        increase = r["peak"] - r["baseline"]
        rows.append((layout, dtype, r, size, increase))
        print(f"{layout} {dtype}: {r}", file=sys.stderr)

    def fmt_layout(layout):
        return {"safetensors": "safetensors fp32 (PyTorch layout)", "flax": "Flax msgpack fp32",
                "flax_bf16": "Flax msgpack bf16"}[layout]

    print("\n| weights file | load dtype | load s | peak RSS increase | RSS after load | params in memory "
          "| weight files | peak / files | peak / params |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for layout, dtype, r, size, increase in rows:
        print(f"| {fmt_layout(layout)} | {dtype} | {r['seconds']:.1f} | {increase / GiB:.2f} GiB "
              f"| {(r['after'] - r['baseline']) / GiB:.2f} GiB | {r['param_bytes'] / GiB:.2f} GiB "
              f"| {size / GiB:.2f} GiB | {increase / size:.2f} | {increase / r['param_bytes']:.2f} |")

    if not args.skip_errors:
        errors = _child("--_errors", str(workdir))
        errors.pop("child_peak_rss")
        print("\n| model (loaded from fp32 safetensors) | rel. L2 error bf16 vs fp32 | max abs error "
              "| fp32 output max abs / RMS | fp32 s | bf16 s |")
        print("|---|---:|---:|---:|---:|---:|")
        for name, e in errors.items():
            print(f"| {name} | {e['rel_l2']:.2e} | {e['max_abs']:.3g} | {e['ref_max_abs']:.3g} / "
                  f"{e['ref_rms']:.3g} | {e['seconds_fp32']:.2f} | {e['seconds_bf16']:.2f} |")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1].startswith("--_"):
        command, *rest = sys.argv[1:]
        if command == "--_generate":
            result = generate(rest[0], Path(rest[1]))
        elif command == "--_load":
            result = measure_load(rest[0], rest[1], Path(rest[2]))
        elif command == "--_versions":
            import platform
            from importlib.metadata import version
            cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                        if line.startswith("model name")), platform.processor())
            result = {"cpu": f"{cpu} ({os.cpu_count()} cores)", "python": platform.python_version(),
                      **{p: version(p) for p in ("jax", "jaxlib", "flax", "numpy", "msgpack", "safetensors",
                                                 "torch", "diffusers", "transformers")}}
        elif command == "--_errors":
            result = measure_bf16_error(Path(rest[0]))
        else:
            raise SystemExit(f"unknown sub-command {command}")
        result["child_peak_rss"] = _peak_rss_bytes()
        print(json.dumps(result))
    else:
        main()
