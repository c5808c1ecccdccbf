"""Shared pieces of the accelerator benchmarks (gpu_sample.py, gpu_train.py, gpu_profile.py).

- the random-weight pipeline folder at the real SD v1.5 configs (or the tiny test configs),
  written by sdjax itself in the diffusers PyTorch layout so that sdjax and diffusers both load it
  (no diffusers needed to build it);
- FLOP counts: an analytic count from the model configs (multiply-adds of every conv, linear and
  attention product, x2) and XLA's ``cost_analysis`` of the lowered functions, side by side;
- the bf16 matmul peak of the device (8192^3 via jax, median of repeats);
- HLO inspection of the sampling function (host transfers in the scan, operand dtypes);
- running one measurement in a fresh subprocess and collecting its JSON; markdown tables.

The orchestrating processes never initialise a GPU: everything that touches a device runs in a
child process (JAX preallocates most of the GPU's memory in the first process that uses it), and
FLOP counts and HLO checks that need no device run in children with ``JAX_PLATFORMS=cpu``.

Also a command line for those children and for merging result files:

    python benchmarks/common.py peak [--n 8192]
    python benchmarks/common.py build --size sd15|tiny --dir DIR [--overwrite] [--torch]
    python benchmarks/common.py flops [--size sd15|tiny] [--resolution 512] [--compile-unet]
    python benchmarks/common.py hlo [--size sd15|tiny] [--resolution 512] [--batch 1] [--compile]
    python benchmarks/common.py train-memory [--size sd15] [--resolution 512] [--batch 1] [--precision bf16]
    python benchmarks/common.py checkpoint-probe
    python benchmarks/common.py table results-a.json results-b.json ...
"""
from __future__ import annotations

import argparse
import datetime
import functools
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

ROOT = Path(__file__).resolve().parents[1]
GB = 1e9
PROMPTS = ["a photograph of an astronaut riding a horse", "a watercolor painting of a lighthouse at dusk",
           "a red fox in the snow, detailed fur", "an isometric city block, low poly, soft light"]
# SD v1.5's scheduler_config.json (PNDM), as tests/conftest.py has it.
SD15_SCHEDULER = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "set_alpha_to_one": False,
                  "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None, "clip_sample": False}
DEFAULT_WORKDIR = os.environ.get("SDJAX_BENCH_DIR", "/tmp/sdjax-bench")


# ----------------------------------------------------------------------------- environment
def have(package: str) -> bool:
    """Whether ``package`` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


def missing(packages: Iterable[str]) -> list[str]:
    return [p for p in packages if not have(p)]


def version(package: str) -> str:
    try:
        from importlib.metadata import version as v
        return v(package)
    except Exception:
        return "-"


def env_info(packages: Sequence[str] = ("jax", "jaxlib", "flax", "optax", "torch", "diffusers", "transformers",
                                        "numpy")) -> dict:
    return {"date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "python": platform.python_version(),
            "host": platform.node(), "cpus": os.cpu_count(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "versions": {p: v for p in packages if (v := version(p)) != "-"}}


def out_dir() -> Path | None:
    """``$OUT`` (the device tool's folder that comes back), if set."""
    return Path(os.environ["OUT"]) if os.environ.get("OUT") else None


def sd_configs(size: str) -> dict:
    """The model configs (diffusers/transformers dicts) of tests/model_configs.py: 'sd15' or 'tiny'."""
    sys.path.insert(0, str(ROOT / "tests"))
    import model_configs as R
    if size == "sd15":
        return {"unet": dict(R.SD15_UNET), "vae": dict(R.SD15_VAE), "clip": dict(R.SD15_CLIP)}
    if size == "tiny":
        return {"unet": dict(R.TINY_UNET), "vae": dict(R.TINY_VAE), "clip": dict(R.TINY_CLIP)}
    raise ValueError(f"unknown size {size!r}: 'sd15' or 'tiny'")


def vae_scale(vae_cfg: dict) -> int:
    return 2 ** (len(vae_cfg["block_out_channels"]) - 1)


# ----------------------------------------------------------------------------- child processes
def child_env(**extra: str | None) -> dict:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
               HF_HUB_DISABLE_PROGRESS_BARS="1", DIFFUSERS_VERBOSITY="error", TRANSFORMERS_VERBOSITY="error")
    # One device per accelerator, as a user has it: drop the tests' forced 8 CPU devices, keep other flags.
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    if flags:
        env["XLA_FLAGS"] = " ".join(flags)
    else:
        env.pop("XLA_FLAGS", None)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    for key, value in extra.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def run_child(script: Path | str, args: Sequence[str], *, env: dict | None = None, label: str = "",
              timeout: float | None = None) -> dict | None:
    """Run ``python script *args`` in a fresh interpreter; its stderr streams through (progress),
    its last stdout line is a JSON object (returned). A failure prints the child's output and
    returns None, so one side failing does not lose the others."""
    cmd = [sys.executable, str(script), *map(str, args)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env or child_env(), stdout=subprocess.PIPE, stderr=None, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"[{label}] timed out after {timeout:.0f} s: {' '.join(cmd)}", file=sys.stderr, flush=True)
        return None
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.strip()]
    if proc.returncode != 0 or not lines:
        print(f"[{label}] FAILED (exit {proc.returncode}) after {time.perf_counter() - t0:.0f} s: {' '.join(cmd)}\n"
              + proc.stdout[-4000:], file=sys.stderr, flush=True)
        return None
    try:
        return json.loads(lines[-1])
    except json.JSONDecodeError:
        print(f"[{label}] no JSON result line:\n{proc.stdout[-4000:]}", file=sys.stderr, flush=True)
        return None


def log(*args) -> None:
    """Progress to stderr (stdout of children is reserved for their JSON line)."""
    print(*args, file=sys.stderr, flush=True)


def emit(result: dict) -> None:
    """A child's result: one JSON line, last on stdout."""
    sys.stdout.flush()
    print(json.dumps(result, default=str), flush=True)


# ----------------------------------------------------------------------------- the pipeline folder
def pipeline_dir(workdir: str | Path, size: str) -> Path:
    return Path(workdir) / f"{size}-random"


