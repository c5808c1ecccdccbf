"""Test-suite set-up.

Every test process sees 8 CPU devices (set before JAX is imported), so multi-device
code is exercised in-process; a test that wants one device builds a mesh over
``jax.devices()[:1]``.  Long checks (the real SD v1.5 configs, the four-seed learning
comparison, the two-process training run) are marked ``slow`` and run only with ``--runslow``.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no network in CI: never try the Hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))  # tests import reference.py


def run_two_processes(worker: str, tmp_path: Path, *args, timeout: float) -> list[str]:
    """Run ``worker`` (Python source) as processes 0 and 1 of one jax.distributed job on
    127.0.0.1, each with argv ``[coordinator address, process id, *args]`` and without this
    process's XLA_FLAGS (a worker sets its own device count). Returns both logs (stdout and
    stderr) once both exited 0. On a timeout or failure both are killed, so a worker stuck in a
    collective does not outlive the test."""
    import socket
    import subprocess
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "worker.py"
    script.write_text(worker)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    logs = [tmp_path / f"worker-{i}.log" for i in range(2)]
    procs = []
    try:
        for i, log in enumerate(logs):
            with open(log, "w") as f:   # files, not pipes: a full pipe would block a worker mid-collective
                procs.append(subprocess.Popen([sys.executable, str(script), f"127.0.0.1:{port}", str(i),
                                               *map(str, args)], env=env, stdout=f, stderr=subprocess.STDOUT))
        for p in procs:
            p.wait(timeout=timeout)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    texts = [log.read_text() for log in logs]
    for i, (p, text) in enumerate(zip(procs, texts)):
        assert p.returncode == 0, f"process {i} exited with {p.returncode}:\n{text[-3000:]}"
    return texts


def skip_unless_flax_needs_hiprimitive() -> None:
    """Skip a test that plays a machine whose flax cannot be imported under its jax by deleting
    ``jax.experimental.hijax.HiPrimitive`` (flax <= 0.12.9 subclasses it at import; jax 0.11.2 deleted
    it, google/flax#5596), where that cannot be played: under jax 0.11.2 there is no class to delete,
    and flax 0.12.10 and later no longer use it (their import still works without it)."""
    import re
    from importlib.metadata import version

    import jax.experimental.hijax as hijax
    flax_version = tuple(int(n) for n in re.findall(r"\d+", version("flax"))[:3])
    if not hasattr(hijax, "HiPrimitive") or flax_version >= (0, 12, 10):
        pytest.skip(f"flax {version('flax')} under jax {version('jax')} cannot play it (that needs flax <= 0.12.9 "
                    "and a jax before 0.11.2)")


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False,
                     help="also run the slow tests (marked slow)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """Tiny random-weight reference models and their checkpoints in every layout.

    Returns a dict: kind -> {"torch": the PyTorch model, "<layout>": weights file}, layouts being
    "safetensors", "flax" (fp32 msgpack) and "flax_bf16" (bf16 msgpack); the VAE also has
    "bin_old_names" (a .bin with the pre-0.14 attention names).
    """
    import ml_dtypes
    import reference as R

    root = tmp_path_factory.mktemp("tiny")
    out = {}
    for kind, make in (("unet", R.torch_unet), ("vae", R.torch_vae), ("clip", R.torch_clip)):
        model = make()
        entry = {"torch": model,
                 "safetensors": R.save_torch_layout(model, root / kind / "safetensors"),
                 "flax": R.save_flax_layout(model, root / kind / "flax", kind=kind),
                 "flax_bf16": R.save_flax_layout(model, root / kind / "flax_bf16", kind=kind,
                                                 dtype=ml_dtypes.bfloat16)}
        if kind == "vae":
            entry["bin_old_names"] = R.save_torch_layout(model, root / kind / "bin_old", safe=False,
                                                         old_vae_names=True)
        out[kind] = entry
    return out


_COMPILED: dict = {}


def run_jitted(name, model, fn, *args):
    """``fn(model, *args)`` as one compiled program (split/merge under ``jax.jit``), as sdjax's sampler
    and trainer run the models; eager calls would compile each op on its own at every new shape.
    Compiled once per ``name`` (one ``fn`` per name) and graph, so a second layout of the same model
    reuses the first one's executable. Returns numpy arrays."""
    import jax
    import numpy as np
    from flax import nnx
    if name not in _COMPILED:
        _COMPILED[name] = jax.jit(lambda graphdef, state, *a: fn(nnx.merge(graphdef, state), *a),
                                  static_argnums=0)
    graphdef, state = nnx.split(model)
    return jax.tree.map(np.asarray, _COMPILED[name](graphdef, state, *args))


SD15_SCHEDULER = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "set_alpha_to_one": False,
                  "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None, "clip_sample": False}


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tiny_checkpoints, tmp_path_factory):
    """A complete tiny random-weight pipeline folder (both layouts), as save_pipeline writes it."""
    import reference as R
    from sdjax import AutoencoderKL, CLIPTextModel, UNet2DConditionModel
    from sdjax.text import load_tokenizer
    from sdjax.weights import save_pipeline

    root = tmp_path_factory.mktemp("pipeline")
    return save_pipeline(
        root / "tiny-sd", text_encoder=CLIPTextModel.from_pretrained(tiny_checkpoints["clip"]["flax"].parent),
        unet=UNet2DConditionModel.from_pretrained(tiny_checkpoints["unet"]["flax"].parent),
        vae=AutoencoderKL.from_pretrained(tiny_checkpoints["vae"]["flax"].parent),
        tokenizer=load_tokenizer(R.write_tiny_tokenizer(root / "tok"), subfolder=None),
        scheduler_config=SD15_SCHEDULER)