def random_model(model_cls, config: dict, seed: int = 0, dtype=None) -> Any:
    """``model_cls(config, dtype=dtype)`` with random weights drawn by numpy (no per-parameter JAX
    dispatch): kernels N(0, 1/fan_in), embeddings N(0, 0.02^2), norm scales 1 + N(0, 0.1^2), biases
    N(0, 0.02^2). Each parameter has its own generator, seeded by (seed, its index), and they are
    drawn in a thread pool (numpy fills arrays without the GIL): the SD v1.5 UNet's 860M draws take
    ~20 s on one core; the weights do not depend on the number of threads."""
    from concurrent.futures import ThreadPoolExecutor

    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from sdjax.weights import abstract_model
    dtype = dtype or jnp.float32
    graphdef, state = abstract_model(model_cls, config, dtype=dtype)
    flat = list(nnx.to_flat_state(state))

    def draw(index: int) -> np.ndarray:
        path, var = flat[index]
        shape, name = var.get_value().shape, str(path[-1])
        rng = np.random.default_rng([seed, index])
        if name == "kernel":
            return rng.standard_normal(shape, np.float32) / np.sqrt(max(1, int(np.prod(shape[:-1]))))
        if name == "embedding":
            return rng.standard_normal(shape, np.float32) * 0.02
        if name == "scale":
            return 1.0 + 0.1 * rng.standard_normal(shape, np.float32)
        return 0.02 * rng.standard_normal(shape, np.float32)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for (_, var), value in zip(flat, pool.map(draw, range(len(flat)))):
            var.set_value(jnp.asarray(value, dtype))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def build_random_pipeline(directory: Path, size: str, seed: int = 0, *, overwrite: bool = False) -> Path:
    """A diffusers pipeline folder (safetensors, fp32) with random weights at the given configs,
    built from sdjax's own modules and ``save_pipeline``: neither diffusers nor torch needed. A
    folder that exists and is not empty is refused unless ``overwrite``."""
    import tempfile
    from sdjax import AutoencoderKL, CLIPTextModel, UNet2DConditionModel
    from sdjax.text import load_tokenizer
    from sdjax.weights import save_pipeline
    sys.path.insert(0, str(ROOT / "tests"))
    from model_configs import write_tiny_tokenizer
    if not overwrite and directory.is_dir() and any(directory.iterdir()):   # before minutes of building
        raise SystemExit(f"{directory} exists and is not empty: pass --overwrite to replace it, or another --dir")
    cfg = sd_configs(size)
    t0 = time.perf_counter()
    models = dict(text_encoder=random_model(CLIPTextModel, cfg["clip"], seed),
                  unet=random_model(UNet2DConditionModel, cfg["unet"], seed + 1),
                  vae=random_model(AutoencoderKL, cfg["vae"], seed + 2))
    log(f"random {size} models built in {time.perf_counter() - t0:.1f} s; writing {directory} ...")
    with tempfile.TemporaryDirectory() as scratch:   # save_pipeline copies the tokenizer into the folder
        tokenizer = load_tokenizer(write_tiny_tokenizer(Path(scratch)), subfolder=None)
        return save_pipeline(directory, tokenizer=tokenizer, scheduler_config=SD15_SCHEDULER, format="pytorch",
                             overwrite=overwrite, **models)


def build_random_pipeline_torch(directory: Path, size: str, seed: int = 0, *, overwrite: bool = False) -> Path:
    """The same folder built by diffusers and transformers (torch's own random initialisation, not
    `random_model`'s), for a machine where sdjax cannot be imported (its flax not made for its jax):
    the PyTorch side still gets its folder. Needs torch, diffusers and transformers."""
    import tempfile

    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    sys.path.insert(0, str(ROOT / "tests"))
    from model_configs import write_tiny_tokenizer
    if not overwrite and directory.is_dir() and any(directory.iterdir()):
        raise SystemExit(f"{directory} exists and is not empty: pass --overwrite to replace it, or another --dir")
    cfg = sd_configs(size)
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as scratch:
        pipe = StableDiffusionPipeline(
            vae=AutoencoderKL(**cfg["vae"]), text_encoder=CLIPTextModel(CLIPTextConfig(**cfg["clip"])),
            tokenizer=CLIPTokenizer.from_pretrained(write_tiny_tokenizer(Path(scratch))),
            unet=UNet2DConditionModel(**cfg["unet"]), scheduler=PNDMScheduler.from_config(SD15_SCHEDULER),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.save_pretrained(directory, safe_serialization=True)
    return directory


def ensure_pipeline(workdir: str | Path, size: str, *, rebuild: bool = False) -> Path:
    """The random pipeline folder, built (in a CPU-only child process) if it is not there yet: by
    sdjax, or where that fails (sdjax cannot be imported), by diffusers, so that the PyTorch side
    still runs."""
    directory = pipeline_dir(workdir, size)
    if (directory / "model_index.json").exists() and not rebuild:
        return directory
    log(f"building a random-weight {size} pipeline in {directory} (once per machine) ...")
    t0 = time.perf_counter()
    build = ["build", "--size", size, "--dir", str(directory), "--overwrite"]
    out = run_child(__file__, build, env=child_env(JAX_PLATFORMS="cpu"), label="build")
    if out is None and not missing(["torch", "diffusers", "transformers"]):
        log("sdjax could not build it: building it with diffusers instead (torch's random weights)")
        out = run_child(__file__, build + ["--torch"], env=child_env(JAX_PLATFORMS="cpu"), label="build (torch)")
    if out is None:
        raise SystemExit(f"could not build the random pipeline in {directory}")
    log(f"built in {time.perf_counter() - t0:.0f} s")
    return directory


def write_dataset(directory: Path, n: int, resolution: int, seed: int = 0) -> Path:
    """n random RGB images + image_captions.csv (sdjax's folder layout), for training benchmarks."""
    import numpy as np
    from PIL import Image
    images = directory / "train_images"
    done = directory / f".complete-{resolution}"  # holds the number of images written
    if done.exists() and int(done.read_text() or 0) >= n:
        return directory
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = ["filename,caption"]
    for i in range(n):
        pixels = rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"{i:04d}.png")
        rows.append(f"{i:04d}.png,\"{PROMPTS[i % len(PROMPTS)]}\"")
    (directory / "image_captions.csv").write_text("\n".join(rows) + "\n")
    done.write_text(str(n))
    return directory


# ----------------------------------------------------------------------------- FLOP counts
def _conv(hw: int, cin: int, cout: int, k: int) -> int:
    return 2 * hw * k * k * cin * cout


def _lin(tokens: int, cin: int, cout: int) -> int:
    return 2 * tokens * cin * cout


def _resnet(hw: int, cin: int, cout: int, temb: int = 0) -> int:
    f = _conv(hw, cin, cout, 3) + _conv(hw, cout, cout, 3) + (_lin(1, temb, cout) if temb else 0)
    return f + (_conv(hw, cin, cout, 1) if cin != cout else 0)


def _self_attention(tokens: int, dim: int) -> int:
    """q, k, v, out projections + QK^T + AV (heads do not change the count)."""
    return 4 * _lin(tokens, dim, dim) + 2 * 2 * tokens * tokens * dim


def _transformer(hw: int, ch: int, ctx_dim: int, ctx_len: int, layers: int = 1) -> int:
    block = (_self_attention(hw, ch)
             + 2 * _lin(hw, ch, ch) + 2 * _lin(ctx_len, ctx_dim, ch) + 2 * 2 * hw * ctx_len * ch  # cross-attention
             + _lin(hw, ch, 8 * ch) + _lin(hw, 4 * ch, ch))                                        # GEGLU feed-forward
    return 2 * _lin(hw, ch, ch) + layers * block  # proj_in / proj_out


def unet_flops(cfg: dict, h: int, w: int, ctx_len: int = 77) -> int:
    """Multiply-add FLOPs (x2) of one UNet call on ONE sample with h x w latents (convs, linears,
    attention products; norms and activations left out)."""
    chs, n = list(cfg["block_out_channels"]), cfg.get("layers_per_block", 2)
    ctx = cfg.get("cross_attention_dim", 768)
    down_types = cfg.get("down_block_types", ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",))
    up_types = cfg.get("up_block_types", ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    temb = 4 * chs[0]
    H, W = h, w
    f = _conv(H * W, cfg.get("in_channels", 4), chs[0], 3) + _lin(1, chs[0], temb) + _lin(1, temb, temb)
    out = chs[0]
    for i, kind in enumerate(down_types):
        cin, out = out, chs[i]
        for j in range(n):
            f += _resnet(H * W, cin if j == 0 else out, out, temb)
            if kind.startswith("CrossAttn"):
                f += _transformer(H * W, out, ctx, ctx_len)
        if i < len(chs) - 1:
            H, W = (H + 1) // 2, (W + 1) // 2
            f += _conv(H * W, out, out, 3)
    c = chs[-1]
    f += 2 * _resnet(H * W, c, c, temb) + _transformer(H * W, c, ctx, ctx_len)
    rev = chs[::-1]
    prev = rev[0]
    for i, kind in enumerate(up_types):
        out, skip_in = rev[i], rev[min(i + 1, len(chs) - 1)]
        for j in range(n + 1):
            cin = (prev if j == 0 else out) + (skip_in if j == n else out)
            f += _resnet(H * W, cin, out, temb)
            if kind.startswith("CrossAttn"):
                f += _transformer(H * W, out, ctx, ctx_len)
        if i < len(chs) - 1:
            H, W = 2 * H, 2 * W
            f += _conv(H * W, out, out, 3)
        prev = out
    return f + _conv(H * W, chs[0], cfg.get("out_channels", 4), 3)


def vae_decode_flops(cfg: dict, h: int, w: int) -> int:
    """One sample: latents h x w -> image (8h x 8w for SD)."""
    rev, n, lat = list(cfg["block_out_channels"])[::-1], cfg.get("layers_per_block", 2), cfg.get("latent_channels", 4)
    H, W = h, w
    f = _conv(H * W, lat, lat, 1) + _conv(H * W, lat, rev[0], 3)                   # post_quant_conv, conv_in
    f += 2 * _resnet(H * W, rev[0], rev[0]) + _self_attention(H * W, rev[0])    # mid block
    prev = rev[0]
    for i, out in enumerate(rev):
        for j in range(n + 1):
            f += _resnet(H * W, prev if j == 0 else out, out)
        if i < len(rev) - 1:
            H, W = 2 * H, 2 * W
            f += _conv(H * W, out, out, 3)
        prev = out
    return f + _conv(H * W, rev[-1], cfg.get("out_channels", 3), 3)


def vae_encode_flops(cfg: dict, H: int, W: int) -> int:
    """One sample: image H x W -> posterior moments (H/8 x W/8 for SD)."""
    chs, n, lat = list(cfg["block_out_channels"]), cfg.get("layers_per_block", 2), cfg.get("latent_channels", 4)
    f = _conv(H * W, cfg.get("in_channels", 3), chs[0], 3)
    prev = chs[0]
    for i, out in enumerate(chs):
        for j in range(n):
            f += _resnet(H * W, prev if j == 0 else out, out)
        if i < len(chs) - 1:
            H, W = H // 2, W // 2
            f += _conv(H * W, out, out, 3)
        prev = out
    c = chs[-1]
    f += 2 * _resnet(H * W, c, c) + _self_attention(H * W, c)
    return f + _conv(H * W, c, 2 * lat, 3) + _conv(H * W, 2 * lat, 2 * lat, 1)


def clip_flops(cfg: dict, tokens: int = 77) -> int:
    """One prompt through the text encoder."""
    d, i, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    return layers * (_self_attention(tokens, d) + _lin(tokens, d, i) + _lin(tokens, i, d))


def analytic_flops(size: str, resolution: int) -> dict:
    """Per-image FLOPs of each model at ``resolution`` px (analytic count)."""
    cfg = sd_configs(size)
    h = resolution // vae_scale(cfg["vae"])
    return {"unet_per_sample": unet_flops(cfg["unet"], h, h), "vae_decode": vae_decode_flops(cfg["vae"], h, h),
            "vae_encode": vae_encode_flops(cfg["vae"], resolution, resolution), "clip": clip_flops(cfg["clip"])}


def xla_flops(size: str, resolution: int, compile_unet: bool = False) -> dict:
    """The same counts from XLA: ``jit(...).lower(abstract args).cost_analysis()["flops"]`` of the
    bf16 models (no weights: abstract shapes only; the unoptimised HLO, so any backend gives the
    same number). UNet at batch 2 (one CFG pair), VAE decode/encode and CLIP at batch 1. Traced with
    XLA's attention whatever SDJAX_ATTENTION says: the CPU's blocked kernel is a loop, whose body
    cost analysis counts once (the SD v1.5 UNet at 512 px: 666 GFLOP per sample instead of 791)."""
    from sdjax.models import layers
    setting, layers.ATTENTION_IMPLEMENTATION = layers.ATTENTION_IMPLEMENTATION, "xla"
    try:
        return _xla_flops(size, resolution, compile_unet)
    finally:
        layers.ATTENTION_IMPLEMENTATION = setting


def _xla_flops(size: str, resolution: int, compile_unet: bool) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from sdjax import AutoencoderKL, CLIPTextModel, UNet2DConditionModel
    from sdjax.weights import abstract_model
    cfg = sd_configs(size)
    h = resolution // vae_scale(cfg["vae"])
    bf16, sds = jnp.bfloat16, jax.ShapeDtypeStruct
    out, seconds = {}, {}

    def count(name, cls, config, fn, *args):
        t0 = time.perf_counter()
        graphdef, state = abstract_model(cls, config, dtype=bf16)
        lowered = jax.jit(lambda s, *a: fn(nnx.merge(graphdef, s), *a)).lower(state, *args)
        out[name] = float(cost_flops(lowered.cost_analysis()))
        seconds[name] = time.perf_counter() - t0

    ctx = cfg["unet"].get("cross_attention_dim", 768)
    count("unet_batch2", UNet2DConditionModel, cfg["unet"], lambda m, x, t, c: m(x, t, c),
          sds((2, h, h, 4), jnp.float32), sds((2,), jnp.int32), sds((2, 77, ctx), jnp.float32))
    count("vae_decode", AutoencoderKL, cfg["vae"], lambda m, z: m.decode(z), sds((1, h, h, 4), jnp.float32))
    count("vae_encode", AutoencoderKL, cfg["vae"], lambda m, x: m.encode(x).mean,
          sds((1, resolution, resolution, 3), jnp.float32))
    count("clip", CLIPTextModel, cfg["clip"], lambda m, ids: m(ids).last_hidden_state, sds((1, 77), jnp.int32))
    out["unet_per_sample"] = out["unet_batch2"] / 2
    if compile_unet:  # the optimised module's count (fusion does not change it; a check that lowering's holds)
        t0 = time.perf_counter()
        graphdef, state = abstract_model(UNet2DConditionModel, cfg["unet"], dtype=bf16)
        compiled = jax.jit(lambda s, x, t, c: nnx.merge(graphdef, s)(x, t, c)).lower(
            state, sds((2, h, h, 4), jnp.float32), sds((2,), jnp.int32), sds((2, 77, ctx), jnp.float32)).compile()
        out["unet_batch2_compiled"] = float(cost_flops(compiled.cost_analysis()))
        seconds["unet_batch2_compiled"] = time.perf_counter() - t0
    return {"flops": out, "seconds": seconds, "backend": jax.default_backend()}


def cost_flops(cost: Any) -> float:
    """``cost_analysis()`` returns a dict (or, in older jax, a list with one dict per module)."""
    if isinstance(cost, (list, tuple)):
        return sum(float(c.get("flops", 0.0)) for c in cost if c)
    return float((cost or {}).get("flops", float("nan")))


def lowered_flops(lowered) -> float:
    """XLA's FLOP count of a lowered (unoptimised) function, ``jax.jit(f).lower(...)``, on any backend.

    On a GPU, ``Lowered.cost_analysis()`` is None (the CUDA plugin is a PJRT C API backend), and
    ``Compiled.cost_analysis()`` counts no custom call: every cuDNN convolution and cuBLAS matmul of
    the optimised module is left out. So where the backend gives no count, the CPU client's cost
    analysis counts the same unoptimised module (custom calls there, such as cuDNN's fused
    attention, still count nothing). NaN where neither answers."""
    flops = cost_flops(lowered.cost_analysis())
    if flops == flops:
        return flops
    try:
        from jax._src import xla_bridge
        from jax._src.lib import _jax
        module = lowered.compiler_ir("hlo").as_hlo_module()
        return cost_flops(_jax.hlo_module_cost_analysis(xla_bridge.get_backend("cpu"), module))
    except Exception:  # noqa: BLE001 - jax internals: no count rather than a failed benchmark
        return float("nan")


def flop_counts(size: str, resolution: int, cache_dir: str | Path | None = None) -> dict:
    """Analytic and XLA counts side by side (XLA's in a CPU-only child); ``best`` is XLA's when it
    answered, else the analytic one. All per image (UNet: per sample and UNet call).

    With ``cache_dir`` the XLA count is kept there, keyed by the configs and the source of
    sdjax's models, so the scripts of one GPU session lower the models once (~20 s each time)."""
    analytic = analytic_flops(size, resolution)
    cache = None
    if cache_dir is not None:
        import hashlib
        key = hashlib.sha256(json.dumps([sd_configs(size), resolution, "xla attention"], sort_keys=True).encode())
        for source in sorted((ROOT / "sdjax" / "models").glob("*.py")):
            key.update(source.read_bytes())
        cache = Path(cache_dir) / f"flops-{size}-{resolution}-{key.hexdigest()[:12]}.json"
    xla = json.loads(cache.read_text()) if cache is not None and cache.exists() else None
    if xla is None:
        xla = run_child(__file__, ["flops", "--size", size, "--resolution", str(resolution)],
                        env=child_env(JAX_PLATFORMS="cpu"), label="flops")
        if xla and cache is not None:
            save_results(cache, xla)
    best = dict(analytic)
    if xla:
        best.update({k: xla["flops"][k] for k in analytic if k in xla["flops"]})
    return {"analytic": analytic, "xla": (xla or {}).get("flops"), "xla_seconds": (xla or {}).get("seconds"),
            "best": best, "source": "xla cost_analysis" if xla else "analytic"}


def sample_flops_per_image(flops: dict, num_model_calls: int, guidance: bool = True) -> float:
    """One generated image: CLIP (x2 with CFG) + num_model_calls UNet calls (x2 samples with
    CFG) + one VAE decode."""
    k = 2 if guidance else 1
    return k * flops["clip"] + k * num_model_calls * flops["unet_per_sample"] + flops["vae_decode"]


def train_flops_per_image(flops: dict) -> float:
    """One training example (model FLOPs): UNet forward + backward (3x forward) on one sample,
    VAE encode and CLIP forward (frozen: no backward). Gradient checkpointing's recompute and
    the optimizer are not counted (MFU convention)."""
    return 3 * flops["unet_per_sample"] + flops["vae_encode"] + flops["clip"]


def print_flops(counts: dict, *, file=None) -> None:
    file = file or sys.stdout
    a, x = counts["analytic"], counts.get("xla") or {}
    print("| model (per image) | analytic GFLOP | XLA cost_analysis GFLOP | XLA / analytic |", file=file)
    print("|---|---:|---:|---:|", file=file)
    for key, name in (("unet_per_sample", "UNet, one call, one sample"), ("vae_decode", "VAE decode"),
                      ("vae_encode", "VAE encode"), ("clip", "CLIP text encoder (77 tokens)")):
        xv = x.get(key)
        print(f"| {name} | {a[key] / 1e9:,.5g} | {'-' if xv is None else f'{xv / 1e9:,.5g}'} | "
              f"{'-' if xv is None else f'{xv / a[key]:.3f}'} |", file=file)


# ----------------------------------------------------------------------------- device helpers (children)
def matmul_peak(n: int = 8192, repeats: int = 10, inner: int = 20) -> dict:
    """bf16 [n, n] @ [n, n] throughput via jax: ``inner`` chained products in one jitted loop (so
    dispatch gaps do not count), on random data, median over ``repeats``."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), jnp.bfloat16)
    b = jax.random.normal(kb, (n, n), jnp.bfloat16)
    scale = jnp.bfloat16(1.0 / np.sqrt(n))  # keeps the chained values O(1): no overflow to inf

    @jax.jit
    def chain(x, y):
        return jax.lax.fori_loop(0, inner, lambda _, x: (x @ y) * scale, x)

    chain(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        chain(a, b).block_until_ready()
        times.append(time.perf_counter() - t0)
    per = statistics.median(times) / inner
    return {"n": n, "tflops": 2 * n ** 3 / per / 1e12, "seconds_per_matmul": per,
            "device": device_name(), "repeats": repeats, "inner": inner,
            "spread": (min(times) / inner, max(times) / inner)}


def peak_of(args) -> dict | None:
    """The bf16 peak a script's MFU uses: ``--peak-tflops`` if given, else measured in a child
    process on the default device unless ``--skip-peak`` (small on a ``--dry-run``); printed."""
    peak = None
    if args.peak_tflops:
        peak = {"tflops": args.peak_tflops, "source": "--peak-tflops"}
    elif not args.skip_peak:
        peak = measure_peak(args.dry_run)
    if peak:
        print(describe_peak(peak))
    return peak


def measure_peak(dry_run: bool = False) -> dict | None:
    """`matmul_peak` on the default device, in a child process (8192^3, median of 10; 512^3 and 3
    repeats on a dry run)."""
    n, repeats = (512, 3) if dry_run else (8192, 10)
    return run_child(__file__, ["peak", "--n", str(n), "--repeats", str(repeats)], env=child_env(), label="peak")


def describe_peak(peak: dict) -> str:
    """One line on where a peak figure came from (measured here, or given on the command line)."""
    if "n" not in peak:
        return f"bf16 matmul peak: {peak['tflops']:.4g} TFLOP/s ({peak.get('source', 'given')})"
    return (f"measured bf16 matmul peak: {peak['tflops']:.4g} TFLOP/s ({peak['n']}^3 on {peak.get('device', '?')}, "
            f"median of {peak.get('repeats', '?')})")


def device_name() -> str:
    import jax
    d = jax.devices()[0]
    return f"{d.platform}:{getattr(d, 'device_kind', '')}"


def jax_peak_bytes() -> int | None:
    """Peak bytes in use on device 0 since the process started (None where the backend has no
    allocator statistics, e.g. CPU)."""
    import jax
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:
        return None
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def peak_rss_bytes() -> int:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class CompileTimer:
    """Seconds JAX spends tracing, lowering and compiling (its own monitoring events), summed
    from the moment of ``reset``."""
    EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
              "/jax/core/compile/backend_compile_duration")

    def __init__(self):
        import jax.monitoring
        self.seconds = {e: 0.0 for e in self.EVENTS}
        jax.monitoring.register_event_duration_secs_listener(self._listen)

    def _listen(self, event: str, duration: float, **_) -> None:
        if event in self.seconds:
            self.seconds[event] += duration

    def reset(self) -> None:
        self.seconds = {e: 0.0 for e in self.EVENTS}

    @property
    def total(self) -> float:
        return sum(self.seconds.values())


def out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` says the device ran out of memory (JAX's RESOURCE_EXHAUSTED, when compiling or
    running; torch's OutOfMemoryError): a smaller batch may still fit. Not `sdjax.cli_utils.out_of_memory`:
    that one knows JAX only, and the PyTorch children must run where sdjax cannot be imported."""
    return ("RESOURCE_EXHAUSTED" in str(error) or type(error).__name__ == "OutOfMemoryError"
            or "out of memory" in str(error).lower())


def timed_repeats(fn: Callable[[], Any], *, warmup: int, repeats: int, sync: Callable[[Any], Any]) -> list[float]:
    """Run ``fn`` ``warmup`` times untimed, then ``repeats`` times timed (synchronised with ``sync``)."""
    for _ in range(warmup):
        sync(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - t0)
    return times


# ----------------------------------------------------------------------------- HLO inspection
def inspect_sampling_hlo(size: str, resolution: int, *, compile: bool = False, steps: int = 50,
                         batch: int = 1) -> dict:
    """Lower (and with ``compile`` also compile) the bf16 sampling function (``sampling.generate``
    as `StableDiffusion` jits it: CLIP + 51-call PNDM scan + VAE decode, ``batch`` images with CFG)
    on abstract arguments, and check the HLO (compiled: also XLA's memory plan, the scratch bytes
    being mostly the attention scores with XLA's attention, ``SDJAX_ATTENTION=xla``):

    - no host traffic anywhere (outfeed/infeed/send/recv, Python callbacks as custom-calls);
    - the while loop (the scan) exists, and every convolution / dot is bf16 x bf16 except a
      listed few (the scheduler and CFG arithmetic is elementwise f32);
    - the scheduler's elementwise arithmetic in the scan body is f32 (counts of f32 vs bf16
      multiply/add ops outside the UNet).
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from sdjax import AutoencoderKL, CLIPTextModel, UNet2DConditionModel, sampling
    from sdjax.schedulers import make_scheduler
    from sdjax.weights import abstract_model
    cfg = sd_configs(size)
    bf16, sds = jnp.bfloat16, jax.ShapeDtypeStruct
    graphdefs, states = [], []
    for cls, c in ((CLIPTextModel, cfg["clip"]), (UNet2DConditionModel, cfg["unet"]), (AutoencoderKL, cfg["vae"])):
        g, s = abstract_model(cls, c, dtype=bf16)
        graphdefs.append(g)
        states.append(nnx.to_pure_dict(s))
    graphdefs, state = sampling.SDState(*graphdefs), sampling.SDState(*states)
    sched = make_scheduler("pndm", SD15_SCHEDULER, steps)
    h = resolution // vae_scale(cfg["vae"])
    ids = sds((batch, 77), jnp.int32)
    t0 = time.perf_counter()
    fn = jax.jit(functools.partial(sampling.generate, graphdefs),   # the graphdefs bound in, as the pipeline has them
                 static_argnames=("latent_shape_HWC", "use_guidance", "return_predictions"))
    lowered = fn.lower(state, sched, ids, ids, sds((batch,), jnp.uint32), None, jnp.float32(7.5),
                       latent_shape_HWC=(h, h, 4), use_guidance=True, return_predictions=False)
    lower_s = time.perf_counter() - t0
    stablehlo = lowered.as_text()
    from sdjax.models import layers
    report: dict = {"size": size, "resolution": resolution, "batch": batch, "num_model_calls": sched.num_model_calls,
                    "attention": layers.ATTENTION_IMPLEMENTATION, "lower_seconds": lower_s,
                    "backend": jax.default_backend()}
    report["lowered"] = _check_stablehlo(stablehlo, (batch, h, h, cfg["unet"].get("in_channels", 4)))
    if compile:
        t0 = time.perf_counter()
        compiled = lowered.compile()
        report["compile_seconds"] = time.perf_counter() - t0
        report["compiled"] = _check_compiled_hlo(compiled.as_text(), sched.num_model_calls)
        report["compiled_flops"] = cost_flops(compiled.cost_analysis())
        memory = compiled.memory_analysis()
        report["argument_bytes"], report["temp_bytes"] = memory.argument_size_in_bytes, memory.temp_size_in_bytes
    report["lowered_flops"] = lowered_flops(lowered)
    return report


def _stablehlo_operand_types(line: str) -> list[str]:
    """Element types of a StableHLO op's operands, from its ``: (tensor<..xbf16>, ...) -> ...``."""
    import re
    sig = line.rsplit(" : ", 1)[-1].split(" loc(")[0]
    return re.findall(r"x(bf16|f16|f32|f64|i32|i64|ui32|i1)>", sig.split("->")[0])


def _scan_body_lines(text: str) -> list[str]:
    """Lines of the lowered module that run inside a ``stablehlo.while`` body of ``@main`` (the
    scan), including the private functions that body calls (transitively)."""
    import re
    funcs: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        m = re.match(r"\s*func\.func (?:public|private) @([\w$.-]+)", line)
        if m:
            current = m.group(1)
            funcs[current] = []
        elif current:
            funcs[current].append(line)
    body, depth_stack = [], []
    for line in funcs.get("main", []):
        stripped = line.strip()
        if stripped.startswith("}"):
            if depth_stack:
                depth_stack.pop()
        if stripped.endswith("{"):
            depth_stack.append("do" if stripped.endswith("do {") else "other")
        if "do" in depth_stack:
            body.append(line)
    calls = lambda lines: set(re.findall(r"func\.call @([\w$.-]+)", "\n".join(lines)))  # noqa: E731
    todo, seen = calls(body), set()
    while todo:
        name = todo.pop()
        if name in seen or name not in funcs:
            continue
        seen.add(name)
        body += funcs[name]
        todo |= calls(funcs[name])
    return body


def _check_stablehlo(text: str, latent_shape: Sequence[int]) -> dict:
    """The lowered module (StableHLO, before XLA's optimisations, so the same on every backend):

    - ``host_ops``: outfeed/infeed/send/recv ops and Python-callback custom calls, anywhere and
      in the scan body (want none);
    - ``scan_body``: its dot_general / convolution ops by operand types (the UNet), the ones that
      are not bf16 x bf16 with their shapes, and the ops whose result has the sampler's latent
      shape [B, h, w, C] (scheduler arithmetic, CFG combination) by element type;
    - ``whole_module``: the same counts over everything (CLIP, VAE decode, initial noise too).
    """
    import re
    targets = set(re.findall(r"custom_call @([\w$.-]+)", text)) | set(re.findall(r'call_target_name = "([^"]+)"', text))
    latent = "x".join(map(str, latent_shape))

    def scan(lines: list[str]) -> dict:
        joined = "\n".join(lines)
        kinds, odd, by_type = {}, set(), {}
        for line in lines:
            code = line.split(" loc(")[0]
            for op in ("convolution", "dot_general"):
                if f"stablehlo.{op}" in code:
                    types = _stablehlo_operand_types(code)[:2]
                    key = f"{op}[{' x '.join(types)}]"
                    kinds[key] = kinds.get(key, 0) + 1
                    if types != ["bf16", "bf16"]:
                        odd.add(f"{op} {code.rsplit(' : ', 1)[-1]}")
            m = (re.search(rf"=\s*stablehlo\.\w+.*->\s*tensor<{latent}x(\w+)>\s*$", code)
                 or re.search(rf"=\s*stablehlo\.\w+[^:]*:\s*tensor<{latent}x(\w+)>\s*$", code))
            if m:
                by_type[m.group(1)] = by_type.get(m.group(1), 0) + 1
        call_targets = set(re.findall(r"custom_call @([\w$.-]+)", joined)) | set(
            re.findall(r'call_target_name = "([^"]+)"', joined))
        host = {op for op in ("outfeed", "infeed", "send", "recv") if re.search(rf"stablehlo\.{op}\b", joined)}
        host |= {t for t in call_targets if "callback" in t.lower() or "host" in t.lower()}
        return {"lines": len(lines), "host_ops": sorted(host), "custom_call_targets": sorted(call_targets),
                "matmul_and_conv_operand_types": kinds, "not_bf16": sorted(odd),
                f"ops_with_latent_shape_{latent}_by_type": by_type}

    return {"while_loops": len(re.findall(r"stablehlo\.while", text)), "custom_call_targets": sorted(targets),
            "scan_body": scan(_scan_body_lines(text)), "whole_module": scan(text.splitlines())}


def _check_compiled_hlo(text: str, num_model_calls: int) -> dict:
    """The optimised HLO: host traffic anywhere; the while loop that runs ``num_model_calls``
    times (the scan); matmuls and convolutions (plain HLO ops, or cuBLAS/cuDNN custom calls on
    GPU) by operand element type, inside the scan body and outside it (by op_name metadata)."""
    import re
    types: dict = {}
    for m in re.finditer(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\w+)\[", text, re.M):
        types[m.group(1)] = m.group(2)
    targets = set(re.findall(r'custom_call_target="([^"]+)"', text))
    out: dict = {"custom_call_targets": sorted(targets),
                 "host_ops": sorted({op for op in ("outfeed", "infeed", "send", "recv", "send-done", "recv-done")
                                     if re.search(rf"\s{op}\(", text)}
                                    | {t for t in targets if "callback" in t.lower() or "host" in t.lower()}),
                 "while_trip_counts": [int(n) for n in re.findall(r'"known_trip_count":\{"n":"(\d+)"\}', text)]}
    out["scan_found"] = num_model_calls in out["while_trip_counts"]
    heavy = re.compile(r"\b(convolution|dot)\(|custom_call_target=\"[^\"]*(cudnn\$conv|cublas|gemm|fmha|triton)", re.I)
    kinds: dict = {}
    for line in text.splitlines():
        if not heavy.search(line) or "=" not in line:
            continue
        op_m = re.search(r"\b(convolution|dot|custom-call|fusion)\(([^)]*)\)", line)
        if not op_m:
            continue
        operands = [o.strip().lstrip("%") for o in op_m.group(2).split(",") if o.strip()]
        operand_types = [types.get(o, "?") for o in operands[:2]]
        target = re.search(r'custom_call_target="([^"]+)"', line)
        kind = target.group(1) if target else op_m.group(1)
        name = re.search(r'op_name="([^"]+)"', line)
        scope = "scan" if name and "/while/body/" in name.group(1) and "_uniform" not in name.group(1) else "outside"
        key = f"{scope}: {kind}[{' x '.join(operand_types)}]"
        kinds[key] = kinds.get(key, 0) + 1
    out["matmul_and_conv_types"] = dict(sorted(kinds.items()))
    return out


# ----------------------------------------------------------------------------- the PyTorch training step
def torch_train_step(unet, vae, text_encoder, noise_scheduler, optimizer, pixels, ids, *, autocast=None):
    """One update of diffusers' examples/text_to_image/train_text_to_image.py: VAE-encode and
    CLIP-encode under no_grad, noise at random timesteps, the UNet under ``autocast()`` (a context
    factory, or none), MSE against the noise, clip the gradient norm at 1, step, zero the grads.
    Returns the loss tensor, not synchronised."""
    import contextlib

    import torch
    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
        context = text_encoder(ids)[0]
    noise = torch.randn_like(latents)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                              device=latents.device)
    with (autocast or contextlib.nullcontext)():
        pred = unet(noise_scheduler.add_noise(latents, noise, timesteps), timesteps, context).sample
    loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


# ----------------------------------------------------------------------------- training step memory
def train_step_memory(configs: dict, *, resolution: int, batch: int, precision: str = "fp32", remat: bool = False,
                      cached_latents: bool = False, clipping: str = "sdjax", lora_rank: int | None = None) -> dict:
    """XLA's memory analysis of sdjax's compiled train step (UNet trained with AdamW and global-norm
    clipping at 1; fp32 master weights; VAE encode + CLIP inside the step unless ``cached_latents``)
    on one device, from abstract shapes: nothing is allocated, so any size compiles on a small
    machine for the default backend. ``configs``: {"unet", "vae", "clip"} config dicts.
    ``clipping="optax"`` swaps in ``optax.clip_by_global_norm`` (what the step used before) for comparison.
    ``lora_rank``: a LoRA run's step instead (the UNet frozen, LoRA of its attention projections trained)."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from sdjax import AutoencoderKL, CLIPTextModel, UNet2DConditionModel, parallel
    from sdjax.training import step as S
    from sdjax.weights import abstract_model
    compute = {"fp32": jnp.float32, "bf16": jnp.bfloat16}[precision]

    def parts(cls, config, **kwargs):  # graphdef in the compute dtype, fp32 abstract params
        graphdef, _ = abstract_model(cls, config, dtype=compute, **kwargs)
        model = nnx.merge(*abstract_model(cls, config, dtype=jnp.float32))
        return graphdef, nnx.to_pure_dict(nnx.state(model, nnx.Param))

    (unet_gd, unet), (clip_gd, clip), (vae_gd, vae) = (
        parts(UNet2DConditionModel, configs["unet"], remat=remat), parts(CLIPTextModel, configs["clip"]),
        parts(AutoencoderKL, configs["vae"]))
    real_clip = S.clip_by_global_norm
    if clipping == "optax":
        S.clip_by_global_norm = optax.clip_by_global_norm
    try:
        optimizer, lr = S.make_optimizer(1e-5, max_grad_norm=1.0)
    finally:
        S.clip_by_global_norm = real_clip
    sds = jax.ShapeDtypeStruct
    spec = None
    if lora_rank is not None:   # the frozen models in the compute dtype, as a LoRA run loads them
        from sdjax.training import lora
        unet, clip, vae = (jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, compute), tree)
                           for tree in (unet, clip, vae))
        spec = lora.lora_spec({"unet": unet}, rank=lora_rank)
        trained = {"lora": jax.eval_shape(lambda: lora.init_lora(spec, {"unet": unet}, jax.random.key(0)))}
    else:
        trained = {"unet": unet}
    state = jax.eval_shape(lambda p: S.init_state(p, optimizer, 0, ema=False), trained)
    frozen = S.Frozen(vae=vae, text_encoder=clip, alphas_cumprod=sds((1000,), jnp.float32),
                      empty_ids=sds((77,), jnp.int32), scaling_factor=sds((), jnp.float32),
                      unet=unet if spec is not None else None)
    if cached_latents:
        h = resolution // vae_scale(configs["vae"])
        latents = sds((1, batch, h, h, configs["vae"].get("latent_channels", 4)), jnp.float32)
        data = {"latent_mean": latents, "latent_std": latents}
    else:
        data = {"pixel_values": sds((1, batch, resolution, resolution, 3), jnp.float32)}
    data["input_ids"] = sds((1, batch, 77), jnp.int32)
    step = S.jit_train_step(parallel.data_mesh(jax.devices()[:1]), graphdefs=S.Graphdefs(unet_gd, clip_gd, vae_gd),
                            cfg=S.StepConfig(compute_dtype=compute, lora=spec), optimizer=optimizer, lr_schedule=lr)
    t0 = time.perf_counter()
    memory = step.lower(state, frozen, data).compile().memory_analysis()
    tree_bytes = lambda tree: sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(tree))  # noqa: E731
    return {"backend": jax.default_backend(), "resolution": resolution, "batch": batch, "precision": precision,
            "remat": remat, "clipping": clipping, "lora_rank": lora_rank, "compile_s": time.perf_counter() - t0,
            "unet_param_bytes": tree_bytes(unet), "argument_bytes": memory.argument_size_in_bytes,
            "output_bytes": memory.output_size_in_bytes, "alias_bytes": memory.alias_size_in_bytes,
            "temp_bytes": memory.temp_size_in_bytes}


def checkpoint_probe(blocks: int = 8, layers: int = 8, rows: int = 4096, width: int = 1024) -> dict:
    """Does the default backend's compiler keep ``jax.checkpoint``? The gradient of a chain of
    ``blocks`` blocks of ``layers`` tanh(x @ W) layers, compiled with and without a checkpoint per
    block: scratch bytes and dot count of each plan. Kept, the checkpointed plan holds ~one block
    of activations (and has ~one more forward's dots); undone (XLA:CPU), both plans match."""
    import jax
    import jax.numpy as jnp

    def block(w, x):
        for _ in range(layers):
            x = jnp.tanh(x @ w)
        return x

    result = {"backend": jax.default_backend(), "activation_bytes": rows * width * 4,
              "blocks": blocks, "layers": layers}
    for name, wrap in (("plain", lambda f: f), ("checkpointed", jax.checkpoint)):
        def loss(ws, x, wrap=wrap):
            for w in ws:
                x = wrap(block)(w, x)
            return jnp.sum(x)
        compiled = jax.jit(jax.grad(loss)).lower(
            [jax.ShapeDtypeStruct((width, width), jnp.float32)] * blocks,
            jax.ShapeDtypeStruct((rows, width), jnp.float32)).compile()
        result[f"{name}_temp_bytes"] = compiled.memory_analysis().temp_size_in_bytes
        result[f"{name}_dots"] = compiled.as_text().count(" dot(")
    return result


# ----------------------------------------------------------------------------- tables
def fmt(value: Any, spec: str = ".2f") -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    return format(value, spec) if isinstance(value, (int, float)) else str(value)


def markdown_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> str:
    """``columns``: (header, key, format spec)."""
    lines = ["| " + " | ".join(h for h, _, _ in columns) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(columns))) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(k), spec) for _, k, spec in columns) + " |")
    return "\n".join(lines)