@pytest.fixture(scope="session")
def micro_pipeline_dir(tmp_path_factory):
    """A micro random-weight pipeline (both layouts), for training tests. Smaller than the tiny one
    to keep the train step's compile time down (its gradient is most of it): the UNet has two levels
    without attention and cross-attention only in its mid block; CLIP has one layer."""
    import reference as R
    from sdjax import AutoencoderKL, CLIPTextModel, UNet2DConditionModel
    from sdjax.text import load_tokenizer
    from sdjax.weights import save_pipeline

    root = tmp_path_factory.mktemp("train_pipeline")
    unet_config = dict(R.TINY_UNET, block_out_channels=(32, 32), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    files = {kind: R.save_flax_layout(make(config), root / kind, kind=kind)
             for kind, make, config in (("unet", R.torch_unet, unet_config), ("vae", R.torch_vae, R.TINY_VAE),
                                        ("clip", R.torch_clip, dict(R.TINY_CLIP, num_hidden_layers=1)))}
    return save_pipeline(
        root / "micro-sd", text_encoder=CLIPTextModel.from_pretrained(files["clip"].parent),
        unet=UNet2DConditionModel.from_pretrained(files["unet"].parent),
        vae=AutoencoderKL.from_pretrained(files["vae"].parent),
        tokenizer=load_tokenizer(R.write_tiny_tokenizer(root / "tok"), subfolder=None),
        scheduler_config=SD15_SCHEDULER)


@pytest.fixture(scope="module")
def pipe(tiny_pipeline_dir):
    """The tiny pipeline as sdjax loads it (a module's own: tests may change its weights)."""
    from sdjax.pipeline import StableDiffusion
    return StableDiffusion.from_pretrained(tiny_pipeline_dir)


@pytest.fixture(scope="module")
def reference_pipe(tiny_pipeline_dir):
    """The same folder as diffusers' StableDiffusionPipeline, the numerical reference."""
    from diffusers import StableDiffusionPipeline
    ref = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    ref.checkpoint_scheduler_config = dict(ref.scheduler.config)
    return ref