def save_results(path: str | Path | None, payload: dict) -> Path | None:
    if not path:
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


def default_results_path(name: str) -> Path | None:
    o = out_dir()
    return (o / name) if o else None


# ----------------------------------------------------------------------------- command line (children)
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("peak", help="bf16 matmul peak of the default JAX device")
    p.add_argument("--n", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=10)
    p = sub.add_parser("flops", help="XLA cost_analysis FLOPs of the models (lowered, abstract)")
    p.add_argument("--size", choices=["sd15", "tiny"], default="sd15", help="model configs (default sd15)")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--compile-unet", action="store_true", help="also compile the UNet (batch 2) and count again")
    p = sub.add_parser("hlo", help="HLO checks of the bf16 sampling function")
    p.add_argument("--size", choices=["sd15", "tiny"], default="sd15", help="model configs (default sd15)")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--compile", action="store_true", help="also compile and check the optimised HLO")
    p.add_argument("--batch", type=int, default=1, help="images per call (with CFG: twice that through the UNet)")
    p = sub.add_parser("train-memory", help="XLA memory analysis of the compiled train step (abstract shapes)")
    p.add_argument("--size", choices=["sd15", "tiny"], default="sd15", help="model configs (default sd15)")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--remat", action="store_true")
    p.add_argument("--clipping", choices=["sdjax", "optax"], default="sdjax")
    p.add_argument("--lora-rank", type=int, help="a LoRA run's step (the UNet frozen) instead")
    sub.add_parser("checkpoint-probe", help="does the backend's compiler keep jax.checkpoint (remat)?")
    p = sub.add_parser("build", help="write the random pipeline folder")
    p.add_argument("--size", choices=["sd15", "tiny"], default="sd15", help="model configs (default sd15)")
    p.add_argument("--dir", required=True)
    p.add_argument("--overwrite", action="store_true", help="replace a folder that is not empty")
    p.add_argument("--torch", action="store_true",
                   help="build it with diffusers and transformers instead (where sdjax cannot be imported)")
    p = sub.add_parser("table", help="print the tables of result JSON files")
    p.add_argument("files", nargs="+")
    args = parser.parse_args()
    if args.cmd == "peak":
        emit(matmul_peak(args.n, args.repeats))
    elif args.cmd == "flops":
        emit(xla_flops(args.size, args.resolution, compile_unet=args.compile_unet))
    elif args.cmd == "hlo":
        r = inspect_sampling_hlo(args.size, args.resolution, compile=args.compile, steps=args.steps, batch=args.batch)
        emit(r)
        if args.compile:
            print(f"{args.size} bf16 sampler, batch {args.batch}, {args.resolution} px, SDJAX_ATTENTION="
                  f"{r['attention']}, {r['backend']}: arguments {r['argument_bytes'] / 2 ** 30:.2f} GiB, scratch "
                  f"{r['temp_bytes'] / 2 ** 30:.2f} GiB, compile {r['compile_seconds']:.0f} s", file=sys.stderr)
    elif args.cmd == "train-memory":
        r = train_step_memory(sd_configs(args.size), resolution=args.resolution, batch=args.batch,
                              precision=args.precision, remat=args.remat, clipping=args.clipping,
                              lora_rank=args.lora_rank)
        emit(r)
        gib = 2 ** 30
        print(f"{args.size} train step, {args.resolution} px, batch {args.batch}, {args.precision}, remat {args.remat}, "
              f"LoRA rank {args.lora_rank}, "
              f"{args.clipping} clipping, {r['backend']}: arguments {r['argument_bytes'] / gib:.2f} GiB, scratch "
              f"{r['temp_bytes'] / gib:.2f} GiB ({'frozen UNet' if args.lora_rank else 'UNet gradients'} "
              f"{r['unet_param_bytes'] / gib:.2f} GiB), "
              f"compile {r['compile_s']:.0f} s", file=sys.stderr)
    elif args.cmd == "checkpoint-probe":
        r = checkpoint_probe()
        emit(r)
        mib = 2 ** 20
        print(f"{r['backend']}: grad of {r['blocks']} blocks x {r['layers']} layers, "
              f"{r['activation_bytes'] / mib:.0f} MiB per activation: scratch {r['plain_temp_bytes'] / mib:.0f} MiB "
              f"plain, {r['checkpointed_temp_bytes'] / mib:.0f} MiB with jax.checkpoint per block; dots "
              f"{r['plain_dots']} vs {r['checkpointed_dots']}", file=sys.stderr)
    elif args.cmd == "build":
        build = build_random_pipeline_torch if args.torch else build_random_pipeline
        directory = build(Path(args.dir).expanduser(), args.size, overwrite=args.overwrite)
        emit({"dir": str(directory)})
    elif args.cmd == "table":
        for f in args.files:
            payload = json.loads(Path(f).read_text())
            print(f"\n## {f} ({payload.get('script', '?')}, {payload.get('env', {}).get('date', '')})\n")
            if "rows" in payload and "columns" in payload:
                print(markdown_table(payload["rows"], [tuple(c) for c in payload["columns"]]))
            elif "stages" in payload:  # a gpu_session.py file: each stage's table
                for name, stage in payload["stages"].items():
                    result = stage.get("result") or {}
                    print(f"\n### {name}: {stage['status']}\n")
                    if "rows" in result and "columns" in result:
                        print(markdown_table(result["rows"], [tuple(c) for c in result["columns"]]))
                for line in (payload.get("summary") or {}).get("goals", {}).get("lines", []):
                    print(f"- {line}")
            else:
                print(f"(no result table in {f}: keys {sorted(payload)})")


if __name__ == "__main__":
    main()
