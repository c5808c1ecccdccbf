"""Fine-tuning (sdjax.training and train.py) on a micro random pipeline at 16x16 pixels.

Checks: 8 devices == 1 device == 2 processes x 4 devices (jax.distributed, with a resume and an
export; slow) for the same global batch (and the batch really is split); resume ==
uninterrupted (losses and parameters, with gradient accumulation and EMA); a SIGKILL during a
checkpoint save resumes from the last complete checkpoint; a NaN loss stops the run without saving
the NaN state (train.py exit 3); the exported ``final/`` loads in sdjax and diffusers, gives the
same images, and holds the EMA weights; train.py's flags, presets, errors and outputs.

Time budget (2 CPU cores): the train step is the expensive part (~40 s to compile even for the
micro models; an Orbax save of its state takes a few seconds too). Every Trainer jits its own step,
so the module-wide ``shared_train_steps`` fixture memoizes ``jit_train_step`` on everything the
compiled program depends on (mesh, graphdefs, step config, optimizer settings): all 8-device runs
below share one program, the 1-device run has its own. Runs use the same settings (``BASE``) on
purpose. The killed process in the SIGKILL test
never trains (it saves checkpoints of its initial state), so it compiles nothing.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import json
import re
import shutil
import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import yaml
from flax import nnx
from safetensors.numpy import load_file
from PIL import Image

from conftest import run_two_processes
from sdjax import parallel
from sdjax.cli_utils import UsageError
from sdjax.training import step as S
from sdjax.training.checkpoint import Checkpointer, checkpoint_steps
from sdjax.training.cli import CONFIG_DIR, load_train_config, parse_args
from sdjax.training.data import DataError, write_captioned_folder
from sdjax.images import umask
from sdjax.training.loop import TrainConfig, Trainer, TrainingDiverged, _record, recorded_settings

ROOT = Path(__file__).resolve().parent.parent
SIZE = 16           # pixels; the micro VAE downsamples by 2 -> 8x8 latents
STEPS = 4           # optimizer updates of the reference run
CAPTIONS = ["the red dog", "the blue cat", "a photo of the cat", "the cat"]
# Global batch 16 = 1 per device x 8 devices x 2 micro-batches (or 8 x 1 device x 2).
BASE = dict(resolution=SIZE, batch_size=1, gradient_accumulation=2, learning_rate=1e-5, ema_decay=0.9,
            sample_every=0, sample_steps=2, validation_prompts=["the red dog"], validation_seeds=[0])


def _load_train_script():
    spec = importlib.util.spec_from_file_location("sdjax_train_script", ROOT / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train_script = _load_train_script()


# ----------------------------------------------------------------------------- fixtures and helpers
@pytest.fixture(scope="module", autouse=True)
def shared_train_steps():
    """Runs with the same settings share one compiled train step (see the module docstring)."""
    real_make, real_jit = S.make_optimizer, S.jit_train_step
    optimizers, steps = {}, {}

    def make_optimizer(learning_rate=1e-5, **kwargs):
        if kwargs.get("schedule", "constant") == "constant":
            kwargs["total_steps"] = None   # unused by a constant schedule: runs of any length share one
        key = (learning_rate, tuple(sorted(kwargs.items())))
        if key not in optimizers:
            optimizers[key] = real_make(learning_rate, **kwargs)
        return optimizers[key]

    def jit_train_step(mesh, *, graphdefs, cfg, optimizer, lr_schedule):
        key = (mesh, graphdefs, cfg, id(optimizer))
        if key not in steps:
            steps[key] = real_jit(mesh, graphdefs=graphdefs, cfg=cfg, optimizer=optimizer, lr_schedule=lr_schedule)
        return steps[key]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(S, "make_optimizer", make_optimizer)
        mp.setattr(S, "jit_train_step", jit_train_step)
        yield steps


@pytest.fixture(scope="module")
def pipeline_dir(micro_pipeline_dir):
    """conftest's micro pipeline: its train step compiles faster than the tiny one's."""
    return micro_pipeline_dir


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [(Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)), CAPTIONS[i % len(CAPTIONS)])
            for i in range(n)]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_captioned_folder(tmp_path_factory.mktemp("train_data") / "data", _images(16))


def config(out, pipeline_dir, data_dir, **overrides) -> TrainConfig:
    return TrainConfig(**{**BASE, "model": str(pipeline_dir), "train_data": str(data_dir),
                          "output_dir": str(out), **overrides})


def flags(**values) -> list[str]:
    """train.py arguments for ``values`` (TrainConfig fields; True/False -> --x / --no-x)."""
    argv = []
    for key, value in values.items():
        flag = "--" + key.replace("_", "-")
        if value is True or value is False:
            argv.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, (list, tuple)):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return argv


def run_train_py(argv) -> tuple[int, str, str]:
    """train.py's main in this process (sharing compiled steps); returns (exit code, stdout, stderr).
    Without the persistent compilation cache unless ``argv`` names one (it would be this process's)."""
    out, err = io.StringIO(), io.StringIO()
    argv = [str(a) for a in argv]
    if "--compilation-cache" not in argv:
        argv += ["--compilation-cache", "none"]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = train_script.main(argv)
        except SystemExit as e:   # argparse errors
            rc = e.code
    return rc, out.getvalue(), err.getvalue()


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def flat(tree) -> dict[str, np.ndarray]:
    """{"a/b/0/kernel": array} for a pytree, whatever its key types (str/int dict keys, attributes)."""
    def name(k):
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                return str(getattr(k, attr))
        return str(k)
    return {"/".join(name(k) for k in path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def max_diff(a, b) -> float:
    a, b = flat(a), flat(b)
    assert a.keys() == b.keys()
    return max(float(np.max(np.abs(a[k].astype(np.float64) - b[k]), initial=0.0)) for k in a)


def saved_state(out, step) -> dict:
    """Checkpoint ``step`` of a run, restored without a target (a dict of arrays); onto one device
    here when it was saved from devices this process does not have (another process count).
    Read-only (``create=False``): a Checkpointer that may create the folder also starts Orbax's
    removal of its temporary folders, on a thread of its own that nothing waits for."""
    checkpoints = Checkpointer(Path(out) / "checkpoints", create=False)
    here = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    try:
        saved = checkpoints.manager.item_metadata(step)["state"]   # the tree, with shapes and dtypes
        onto_here = jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=here), saved.tree)
        restored = checkpoints.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(restore_args=onto_here), data=ocp.args.JsonRestore()))
    finally:
        checkpoints.close()
    return {**restored.state, "data": restored.data}


def complete_steps(out) -> list[int]:
    """The run's complete checkpoints, looked at without changing the folder (see `saved_state`): the
    temporary folder of a save cut short is left for `temporary_checkpoints` to see."""
    return checkpoint_steps(Path(out) / "checkpoints")


def temporary_checkpoints(out) -> list[str]:
    return sorted(p.name for p in (Path(out) / "checkpoints").iterdir() if ".orbax-checkpoint-tmp" in p.name)


def exported_unet(final, **kwargs) -> dict:
    from sdjax import UNet2DConditionModel
    unet = UNet2DConditionModel.from_pretrained(final, subfolder="unet", **kwargs)
    return nnx.to_pure_dict(nnx.state(unet, nnx.Param))


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, pipeline_dir, data_dir):
    """STEPS updates on all 8 devices (batch 1 per device, accumulation 2, EMA), uninterrupted.
    Also the starting weights, the next batch and the compiled step (to check the split)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    trainer = Trainer.create(config(out, pipeline_dir, data_dir, max_steps=STEPS, checkpoint_every=100))
    try:
        assert trainer.mesh.size == 8
        assert trainer.data.micro_batches == 2     # each process takes its columns of every micro-batch
        initial = jax.tree.map(lambda a: np.array(a, copy=True), trainer.state.params["unet"])  # (donated later)
        same = lambda a, b: all(x is y for x, y in zip(jax.tree.leaves(a, is_leaf=_is_array),   # noqa: E731
                                                        jax.tree.leaves(b, is_leaf=_is_array), strict=True))
        pipe_unet = lambda: nnx.to_pure_dict(nnx.state(trainer.pipe.unet, nnx.Param))      # noqa: E731
        # One copy of the weights on the devices: the pipeline's arrays are the state's and frozen's.
        shared_before = same(pipe_unet(), trainer.state.params["unet"]) and same(trainer.pipe.state.vae,
                                                                                 trainer.frozen.vae)
        trainer.run(progress=False)
        assert trainer.step_fn._cache_size() == 1   # one compile for every step
        # After the run the pipeline holds the trained (EMA) weights, gathered whole from the devices
        # the EMA is split over, not the donated arrays.
        shared_after = not any(a.is_deleted() for a in jax.tree.leaves(trainer.pipe.state)) and all(
            np.array_equal(a, b) for a, b in zip(jax.tree.leaves(pipe_unet()), jax.tree.leaves(trainer.state.ema)))
        # ZeRO stage 1: each device holds 1/8 of the optimizer's moments and the EMA, all of the weights.
        per_device = lambda tree: sum(int(np.prod(a.sharding.shard_shape(a.shape))) * a.dtype.itemsize  # noqa: E731
                                      for a in jax.tree.leaves(tree))
        total = lambda tree: sum(a.nbytes for a in jax.tree.leaves(tree))  # noqa: E731
        split_fraction = (per_device((trainer.state.opt_state, trainer.state.ema))
                          / total((trainer.state.opt_state, trainer.state.ema)))
        whole_params = per_device(trainer.state.params) == total(trainer.state.params)
        state = jax.device_get(trainer.state)
        batch = trainer.next_batch()
        hlo = trainer.step_fn.lower(trainer.state, trainer.frozen, batch).compile().as_text()
    finally:
        trainer.close()
    return dict(out=out, state=state, initial=initial, rows=metrics(out), batch=batch, hlo=hlo,
                shared_before=shared_before, shared_after=shared_after, split_fraction=split_fraction,
                whole_params=whole_params)


def _pure(module) -> dict:
    return nnx.to_pure_dict(nnx.state(module, nnx.Param))


def _is_array(x) -> bool:
    return isinstance(x, jax.Array)


def test_the_pipeline_shares_the_training_weights(reference_run):
    assert reference_run["shared_before"] and reference_run["shared_after"]


def test_the_optimizer_moments_and_ema_are_split_over_the_devices(reference_run):
    """On 8 devices each holds all of the weights and ~1/8 of the moments and EMA (small arrays that
    do not divide by 8 stay whole); the losses and weights equal 1 device's (test above)."""
    assert reference_run["whole_params"]
    assert 1 / 8 <= reference_run["split_fraction"] < 1.2 / 8, reference_run["split_fraction"]


# ----------------------------------------------------------------------------- 1. devices
def test_eight_devices_equal_one_device(reference_run, pipeline_dir, data_dir, tmp_path):
    """Global batch 16: 1 x 8 devices x 2 micro-batches == 8 x 1 device x 2, after STEPS updates;
    and on 8 devices each device really gets 1 image per micro-batch."""
    pixels = reference_run["batch"]["pixel_values"]
    assert pixels.shape == (2, 8, SIZE, SIZE, 3)                      # [accumulation, global batch, ...]
    assert pixels.sharding.shard_shape(pixels.shape) == (2, 1, SIZE, SIZE, 3)
    assert {s.device for s in pixels.addressable_shards} == set(jax.devices())
    hlo = reference_run["hlo"]                                        # the per-device program
    assert f"f32[2,1,{SIZE},{SIZE},3]" in hlo and f"f32[2,8,{SIZE},{SIZE},3]" not in hlo
    # On the CPU the 2 micro-batches are unrolled: in a loop XLA:CPU leaves the kernel gradients in a
    # non-NHWC layout (dim_labels f01b_i01o->01bf) that runs ~26x slower.
    layouts = set(re.findall(r" convolution\(.*?dim_labels=([\w>-]+)", hlo))
    assert layouts and all(label.startswith("b01f_") for label in layouts), layouts

    one = Trainer.create(config(tmp_path / "one", pipeline_dir, data_dir, batch_size=8, max_steps=STEPS,
                                checkpoint_every=100), mesh=parallel.data_mesh(jax.devices()[:1]))
    try:
        one.run(progress=False)
        assert one.step_fn._cache_size() == 1   # the state comes back placed as it went in: one compile
        state = jax.device_get(one.state)
        pixels = one.next_batch()["pixel_values"]
        assert pixels.sharding.shard_shape(pixels.shape) == (2, 8, SIZE, SIZE, 3)   # all on the one device
    finally:
        one.close()

    ref = reference_run["state"]
    assert int(state.step) == int(ref.step) == STEPS
    # Adam moves every weight by ~learning_rate per step; the two runs differ only by rounding.
    assert max_diff(ref.params["unet"], reference_run["initial"]) >= 0.5 * STEPS * 1e-5
    assert max_diff(state.params, ref.params) <= 1e-5
    assert max_diff(state.ema, ref.ema) <= 1e-5
    np.testing.assert_allclose([r["loss"] for r in metrics(tmp_path / "one")],
                               [r["loss"] for r in reference_run["rows"]], rtol=1e-5)


def test_optimizer_update_keeps_no_second_copy_of_the_gradients(pipeline_dir):
    """XLA's scratch memory for one update (1 device, no accumulation, latents cached, 8x8 latents
    so that the gradients dominate): the fp32 UNet gradients, a little more, not two copies. With
    optax.clip_by_global_norm XLA kept a clipped copy of every gradient alive beside the raw one
    (SD v1.5 at 256 px: 6.30 -> 3.45 GiB scratch, BENCHMARKS.md)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import common
    configs = {kind: json.loads((pipeline_dir / folder / "config.json").read_text())
               for kind, folder in (("unet", "unet"), ("clip", "text_encoder"), ("vae", "vae"))}
    r = common.train_step_memory(configs, resolution=SIZE, batch=1, cached_latents=True)
    print(f"scratch {r['temp_bytes']} bytes = {r['temp_bytes'] / r['unet_param_bytes']:.2f} x the UNet's gradients")
    assert r["temp_bytes"] < 1.5 * r["unet_param_bytes"]    # measured 1.22x (optax's clipping: 1.82x)


def test_clip_by_global_norm_matches_optax():
    """The one-factor clipping gives optax's result (above, at and below the threshold, and a zero gradient)."""
    import jax.numpy as jnp
    import optax
    rng = np.random.default_rng(0)
    grads = {"a": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32), "b": [jnp.asarray(rng.normal(size=5), jnp.float32)]}
    norm = float(optax.tree.norm(grads))
    for max_norm in (0.1 * norm, norm, 10 * norm):
        ours, _ = S.clip_by_global_norm(max_norm).update(grads, optax.EmptyState())
        theirs, _ = optax.clip_by_global_norm(max_norm).update(grads, optax.EmptyState())
        assert max_diff(ours, theirs) <= 1e-6 * norm, max_norm
    zeros = jax.tree.map(jnp.zeros_like, grads)
    assert max_diff(S.clip_by_global_norm(1.0).update(zeros, optax.EmptyState())[0], zeros) == 0.0


# ----------------------------------------------------------------------------- 2. resume
class Interrupted(Exception):
    pass


def test_resume_equals_uninterrupted(reference_run, pipeline_dir, data_dir, tmp_path, monkeypatch):
    """Crash after step 3 (last checkpoint: 2), --resume to STEPS == the uninterrupted reference:
    the same loss at every step in metrics.jsonl (step 3 recomputed, not duplicated) and the same
    parameters, EMA and optimizer state. Gradient accumulation 2 and EMA are on. The run is started
    with relative paths and resumed from Python in another working directory with
    ``TrainConfig.from_run``: train_config.json records absolute paths."""
    out = tmp_path / "run"
    monkeypatch.chdir(tmp_path)
    cfg = config("run", os.path.relpath(pipeline_dir), os.path.relpath(data_dir), max_steps=STEPS,
                 checkpoint_every=2)
    real_next_batch = Trainer.next_batch

    def crash_before_step_4(self):
        if int(self.state.step) == 3:
            raise Interrupted
        return real_next_batch(self)

    real_save = Trainer.save_checkpoint

    def slow_save(self):   # images_per_s counts the steps, not the save after step 2
        time.sleep(5.0)
        real_save(self)

    trainer = Trainer.create(cfg)
    try:
        with monkeypatch.context() as mp:
            mp.setattr(Trainer, "next_batch", crash_before_step_4)
            mp.setattr(Trainer, "save_checkpoint", slow_save)
            with pytest.raises(Interrupted):
                trainer.run(progress=False)
    finally:
        trainer.close()
    assert [r["step"] for r in metrics(out)] == [1, 2, 3]
    assert metrics(out)[2]["images_per_s"] > 16 / 5.0   # global batch 16; ~0.3 s a step here
    assert complete_steps(out) == [2]
    record = json.loads((out / "train_config.json").read_text())
    assert (record["model"], record["train_data"], record["output_dir"]) == (str(pipeline_dir), str(data_dir),
                                                                            str(out))

    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    trainer = Trainer.create(TrainConfig.from_run(out))
    try:
        assert int(trainer.state.step) == 2 and trainer.data.step == 2
        # The pipeline shares the restored weights (it kept the loaded ones beside them).
        assert all(a is b for a, b in zip(jax.tree.leaves(nnx.to_pure_dict(nnx.state(trainer.pipe.unet, nnx.Param))),
                                          jax.tree.leaves(trainer.state.params["unet"]), strict=True))
        trainer.run(progress=False)
        state = jax.device_get(trainer.state)
    finally:
        trainer.close()

    ref = reference_run["state"]
    rows, ref_rows = metrics(out), reference_run["rows"]
    assert [r["step"] for r in rows] == [r["step"] for r in ref_rows] == list(range(1, STEPS + 1))
    assert [(r["loss"], r["grad_norm"]) for r in rows] == [(r["loss"], r["grad_norm"]) for r in ref_rows]
    assert int(state.step) == STEPS
    assert max_diff(state.params, ref.params) <= 1e-6
    assert max_diff(state.ema, ref.ema) <= 1e-6
    assert max_diff(state.opt_state, ref.opt_state) <= 1e-6
    assert complete_steps(out) == [2, 4]


def test_from_run_takes_the_recorded_settings_and_a_bare_resume_says_so(tmp_path, capsys):
    """``TrainConfig.from_run(DIR, **overrides)``: the recorded settings under the overrides, with
    resume on. A Python resume that leaves the run's settings out (here its training data) is told
    to use it; a folder with no record, or a record with an unknown key, is named in the error."""
    out = tmp_path / "run"
    out.mkdir()
    recorded = dataclasses.asdict(TrainConfig(model="/models/base", train_data="/data/cats", output_dir="/old",
                                              learning_rate=5e-5, ema_decay=0.999, max_steps=100))
    (out / "train_config.json").write_text(json.dumps(recorded))
    cfg = TrainConfig.from_run(out, max_steps=200)
    assert (cfg.model, cfg.train_data, cfg.output_dir, cfg.resume) == ("/models/base", "/data/cats", str(out), True)
    assert (cfg.learning_rate, cfg.ema_decay, cfg.max_steps) == (5e-5, 0.999, 200)
    with pytest.raises(ValueError, match=re.escape(f"build the config with TrainConfig.from_run({str(out)!r}")):
        Trainer.create(TrainConfig(output_dir=str(out), resume=True))
    with pytest.raises(ValueError, match=re.escape(f"use TrainConfig(**recorded_settings({str(out)!r}), ")):
        TrainConfig.from_run(out, resume=False)   # (was ignored: it trained on in out)
    assert TrainConfig(**recorded_settings(out), output_dir=str(tmp_path / "new")).train_data == "/data/cats"
    with pytest.raises(UsageError, match=re.escape(f"{tmp_path} has no train_config.json")):
        TrainConfig.from_run(tmp_path)
    (out / "train_config.json").write_text(json.dumps({**recorded, "learning_rat": 1}))
    with pytest.raises(UsageError, match=re.escape(f"{out / 'train_config.json'}: unknown key 'learning_rat'")):
        TrainConfig.from_run(out)
    (out / "train_config.json").write_text("[1, 2]")
    with pytest.raises(UsageError, match="must be a JSON object of settings, got list"):
        TrainConfig.from_run(out)


def test_settings_checked_before_a_run(tmp_path, monkeypatch):
    """No validation seed is an error (the final samples would fail after the whole run); ``~`` in
    output_dir is the home folder (it was a folder named ``~``), for train.py's --resume too; YAML's
    bare ``no`` is mixed_precision 'no', other YAML booleans for text and fractions for whole
    numbers are errors naming the file."""
    from sdjax.training.cli import load_train_config
    with pytest.raises(ValueError, match=re.escape("validation_seeds=[] must hold at least one seed "
                                                   "(--validation-seeds)")):
        TrainConfig(train_data="data", validation_seeds=[]).validate()
    # NumPy numbers (a sweep's) are Python's, which train_config.json records (it failed once the model had loaded)
    cfg = TrainConfig(train_data="data", max_steps=np.int64(7), learning_rate=np.float32(0.5),
                      validation_seeds=list(np.arange(2)), ema_decay=np.float64(0.9))
    cfg.validate()
    assert json.loads(json.dumps(_record(cfg)))["max_steps"] == 7 and type(cfg.learning_rate) is float
    assert cfg.validation_seeds == [0, 1] and type(cfg.validation_seeds[0]) is int
    monkeypatch.setenv("HOME", str(tmp_path))
    assert TrainConfig(output_dir="~/run").output_dir == str(tmp_path / "run")
    assert TrainConfig(tfds_data_dir="~/tfds").tfds_data_dir == str(tmp_path / "tfds")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "train_config.json").write_text(json.dumps({"train_data": "data", "max_steps": 7}))
    cfg, args = parse_args(["--output-dir", "~/run", "--resume"])
    assert (cfg.output_dir, cfg.max_steps, args.recorded) == (str(tmp_path / "run"), 7,
                                                              tmp_path / "run" / "train_config.json")
    assert TrainConfig.from_run("~/run").output_dir == str(tmp_path / "run")
    preset = tmp_path / "p.yaml"
    preset.write_text("mixed_precision: no\nmax_steps: 20.0\n")
    assert load_train_config(preset) == {"mixed_precision": "no", "max_steps": 20}
    for text, message in (("caption_key: off\n", "caption_key=False: YAML reads a bare yes/no"),
                          ("max_steps: 2.7\n", "max_steps=2.7 is not a valid int"),
                          ("batch_size: 0.5\n", "batch_size=0.5 is not a valid int"),
                          ):
        preset.write_text(text)
        with pytest.raises(UsageError, match=re.escape(f"{preset}: {message}")):
            load_train_config(preset)
    # null is off for a setting that takes none, and the default for one that does not (it used to be
    # None: center_crop then meant random crops; validation_seeds crashed)
    # validation seeds in sample.py's syntax too, from a preset or the command line
    preset.write_text("validation_seeds: [0-2, 7]\n")
    assert load_train_config(preset) == {"validation_seeds": [0, 1, 2, 7]}
    preset.write_text("validation_seeds: 3,5\n")
    assert load_train_config(preset) == {"validation_seeds": [3, 5]}
    assert parse_args(["--train-data", "d", "--validation-seeds", "0-3", "9"])[0].validation_seeds == [0, 1, 2, 3, 9]
    preset.write_text("validation_seeds: 3-1\n")
    with pytest.raises(UsageError, match=re.escape(f"{preset}: validation_seeds='3-1': bad seed range '3-1'")):
        load_train_config(preset)
    preset.write_text("ema_decay: null\nvalidation_seeds: null\ncenter_crop:\nmodel: ~\n")
    assert load_train_config(preset) == {"ema_decay": None, "validation_seeds": [0], "center_crop": True,
                                         "model": TrainConfig.model}
    assert TrainConfig(model=tmp_path / "m", train_data=tmp_path / "d").model == str(tmp_path / "m")   # a Path
    # From Python: a string for a true/false setting (any string is true) and none where it is no value.
    for change, message in (({"random_flip": "no"}, "random_flip='no' must be true or false (--random-flip)"),
                            ({"model": None}, "model=None must be set"),
                            ({"validation_prompts": ["ok", 3]}, "validation_prompts=['ok', 3] must be a list of "
                                                                "prompts"),
                            ({"lr_power": 0}, "lr_power=0 must be a positive number"),
                            ({"lr_num_cycles": 0}, "lr_num_cycles=0 must be >= 1"),
                            ({"lora_rank": 0}, "lora_rank=0 must be >= 1 (none: train the whole model)"),
                            ({"lora_rank": 2.5}, "lora_rank=2.5 must be a whole number"),
                            ({"lora_alpha": 8}, "lora_alpha=8 is a LoRA setting: it needs --lora-rank (--lora-alpha)"),
                            ({"lora_rank": 4, "lora_alpha": 0}, "lora_alpha=0 must be a positive number"),
                            ({"lora_rank": 4, "export_single_file": "float16"},
                             "export_single_file='float16' is for whole-model runs: a LoRA run exports a LoRA file"),
                            ({"lr_schedule": "polynomial", "learning_rate": 1e-8},
                             "learning_rate=1e-08 must be above 1e-07, where the polynomial schedule ends")):
        with pytest.raises(ValueError, match=re.escape(message)):
            TrainConfig(train_data="data", **change).validate()
    from sdjax.models import layers
    monkeypatch.setattr(layers, "ATTENTION_IMPLEMENTATION", "flash")   # SDJAX_ATTENTION=flash: before any loading
    with pytest.raises(ValueError, match="SDJAX_ATTENTION='flash': expected auto, xla, cudnn or blocked"):
        TrainConfig(train_data="data").validate()


def test_processes_that_loaded_other_data_stop_together(monkeypatch, tmp_path):
    """Every process loads the data itself: one exchange makes all of them stop, naming the
    processes that could not load it or that loaded other rows (simulated here: the exchange
    returns what two processes would send)."""
    from sdjax.training import loop
    dataset = loop.load_captioned_images(write_captioned_folder(tmp_path / "d", _images(3)))
    sent = {}

    def exchange(rows):
        def gather(values):
            sent["mine"] = np.asarray(values)
            return np.stack([np.asarray(values), *rows])
        monkeypatch.setattr(parallel, "gather_from_processes", gather)

    np.testing.assert_array_equal(parallel.gather_from_processes(np.array([1, 2])), [[1, 2]])  # one process
    exchange([])
    loop._check_processes_loaded_the_same_data(dataset, None, "data")
    same = sent["mine"]
    exchange([same])
    loop._check_processes_loaded_the_same_data(dataset, None, "data")
    exchange([np.array([1, 2, *same[2:]])])
    with pytest.raises(DataError, match=r"data: the processes loaded different training data \(process 0: 3 rows, "
                                        r"process 1: 2 rows; processes 1 differ"):
        loop._check_processes_loaded_the_same_data(dataset, None, "data")
    exchange([np.array([1, 3, same[2] + 1, same[3]])])
    with pytest.raises(DataError, match="processes 1 differ from process 0 in their rows or captions"):
        loop._check_processes_loaded_the_same_data(dataset, None, "data")
    exchange([np.array([0, 0, 0, 0])])
    with pytest.raises(DataError, match="data: processes 1 could not load the training data"):
        loop._check_processes_loaded_the_same_data(dataset, None, "data")
    exchange([same])                   # this process failed: it raises its own error, after the exchange
    with pytest.raises(DataError, match="missing file"):
        loop._check_processes_loaded_the_same_data(None, DataError("missing file"), "data")
    assert sent["mine"][0] == 0


SHARED_DIR_WORKER = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    from sdjax import parallel
    from sdjax.cli_utils import UsageError
    from sdjax.training import loop
    from sdjax.training.data import DataError
    me = int(sys.argv[2])
    parallel.initialize_distributed(coordinator_address=sys.argv[1], num_processes=2, process_id=me)
    results = []
    for folders, create in json.loads(sys.argv[3]):
        try:
            loop._check_processes_share_the_output_dir(Path(folders[me]), create=create)
            results.append("ok")
        except UsageError as e:
            results.append(str(e))
    print("RESULTS " + json.dumps(results))
    results = []
    for folders in json.loads(sys.argv[4]):   # the training data each process loads
        try:
            dataset, error = loop.load_captioned_images(folders[me]), None
        except DataError as e:
            dataset, error = None, e
        try:
            loop._check_processes_loaded_the_same_data(dataset, error, "data")
            results.append("ok")
        except DataError as e:
            results.append(str(e))
    print("DATA " + json.dumps(results))
    # Weights split over the two processes' devices (the EMA, the optimizer state), made whole on
    # every device: one compiled program for the whole tree, and none the second time.
    import logging
    import numpy as np
    compiles = []
    handler = logging.Handler()
    handler.emit = lambda record: compiles.append(record.getMessage().startswith("Compiling"))
    logging.getLogger("jax").addHandler(handler)
    mesh = parallel.data_mesh()
    tree = {f"w{i}": np.arange(8 * (i + 1), dtype=np.float32).reshape(8, i + 1) for i in range(6)}
    split = parallel.make_spread(lambda t: t, tree, mesh=mesh)
    counts = []
    for _ in range(2):
        with jax.log_compiles(True):
            whole = parallel.replicate(split, mesh)
        counts.append(sum(compiles))
        compiles.clear()
    same = all(np.array_equal(np.asarray(whole[k].addressable_data(0)), tree[k]) for k in tree)
    print("REPLICATE " + json.dumps([counts, same]))
""")


def test_processes_that_see_other_output_folders_or_data_stop_together(tmp_path):
    """Two real processes (jax.distributed on 127.0.0.1): a folder both see passes and is left as
    it was; host-local folders (simulated: each process is given its own) stop both with the same
    error; an export's folder missing on one host is named, missing on every host is left to the
    export's own "no checkpoint" error. In the same launch, the training-data exchange for real:
    copies of the same rows at other paths pass; another row count, or data one process cannot
    load, stops both."""
    shared, (local0, local1) = tmp_path / "shared" / "run", (tmp_path / "host0", tmp_path / "host1")
    cases = [([str(shared)] * 2, True), ([str(local0), str(local1)], True),
             ([str(shared), str(tmp_path / "absent")], False), ([str(tmp_path / "absent")] * 2, False)]
    same, copy, fewer = (write_captioned_folder(tmp_path / name, _images(n)) for name, n in
                         (("data", 3), ("copy", 3), ("fewer", 2)))
    data_cases = [[str(same), str(copy)], [str(same), str(fewer)], [str(same), str(tmp_path / "no-data")]]
    logs = run_two_processes(SHARED_DIR_WORKER, tmp_path, json.dumps(cases), json.dumps(data_cases), timeout=300)
    results = [json.loads(log.split("RESULTS ")[1].splitlines()[0]) for log in logs]
    data = [json.loads(log.split("DATA ")[1].splitlines()[0]) for log in logs]
    for log in logs:   # one program for six split weights, none the second time (it was a program per weight)
        assert json.loads(log.split("REPLICATE ")[1].splitlines()[0]) == [[1, 0], True], log
    for me, (copied, other_rows, missing) in enumerate(data):
        assert copied == "ok"
        assert other_rows.startswith("data: the processes loaded different training data (process 0: 3 rows, "
                                     "process 1: 2 rows; processes 1 differ from process 0")
        assert missing.startswith("data: processes 1 could not load the training data" if me == 0 else
                                  f"training data folder not found: {tmp_path / 'no-data'} ")
    for me, (ok, local, one_missing, all_missing) in enumerate(results):
        assert ok == "ok" and all_missing == "ok"
        assert local == (f"--output-dir {(local0, local1)[me]}: processes 0, 1 of 2 do not see the files the "
                         "others write there; a multi-host run needs an output folder every host shares (NFS, "
                         "or a bucket mounted with gcsfuse)")
        assert one_missing.startswith(f"--output-dir {cases[2][0][me]}: processes 1 cannot write there (is the "
                                      "folder missing on their hosts?)")
    assert list(shared.iterdir()) == [] and list(local0.iterdir()) == [] and list(local1.iterdir()) == []
    assert not (tmp_path / "absent").exists()


MULTIHOST_TRAIN_WORKER = textwrap.dedent("""
    import json, os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    me = int(sys.argv[2])
    # The resume compiles the step again: a per-process cache turns that into a load.
    jax.config.update("jax_compilation_cache_dir", f"{sys.argv[4]}-{me}")
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    from sdjax import parallel
    from sdjax.training.loop import TrainConfig, Trainer, train
    parallel.initialize_distributed(coordinator_address=sys.argv[1], num_processes=2, process_id=me)
    first, then = json.loads(sys.argv[3])
    trainer = Trainer.create(TrainConfig(**first))
    try:
        assert trainer.mesh.size == 8 and len(trainer.mesh.local_devices) == 4
        trainer.run(progress=False)
    finally:
        trainer.close()
    print("EXPORTED", train(TrainConfig(**then), progress=False))
""")


@pytest.mark.slow   # ~100 s alone, ~170 s beside another xdist worker: the two processes compile the step
def test_two_processes_train_resume_and_export_as_one(reference_run, pipeline_dir, data_dir, tmp_path):
    """2 processes x 4 CPU devices (jax.distributed on 127.0.0.1, gloo): 2 steps, then a resume to
    STEPS with `train` (samples, export) == the one-process 8-device reference run: the same
    losses, weights and EMA. Each process loads its columns of every batch, both write their part
    of every Orbax checkpoint, and only process 0 writes the log, samples and final/."""
    out = tmp_path / "run"
    first = dataclasses.asdict(config(out, pipeline_dir, data_dir, max_steps=2, checkpoint_every=2))
    then = {**first, "max_steps": STEPS, "resume": True}
    logs = run_two_processes(MULTIHOST_TRAIN_WORKER, tmp_path, json.dumps([first, then]), tmp_path / "jax-cache",
                             timeout=900)
    assert f"EXPORTED {out / 'final'}" in logs[0] and "EXPORTED None" in logs[1]

    assert complete_steps(out) == [2, STEPS]
    np.testing.assert_allclose([r["loss"] for r in metrics(out)], [r["loss"] for r in reference_run["rows"]],
                               rtol=1e-5)
    last, ref = saved_state(out, STEPS), reference_run["state"]
    assert int(last["step"]) == STEPS
    assert max_diff(last["params"], ref.params) <= 1e-5
    assert max_diff(last["ema"], ref.ema) <= 1e-5
    assert max_diff(exported_unet(out / "final"), last["ema"]["unet"]) <= 1e-7
    assert sorted(p.name for p in (out / "samples").glob("*.png")) == [f"step-{STEPS:06d}.png"]
    assert not list(out.glob(".sdjax-host-check-*"))


PREEMPTED_WORKER = textwrap.dedent("""
    import json, os, signal, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    me = int(sys.argv[2])
    from sdjax import parallel
    from sdjax.training.loop import Stopped, TrainConfig, Trainer
    parallel.initialize_distributed(coordinator_address=sys.argv[1], num_processes=2, process_id=me)
    real_next_batch = Trainer.next_batch
    notice_at = None   # the step before which process 1 gets SIGTERM ("load": while loading)

    def notice(self):
        if me == 1 and notice_at == int(self.state.step) + 1:
            os.kill(os.getpid(), signal.SIGTERM)   # the notice reaches one host: JAX's service takes it
        return real_next_batch(self)
    Trainer.next_batch = notice
    for phase, (cfg, at) in enumerate(json.loads(sys.argv[3])):
        notice_at = at
        if me == 1 and at == "load":
            os.kill(os.getpid(), signal.SIGTERM)
        trainer = Trainer.create(TrainConfig(**cfg))
        try:
            trainer.run(progress=False)
            print(f"PHASE {phase} DONE", flush=True)
        except Stopped as e:
            print(f"PHASE {phase} STOPPED {e.step}", flush=True)
        finally:
            trainer.close()
""")


@pytest.mark.slow   # two processes compile the step (twice), ~150 s
@pytest.mark.parametrize("notice", ["load", 5])
def test_a_preemption_notice_to_one_process_stops_every_process_at_one_saved_step(notice, pipeline_dir, data_dir,
                                                                                  tmp_path):
    """SIGTERM to one of two processes of a resumed run: JAX's preemption service makes both stop
    at the same step, after both wrote their part of a checkpoint of it (not one process stopping
    alone, the other waiting for it in the next collective). A notice while the run loads stops it
    after its first step, 3 (the check counts calls, not the resumed step numbers, which never
    meet the service's sync point there); one mid-run, a few steps on. (One notice per process:
    JAX's service acts on the first.)"""
    out = tmp_path / "run"
    first = dataclasses.asdict(config(out, pipeline_dir, data_dir, max_steps=2, checkpoint_every=2))
    then = {**first, "max_steps": 40, "checkpoint_every": 100, "resume": True}
    logs = run_two_processes(PREEMPTED_WORKER, tmp_path, json.dumps([(first, None), (then, notice)]), timeout=900)
    phases = [dict(re.findall(r"^PHASE (\d) (DONE|STOPPED \d+)$", log, re.M)) for log in logs]
    assert phases[0] == phases[1] and phases[0]["0"] == "DONE", logs
    stopped = int(phases[0]["1"].split()[1])
    assert stopped == 3 if notice == "load" else 5 <= stopped < 40
    assert complete_steps(out) == [2, stopped] and temporary_checkpoints(out) == []


def test_tensorboard_matches_the_metrics_log(tmp_path):
    """A resumed log tells TensorBoard to drop the points after the checkpoint (as metrics.jsonl
    is truncated), and a fresh run removes an earlier run's event files."""
    import struct
    from tensorboardX.proto import event_pb2
    from sdjax.training.monitor import MetricsLog

    def events(path):
        data, out = path.read_bytes(), []
        while data:   # TFRecord framing: length, its CRC, the record, its CRC
            (n,) = struct.unpack("<Q", data[:8])
            event = event_pb2.Event()
            event.ParseFromString(data[12:12 + n])
            out.append(event)
            data = data[16 + n:]
        return out
    def all_events():
        return [e for f in sorted((tmp_path / "tensorboard").glob("events.out.tfevents.*")) for e in events(f)]
    log = MetricsLog(tmp_path)
    for step in (1, 2, 3):
        log.record(step, {"loss": 0.5})
    log.close()
    assert [e.step for e in all_events() if e.HasField("summary")] == [1, 2, 3]
    MetricsLog(tmp_path, resume_from_step=2).close()
    assert [(e.step, e.session_log.status) for e in all_events() if e.HasField("session_log")] == \
        [(3, event_pb2.SessionLog.START)]   # TensorBoard drops what an earlier file has from step 3 on
    MetricsLog(tmp_path).close()       # a fresh run in the folder
    assert not [e for e in all_events() if e.HasField("summary") or e.HasField("session_log")]


def test_resume_truncates_a_metrics_log_with_a_torn_last_line(tmp_path):
    """A run killed while writing metrics.jsonl leaves a torn last line: the resume's truncation
    (to the checkpoint's step) skips it instead of failing on it, and keeps the good lines as they were."""
    from sdjax.training.monitor import MetricsLog
    good = [json.dumps({"step": s, "loss": 0.5 / s, "lr": 1e-5}) for s in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(good) + '\n{"step": 4, "lo')
    log = MetricsLog(tmp_path, resume_from_step=3)
    log.record(4, {"loss": 0.125})
    log.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert lines[:3] == good and json.loads(lines[3]) == {"step": 4, "loss": 0.125}
    assert not list(tmp_path.glob("*.tmp"))


def test_a_full_disk_under_the_metrics_log_is_an_error_naming_its_file(tmp_path, monkeypatch):
    """Python's OSError 28 from a write names no file; the metrics log's and TensorBoard's writes
    raise one that does."""
    import errno
    import tensorboardX.record_writer
    from sdjax.training.monitor import MetricsLog
    log = MetricsLog(tmp_path)
    real_open = Path.open

    def full_disk_open(self, mode="r", *args, **kwargs):
        f = real_open(self, mode, *args, **kwargs)
        if self.name == "metrics.jsonl" and "a" in mode:
            f.write = lambda text: (_ for _ in ()).throw(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
        return f
    monkeypatch.setattr(Path, "open", full_disk_open)
    with pytest.raises(OSError, match=re.escape(f"No space left on device (writing {tmp_path / 'metrics.jsonl'})")):
        log.record(1, {"loss": 0.5})
    monkeypatch.undo()

    def full_disk_flush(self):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(tensorboardX.record_writer.RecordWriter, "flush", full_disk_flush)
    with pytest.raises(OSError, match=r"No space left on device \(writing .*events\.out\.tfevents") as info:
        log.writer.flush()
    assert info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    log.close()


def test_spike_check_after_a_resume_remembers_the_losses_before_it(tmp_path):
    """A resumed run reports a spike at its first step, as the run without the stop would have."""
    from sdjax.training.monitor import MetricsLog
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 0.5}) + "\n" for s in range(1, 21)))
    log = MetricsLog(tmp_path, resume_from_step=20, spike_factor=3.0)
    assert log.record(21, {"loss": 2.0}) and not log.record(22, {"loss": 0.6})
    log.close()


def test_the_loss_curve_leaves_the_callers_matplotlib_backend_alone(tmp_path):
    """Trainer.run ends with plot_loss; in a notebook it used to switch pyplot to Agg for good."""
    import matplotlib
    from sdjax.training.monitor import MetricsLog
    before = matplotlib.get_backend()
    matplotlib.use("svg")   # a caller's own (non-interactive, so it works here) backend
    try:
        log = MetricsLog(tmp_path)
        for step in range(1, 4):
            log.record(step, {"loss": 1.0 / step})
        assert Image.open(log.plot_loss()).format == "PNG"
        log.close()
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(before)


def test_metrics_log_is_strict_json_with_a_nan_loss(tmp_path):
    """A NaN loss or an infinite gradient norm is written as null (Python's NaN / Infinity literals
    are not JSON, and other parsers reject them), also when a resume rewrites an older log that has
    them; the loss curve leaves such a row out."""
    from sdjax.training.monitor import MetricsLog

    def strict(line):
        return json.loads(line, parse_constant=lambda name: pytest.fail(f"non-JSON literal {name} in {line!r}"))
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": NaN}\n')
    log = MetricsLog(tmp_path, resume_from_step=2)
    for step, loss in ((3, 0.25), (4, float("nan")), (5, 0.125)):
        log.record(step, {"loss": loss, "grad_norm": float("inf") if step == 4 else 1.0})
    assert log.plot_loss().is_file()
    log.close()
    rows = [strict(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 0.5), (2, None), (3, 0.25), (4, None), (5, 0.125)]
    assert rows[3]["grad_norm"] is None and rows[4]["grad_norm"] == 1.0


def test_a_checkpoint_of_replicated_weights_saves_without_compiling(tmp_path):
    """Orbax's replica-parallel save compiled a slicing program per weight shape and device at the
    first save (256 for the tiny model on 8 devices: 11 s); sdjax saves each from its first copy.
    The restore gives the arrays back with their placement."""
    import logging
    mesh = parallel.data_mesh()
    state = {"w": parallel.replicate({f"w{i}": np.full((8 * (i + 1), 3), i, np.float32) for i in range(4)}, mesh),
             "moments": parallel.make_spread(lambda: {"m": jax.numpy.ones((16, 2))}, mesh=mesh)}
    compiles = []
    handler = logging.Handler()
    handler.emit = lambda record: compiles.append(record.getMessage())
    logging.getLogger("jax").addHandler(handler)
    checkpoints = Checkpointer(tmp_path / "checkpoints")
    try:
        with jax.log_compiles(True):
            checkpoints.save(1, state, {"epoch": 0})
            checkpoints.wait()
        restored, position = checkpoints.restore(state)
    finally:
        logging.getLogger("jax").removeHandler(handler)
        checkpoints.close()
    assert not [m for m in compiles if m.startswith("Compiling")], compiles
    assert position == {"epoch": 0} and max_diff(restored, state) == 0.0
    assert jax.tree.map(lambda a: a.sharding, restored) == jax.tree.map(lambda a: a.sharding, state)


def test_fresh_run_in_a_folder_with_checkpoints_is_refused(tmp_path):
    """A fresh run (no --resume) where checkpoints exist would save none of its own (Orbax skips a
    step not above the newest one on disk) while deleting metrics.jsonl and rewriting
    train_config.json, and a later --resume/--export would take the old run's weights: it is
    refused before anything in the folder is touched. And a save Orbax skips is an error."""
    out = tmp_path / "run"
    checkpoints = Checkpointer(out / "checkpoints")
    try:
        checkpoints.save(3, {"w": np.zeros(2, np.float32)}, {"step": 3})
        checkpoints.wait()
        with pytest.raises(RuntimeError, match=r"checkpoint 2 was not saved: .* up to step 3"):
            checkpoints.save(2, {"w": np.ones(2, np.float32)}, {"step": 2})
    finally:
        checkpoints.close()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n')
    (out / "train_config.json").write_text('{"seed": 7}\n')
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    cfg = TrainConfig(model=str(tmp_path / "model"), train_data=str(tmp_path / "data"), output_dir=str(out))
    with pytest.raises(UsageError, match=re.escape(f"{out / 'checkpoints'} has checkpoints up to step 3: pass "
                                                   f"--resume to continue that run (from Python, TrainConfig.from_run("
                                                   f"{str(out)!r}, ...)), or choose another --output-dir")):
        Trainer.create(cfg)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "metrics.jsonl", "train_config.json"]
    assert complete_steps(out) == [3]


def test_a_failure_late_in_create_closes_the_loader_and_orbax(pipeline_dir, data_dir, tmp_path, monkeypatch):
    """Trainer.create failing after its loader threads and Orbax's manager exist (here in the
    latent cache's encoding) closes them; train() never gets the trainer to close."""
    from sdjax.training import loop
    closed = []
    for cls in (loop.Checkpointer, loop.BatchIterator, loop.MetricsLog):
        monkeypatch.setattr(cls, "close", lambda self, real=cls.close: (closed.append(type(self).__name__),
                                                                         real(self))[1])

    def out_of_memory(self):
        raise MemoryError("encoding the dataset")
    monkeypatch.setattr(loop.Trainer, "encode_dataset", out_of_memory)
    with pytest.raises(MemoryError):
        Trainer.create(config(tmp_path / "out", pipeline_dir, data_dir, max_steps=1, cache_latents=True))
    assert sorted(closed) == ["BatchIterator", "Checkpointer", "MetricsLog"]


@dataclasses.dataclass
class _FakeState:
    step: int = 0


class _NoCheckpoints:
    directory = Path("checkpoints")

    def latest_step(self):
        return None

    def all_steps(self):
        return []

    def check(self):
        pass

    def wait(self):
        pass

    def close(self):
        pass


def fake_trainer(out, step_fn, monkeypatch, *, batches=None, save=lambda: None, **settings) -> Trainer:
    """A Trainer around ``step_fn`` (state, frozen, batch) -> (state, metrics) and no model: for
    Trainer.run's own bookkeeping. ``batches``: next_batch (default: empty batches)."""
    from sdjax.training.monitor import MetricsLog
    cfg = TrainConfig(train_data="unused", output_dir=str(out), **settings)
    trainer = Trainer(cfg, out, parallel.data_mesh(jax.devices()[:1]), None, None, None, _FakeState(), None,
                      _NoCheckpoints(), None, step_fn, MetricsLog(out))
    monkeypatch.setattr(trainer, "next_batch", batches or (lambda: {}))
    monkeypatch.setattr(trainer, "save_checkpoint", save)
    return trainer


def test_a_closed_trainer_refuses_to_train_or_save_with_an_error_saying_so(tmp_path, monkeypatch):
    """After close (here at the end of a with block) run and save_checkpoint raise a RuntimeError naming
    the close and how to train on, not an AttributeError from the closed metrics log."""
    def step_fn(state, frozen, batch):
        return dataclasses.replace(state, step=state.step + 1), {"loss": 0.5, "grad_norm": 1.0, "lr": 1e-5}
    with fake_trainer(tmp_path, step_fn, monkeypatch, max_steps=2) as trainer:
        trainer.run(progress=False)
    trainer.cfg.max_steps = 4
    for action in (trainer.run, lambda: Trainer.save_checkpoint(trainer)):
        with pytest.raises(RuntimeError, match=r"this Trainer is closed.*TrainConfig\.from_run\("):
            action()
    assert trainer.state.step == 2 and len(metrics(tmp_path)) == 2


class _OnDevice(float):
    """A metric of a step queued on the modelled device: reading it (float()) waits, on the clock,
    until the step has finished."""
    def __new__(cls, value, ready, clock):
        new = super().__new__(cls, value)
        new.ready, new.clock = ready, clock
        return new

    def __float__(self):
        self.clock[0] = max(self.clock[0], self.ready)
        return super().__float__()


def _queued_steps(monkeypatch, seconds: float, *, dispatch_waits: bool = False):
    """(clock, device_free, step_fn): a fake clock for sdjax.training.loop, and a step that is
    dispatched at once (as jax's are; with ``dispatch_waits``, dispatch returns once it has run)
    and takes ``seconds`` of device time after the last one."""
    from sdjax.training import loop
    clock, device_free = [0.0], [0.0]
    monkeypatch.setattr(loop, "time", type("Clock", (), {"perf_counter": staticmethod(lambda: clock[0])}))

    def step_fn(state, frozen, batch):
        device_free[0] = max(clock[0], device_free[0]) + seconds
        if dispatch_waits:
            clock[0] = device_free[0]
        metrics = {k: _OnDevice(v, device_free[0], clock) for k, v in (("loss", 0.5), ("grad_norm", 1.0),
                                                                      ("lr", 1e-5))}
        return dataclasses.replace(state, step=state.step + 1), metrics
    return clock, device_free, step_fn


def test_images_per_s_is_timed_between_finished_steps(tmp_path, monkeypatch):
    """Dispatch is asynchronous: a step is queued at once and its metrics are ready when the
    devices finish it. Modelled here (0.2 s of device time a step, a 1 s checkpoint save after
    step 3, logging every step), every row reads 5 images/s; timed by dispatch, the rows after
    the first step and after the save were off (metrics.jsonl showed 32 images/s, and 1.1 then
    40 images/s after each save, where the steady rate was 2.2)."""
    clock, device_free, step_fn = _queued_steps(monkeypatch, 0.2)

    def slow_save():
        clock[0] = max(clock[0], device_free[0]) + 1.0   # the state is copied off the devices, then written

    trainer = fake_trainer(tmp_path, step_fn, monkeypatch, save=slow_save, max_steps=7, log_every=1,
                           checkpoint_every=3)
    trainer.run(progress=False)
    trainer.log.close()
    assert [r["step"] for r in metrics(tmp_path)] == list(range(1, 8))
    np.testing.assert_allclose([r["images_per_s"] for r in metrics(tmp_path)], [5.0] * 7, rtol=1e-9)


def test_images_per_s_stays_near_the_rate_when_reads_come_late(tmp_path, monkeypatch):
    """Where dispatching a step waits until it has run (a busy host, the CPU), a logged step read
    once the next step is queued is read a step late, and a checkpoint step read at once right
    after it: that interval was 0 s (metrics.jsonl showed 2266 images/s in a run doing 10).
    Over 20 steps or more, a late read is one step's error: every row but the first (compiled
    on the real clock) within 1/20 of the 5 images/s here."""
    _, _, step_fn = _queued_steps(monkeypatch, 0.2, dispatch_waits=True)
    trainer = fake_trainer(tmp_path, step_fn, monkeypatch, max_steps=60, log_every=1, checkpoint_every=4)
    trainer.run(progress=False)
    trainer.log.close()
    rates = [r["images_per_s"] for r in metrics(tmp_path)]
    assert len(rates) == 60 and np.isfinite(rates).all()
    np.testing.assert_allclose(rates[21:], 5.0, rtol=1 / 19)


def test_images_per_s_counts_the_steps_since_the_last_log(tmp_path, monkeypatch):
    """images/s at each logged step is the images since the previous log over the time since then,
    also at a last step that is not a multiple of log_every (25 steps of 0.2 s, logging every 10:
    5 images/s at steps 10, 20 and 25; dividing the last 5 steps' time by 10 steps said 10)."""
    _, _, step_fn = _queued_steps(monkeypatch, 0.2)
    trainer = fake_trainer(tmp_path, step_fn, monkeypatch, max_steps=25, log_every=10, checkpoint_every=1000)
    trainer.run(progress=False)
    trainer.log.close()
    assert [r["step"] for r in metrics(tmp_path)] == [10, 20, 25]
    np.testing.assert_allclose([r["images_per_s"] for r in metrics(tmp_path)], [5.0, 5.0, 5.0], rtol=1e-9)


def test_metrics_are_read_once_the_next_step_is_queued(tmp_path, monkeypatch):
    """The host reads a logged step's metrics (a device sync) after queueing the next step, so the
    devices do not wait for logging and batch assembly; at a checkpoint step it reads them before
    the save (a NaN must not be saved). A Ctrl-C still logs the last step that ran; a NaN found
    when the next step is queued stops the run, its row logged once."""
    events, nan_at = [], [None]

    class Value:   # a metric whose reading on the host is recorded
        def __init__(self, step):
            self.step = step

        def __float__(self):
            events.append(("read", self.step))
            return float("nan") if self.step == nan_at[0] else 0.5

    def fake_step(state, frozen, batch):
        events.append(("step", state.step + 1))
        return dataclasses.replace(state, step=state.step + 1), {k: Value(state.step + 1)
                                                                for k in ("loss", "grad_norm", "lr")}

    trainer = fake_trainer(tmp_path / "a", fake_step, monkeypatch, max_steps=5, log_every=1, checkpoint_every=3,
                           save=lambda: events.append(("save", trainer.state.step)))
    trainer.run(progress=False)
    order = [e for i, e in enumerate(events) if e != events[i - 1] or i == 0]   # one "read" per step
    assert order == [("step", 1), ("step", 2), ("read", 1), ("step", 3), ("read", 2), ("read", 3), ("save", 3),
                     ("step", 4), ("step", 5), ("read", 4), ("read", 5), ("save", 5)]

    batches = iter([{}, {}])

    def two_batches():
        try:
            return next(batches)
        except StopIteration:
            raise KeyboardInterrupt from None
    interrupted = fake_trainer(tmp_path / "b", fake_step, monkeypatch, batches=two_batches, max_steps=10)
    with pytest.raises(KeyboardInterrupt):
        interrupted.run(progress=False)
    interrupted.log.close()
    assert [r["step"] for r in metrics(tmp_path / "b")] == [1, 2]

    nan_at[0] = 2
    diverged = fake_trainer(tmp_path / "c", fake_step, monkeypatch, max_steps=5, log_every=1)
    with pytest.raises(TrainingDiverged, match="loss is nan at step 2"):
        diverged.run(progress=False)
    diverged.log.close()
    assert [r["step"] for r in metrics(tmp_path / "c")] == [1, 2]


# ----------------------------------------------------------------------------- 3. SIGKILL
KILLED_RUN = textwrap.dedent("""
    # A training run's checkpointing, without the (slow to compile) train step: bump the step,
    # advance the data, save every step. With block_at > 0, the save of that step stops just
    # before Orbax commits it (all files written, the rename pending); the next save then waits
    # for it, so the process hangs there until it is killed.
    import asyncio, json, sys
    from orbax.checkpoint._src.path import atomicity
    from sdjax.training.loop import TrainConfig, Trainer

    cfg, block_at = TrainConfig(**json.loads(sys.argv[1])), int(sys.argv[2])
    real_finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def finalize(self):
        if self.get_final().name == str(block_at):
            print("FINALIZING", block_at, flush=True)
            await asyncio.sleep(3600)
        return await real_finalize(self)

    atomicity.AtomicRenameTemporaryPath.finalize = finalize
    trainer = Trainer.create(cfg)
    print("READY", flush=True)
    for step in range(1, 1000):
        next(trainer.data)
        trainer.state = trainer.state._replace(step=trainer.state.step + 1)
        trainer.save_checkpoint()
        if step != block_at:
            trainer.checkpoints.wait()
            print("SAVED", step, flush=True)
    """)


def _start_killable_run(script, cfg, block_at):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, str(script), json.dumps(dataclasses.asdict(cfg)), str(block_at)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    seen = []

    def wait_for(prefix, timeout=180):
        while True:
            try:
                line = lines.get(timeout=timeout)
            except queue.Empty:
                proc.kill()
                pytest.fail(f"no {prefix!r} line from the training process; output:\n{''.join(seen)}")
            seen.append(line)
            if line.startswith(prefix):
                return line
    return proc, wait_for


def test_sigkill_during_save_resumes_from_last_complete_checkpoint(pipeline_dir, data_dir, tmp_path):
    """kill -9 while checkpoint 2 is being committed (every file written, the rename pending: the
    state that looks most complete): checkpoint 1 is the last complete one and the partial 2 is
    ignored; --resume continues from 1 and finishes at 2, re-saving 2 (the partial one is replaced).
    A kill earlier in the save leaves the same kind of temporary folder, handled the same way."""
    script = tmp_path / "killed_run.py"
    script.write_text(KILLED_RUN)
    out = tmp_path / "run"
    cfg = config(out, pipeline_dir, data_dir, max_steps=2, checkpoint_every=1)

    proc, wait_for = _start_killable_run(script, cfg, block_at=2)
    try:
        wait_for("FINALIZING")
        assert temporary_checkpoints(out) == ["2.orbax-checkpoint-tmp"]   # the save in flight
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(60)
    assert proc.returncode == -signal.SIGKILL
    assert complete_steps(out) == [1]
    assert temporary_checkpoints(out) == ["2.orbax-checkpoint-tmp"]

    trainer = Trainer.create(dataclasses.replace(cfg, resume=True))
    try:
        assert int(trainer.state.step) == 1 and trainer.data.step == 1
        trainer.run(progress=False)
        assert int(trainer.state.step) == 2
    finally:
        trainer.close()
    assert complete_steps(out) == [1, 2]
    assert temporary_checkpoints(out) == []
    assert saved_state(out, 2)["data"]["step"] == 2
    assert [r["step"] for r in metrics(out)] == [2]
    assert all(np.isfinite(r["loss"]) for r in metrics(out))


# ----------------------------------------------------------------------------- 4. NaN
def test_nan_loss_stops_without_saving_the_nan_state(pipeline_dir, data_dir, tmp_path, monkeypatch):
    """A NaN batch at step 3 (logging every 5 steps, checkpoints every 2): train.py stops at the
    next check, before checkpoint 4 could store NaN weights, exits 3 naming checkpoint 2 (the only
    one, not vouched for by a later finite loss), and every checkpoint on disk is finite."""
    out = tmp_path / "run"
    real_next_batch = Trainer.next_batch

    def nan_at_step_3(self):
        batch = real_next_batch(self)
        if int(self.state.step) + 1 == 3:
            nan = np.full(batch["pixel_values"].shape, np.nan, np.float32)
            batch["pixel_values"] = parallel.shard_process_batch(nan, self.mesh, axis=1)
        return batch

    monkeypatch.setattr(Trainer, "next_batch", nan_at_step_3)
    argv = flags(**{**BASE, "model": pipeline_dir, "train_data": data_dir, "output_dir": out, "max_steps": 8,
                    "checkpoint_every": 2, "log_every": 5})
    rc, stdout, stderr = run_train_py(argv)
    assert rc == 3, stderr
    assert "loss is nan at step 4" in stderr
    # the one checkpoint may already hold diverging weights: if a resume from it diverges again, the
    # way out is a new run (not the same advice again)
    assert f"The only checkpoint is {out / 'checkpoints' / '2'} (finite, but its weights may be diverging). Lower " \
           "--learning-rate and --resume; if that diverges again, start a new run with a lower --learning-rate in " \
           "another --output-dir." in stderr
    assert complete_steps(out) == [2] and temporary_checkpoints(out) == []
    for step in complete_steps(out):
        state = saved_state(out, step)
        for name, leaf in flat({k: state[k] for k in ("params", "ema", "opt_state")}).items():
            assert np.isfinite(leaf).all(), (step, name)
    assert not (out / "final").exists()


def test_sigterm_during_training_saves_the_step_in_flight(pipeline_dir, data_dir, tmp_path, monkeypatch):
    """SIGTERM at step 3 (a preempted VM; checkpoints every 5 steps, samples every 3): train.py
    finishes step 3 and its samples, saves a checkpoint of it and exits 143 naming it; --resume
    continues from step 3."""
    out = tmp_path / "run"
    real_next_batch = Trainer.next_batch

    def sigterm_at_step_3(self):
        if int(self.state.step) + 1 == 3:
            os.kill(os.getpid(), signal.SIGTERM)   # the handler only asks the loop to stop
        return real_next_batch(self)

    monkeypatch.setattr(Trainer, "next_batch", sigterm_at_step_3)
    argv = flags(**{**BASE, "model": pipeline_dir, "train_data": data_dir, "output_dir": out, "max_steps": 8,
                    "checkpoint_every": 5, "log_every": 1, "sample_every": 3})
    rc, _, stderr = run_train_py(argv)
    assert rc == 143, stderr
    assert stderr.rstrip().endswith(f"\ntrain.py: terminated (SIGTERM) after saving step 3; the newest complete "
                                    f"checkpoint is step 3: python train.py --output-dir {out} --resume continues "
                                    "from it"), stderr[-2000:]
    assert complete_steps(out) == [3] and temporary_checkpoints(out) == []
    assert [r["step"] for r in metrics(out)] == [1, 2, 3]   # step 3 once (its samples had read its metrics)
    assert not (out / "final").exists()
    monkeypatch.setattr(Trainer, "next_batch", real_next_batch)
    trainer = Trainer.create(dataclasses.replace(config(out, pipeline_dir, data_dir, max_steps=8), resume=True))
    try:
        assert int(trainer.state.step) == 3 and trainer.data.step == 3
    finally:
        trainer.close()


def test_a_ctrl_c_whose_exception_was_swallowed_still_stops_train_py(pipeline_dir, data_dir, tmp_path, monkeypatch):
    """Python drops a KeyboardInterrupt raised inside a garbage-collection callback (JAX has one):
    Ctrl-C was then ignored and the run finished with exit 0. The handler notes it first, and the
    loop stops at the end of the step (exit 130, nothing saved for it)."""
    out = tmp_path / "run"
    real_next_batch = Trainer.next_batch

    def swallowed_ctrl_c_at_step_2(self):
        if int(self.state.step) + 1 == 2:
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(1)   # the handler runs here
            except KeyboardInterrupt:
                pass            # as inside JAX's gc callback
        return real_next_batch(self)

    monkeypatch.setattr(Trainer, "next_batch", swallowed_ctrl_c_at_step_2)
    argv = flags(**{**BASE, "model": pipeline_dir, "train_data": data_dir, "output_dir": out, "max_steps": 4,
                    "checkpoint_every": 1, "log_every": 1})
    rc, _, stderr = run_train_py(argv)
    assert rc == 130, stderr[-2000:]
    assert "train.py: interrupted; the newest complete checkpoint is step" in stderr
    assert max(complete_steps(out)) <= 2 and not (out / "final").exists()


def test_a_full_disk_during_a_background_save_stops_the_run_with_one_line(pipeline_dir, data_dir, tmp_path,
                                                                           monkeypatch):
    """Orbax reports a failed write as a ValueError from its save thread: it surfaced only at the next
    save (500 steps later by default) as several tracebacks. It stops the run at the end of the
    step, one line naming the checkpoint folder and the resume command (exit 1)."""
    from sdjax.training import checkpoint
    out = tmp_path / "run"
    real_save = checkpoint._Manager.save
    saves = []

    def save(self, step, *args, **kwargs):
        saves.append(step)
        return True if len(saves) == 2 else real_save(self, step, *args, **kwargs)   # the second never lands

    def check_for_errors(self):
        if len(saves) == 2:   # the second save's write failed in the background
            raise ValueError("RESOURCE_EXHAUSTED: Error writing \"opt_state/d/0\": No space left on device "
                             "[os_error_code='28']")
    monkeypatch.setattr(checkpoint._Manager, "save", save)
    monkeypatch.setattr(checkpoint._Manager, "check_for_errors", check_for_errors)
    argv = flags(**{**BASE, "model": pipeline_dir, "train_data": data_dir, "output_dir": out, "max_steps": 6,
                    "checkpoint_every": 2, "log_every": 1})
    rc, _, stderr = run_train_py(argv)
    assert rc == 1, stderr[-2000:]
    lines = stderr.strip().splitlines()
    assert not [line for line in lines if "Traceback" in line] and lines[-1].startswith(
        f"train.py: error: saving a checkpoint in {out / 'checkpoints'} failed: RESOURCE_EXHAUSTED: Error writing "
        '"opt_state/d/0": No space left on device'), stderr[-3000:]
    assert lines[-1].endswith(f"the newest complete checkpoint is step 2: python train.py --output-dir {out} "
                              "--resume continues from it")
    assert saves == [2, 4] and [r["step"] for r in metrics(out)] == [1, 2, 3, 4]   # stopped at once


def test_a_disk_that_fills_during_a_save_stops_the_run_with_one_line(pipeline_dir, data_dir, tmp_path,
                                                                     monkeypatch, caplog):
    """The disk fills while a checkpoint is written (another process fills it; on several hosts the
    free-space check is skipped): one array write fails while the others are in flight. Orbax closed
    its event loop under them (an "Event loop is closed" traceback or "exception was never retrieved"
    per array: thousands), and the run's wind-down met the full disk again (the loss curve,
    TensorBoard's flush), whose errors replaced the one naming the folder. Now: one line, exit 1,
    the newest complete checkpoint intact."""
    import asyncio
    import errno
    import logging
    import tensorboardX.record_writer
    from orbax.checkpoint._src.serialization import serialization
    from sdjax.training import checkpoint, monitor
    out = tmp_path / "run"
    real_save, real_write = checkpoint._Manager.save, serialization.async_serialize_from_host
    real_flush, real_atomic_write = tensorboardX.record_writer.RecordWriter.flush, monitor.atomic_write
    saves, writes, late = [], [], []

    def no_space():
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def save(self, step, *args, **kwargs):
        self.wait_until_finished()   # the disk fills after the previous save's writes (on a slow host: late)
        saves.append(step)
        return real_save(self, step, *args, **kwargs)

    async def write_array(*args, **kwargs):   # the second save's: the first write fails, the others after it
        if saves != [2, 4]:
            return await real_write(*args, **kwargs)
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def finish():   # as TensorStore ends a write: from its own thread, calling the loop, closed or not
            try:
                loop.call_soon_threadsafe(done.set_exception, no_space())
            except RuntimeError as e:   # "Event loop is closed": TensorStore prints a traceback per write
                late.append(e)
        writes.append(threading.Timer(0.0 if not writes else 0.05, finish))
        writes[-1].start()
        await done

    def flush(self):   # TensorBoard's
        if writes:
            raise no_space()
        real_flush(self)

    def atomic_write(path, write):   # the loss curve's
        if writes:
            raise no_space()
        return real_atomic_write(path, write)
    monkeypatch.setattr(checkpoint._Manager, "save", save)
    monkeypatch.setattr(serialization, "async_serialize_from_host", write_array)
    monkeypatch.setattr(tensorboardX.record_writer.RecordWriter, "flush", flush)
    monkeypatch.setattr(monitor, "atomic_write", atomic_write)
    monkeypatch.setattr(checkpoint.Checkpointer, "_check_free_space", lambda self, state: None)   # as on 2 hosts
    argv = flags(**{**BASE, "model": pipeline_dir, "train_data": data_dir, "output_dir": out, "max_steps": 4,
                    "checkpoint_every": 2, "log_every": 1})
    with caplog.at_level(logging.WARNING):
        rc, _, stderr = run_train_py(argv)
    said = [line for line in stderr.replace("\r", "\n").splitlines()
            if line.strip() and not line.startswith("training:") and "Waiting for previous save" not in line]
    assert rc == 1 and saves == [2, 4] and len(writes) > 1, stderr[-3000:]
    assert said == [f"train.py: error: saving a checkpoint in {out / 'checkpoints'} failed: No space left on "
                    f"device; the newest complete checkpoint is step 2: python train.py --output-dir {out} "
                    "--resume continues from it"], stderr[-3000:]
    for write in writes:
        write.join()
    assert not late and not [r for r in caplog.records if r.levelno >= logging.ERROR], \
        (late, [r.getMessage() for r in caplog.records])
    assert not [t for t in threading.enumerate() if type(t).__module__.startswith("tensorboardX")]   # none to die
    monkeypatch.undo()
    assert complete_steps(out) == [2] and int(saved_state(out, 2)["step"]) == 2


def test_a_save_that_cannot_fit_is_refused_before_it_starts(tmp_path, monkeypatch):
    """A write that fills the disk part-way makes Orbax's writer threads print a traceback per array
    (thousands, seen with a 40 MB tmpfs): the free space is checked first, and a save that cannot
    fit is an OSError (ENOSPC) naming the sizes, with nothing written. The tracebacks Orbax and
    asyncio log for a write that fails anyway are dropped (the run says it in one line)."""
    import errno
    import logging
    from collections import namedtuple
    from sdjax.training import checkpoint
    state = {"w": np.zeros((1024, 1024), np.float32)}   # 4 MiB
    needed = int(4 * 2**20 * 1.02) + 2**20
    usage = namedtuple("usage", "total used free")
    checkpoints = Checkpointer(tmp_path / "checkpoints", async_save=False)
    try:
        monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: usage(10 * needed, 9 * needed, needed // 2))
        with pytest.raises(OSError, match=re.escape(f"saving a checkpoint in {tmp_path / 'checkpoints'} failed: it "
                                                    "needs about 5.1 MiB and the disk has 2.5 MiB free")) as info:
            checkpoints.save(1, state, {"epoch": 0})
        assert info.value.errno == errno.ENOSPC and checkpoints.all_steps() == []
        assert str(info.value).endswith("(free some space, or choose an --output-dir on a disk with more)")
        assert not [p for p in (tmp_path / "checkpoints").iterdir() if not p.name.startswith(".")]
        monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: usage(10 * needed, 9 * needed, needed))
        checkpoints.save(1, state, {"epoch": 0})
        assert checkpoints.all_steps() == [1]
        # With checkpoints in the folder, keeping fewer of them is the other way out.
        monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: usage(10 * needed, 9 * needed, needed // 2))
        with pytest.raises(OSError, match=re.escape("(free some space, or keep fewer: --keep-checkpoints)")):
            checkpoints.save(2, state, {"epoch": 0})
    finally:
        checkpoints.close()
    drop = checkpoint._NoSaveFailureTracebacks()

    def raised(error, filename):   # the error as raised by code in that file
        scope = {}
        exec(compile("def write(error):\n    raise error\n", filename, "exec"), scope)
        try:
            scope["write"](error)
        except BaseException as e:
            return e

    def record(error, logger="asyncio"):
        return logging.LogRecord(logger, logging.ERROR, __file__, 1, "Task exception was never retrieved", None,
                                 (type(error), error, error.__traceback__))
    full = 'RESOURCE_EXHAUSTED: Error writing "w/0": No space left on device'
    orbax_file = "/venv/site-packages/orbax/checkpoint/_src/serialization/serialization.py"
    assert not drop.filter(record(raised(ValueError(full), orbax_file)))
    assert not drop.filter(record(raised(KeyboardInterrupt(), orbax_file), logger="absl"))
    for other in (raised(ValueError(full), __file__), raised(ValueError("a bug"), orbax_file),   # not Orbax's write
                  raised(OSError(28, "No space left on device"), __file__), raised(KeyboardInterrupt(), __file__)):
        assert drop.filter(record(other))


# ----------------------------------------------------------------------------- 5/6. a full train.py run
@pytest.fixture(scope="module")
def full_run(tmp_path_factory, pipeline_dir, data_dir):
    """train.py with a --config preset and flags overriding some of its keys."""
    root = tmp_path_factory.mktemp("full")
    preset = root / "preset.yaml"
    preset.write_text(yaml.safe_dump({**BASE, "model": str(pipeline_dir), "train_data": str(data_dir),
                                      "max_steps": 99, "checkpoint_every": 100, "sample_every": 2,
                                      "random_flip": True, "learning_rate": "1e-5"}))
    out = root / "run"
    (out / "samples").mkdir(parents=True)   # an earlier run's sample, without its checkpoints: removed
    Image.new("RGB", (8, 8)).save(out / "samples" / "step-000099.png")
    rc, stdout, stderr = run_train_py(["--config", preset, *flags(output_dir=out, max_steps=3, checkpoint_every=2,
                                                                   random_flip=False)])
    assert rc == 0, stderr
    return dict(out=out, preset=preset, stdout=stdout)


def test_resume_from_moved_data_says_to_pass_its_new_place(full_run):
    """The recorded --train-data of a run is gone (moved): the resume says how to go on."""
    cfg = TrainConfig.from_run(full_run["out"], train_data=str(full_run["out"] / "moved-away"), resume=True)
    with pytest.raises(DataError, match="training data folder not found: .*moved-away.*if it has moved, pass "
                                        "--train-data with its new place"):
        Trainer.create(cfg)


def test_a_resume_past_the_data_names_the_record_its_settings_came_from(full_run, tmp_path):
    """A resume on other devices records the accumulation it needed; a later plain --resume takes it
    from train_config.json: the too-large global batch names that file, before the model loads."""
    out = tmp_path / "run"
    shutil.copytree(full_run["out"], out)
    record = json.loads((out / "train_config.json").read_text())
    (out / "train_config.json").write_text(json.dumps({**record, "gradient_accumulation": 64}))
    rc, _, stderr = run_train_py(["--output-dir", out, "--resume"])
    assert rc == 2 and (f"fewer than one global batch of {64 * jax.device_count()} (--batch-size 1 x "
                        f"{jax.device_count()} devices x --gradient-accumulation 64, the ones not given as flags from "
                        f"{out / 'train_config.json'}): lower them") in stderr, stderr[-2000:]


def test_resume_step_falls_back_to_an_earlier_checkpoint(full_run, tmp_path):
    """--resume-step 2 on a run with checkpoints 2 and 3: it resumes at step 2 (weights, data position,
    metrics and samples), and checkpoint 3 is moved aside, not deleted (to 3-2 where an earlier
    fallback left a 3). Nothing is moved when the resume is refused. No step is compiled."""
    out = tmp_path / "run"
    shutil.copytree(full_run["out"], out)
    assert complete_steps(out) == [2, 3]
    _, args = parse_args(["--output-dir", str(out), "--resume-step", "2"])
    cfg = TrainConfig.from_run(out)
    assert args.resume_step == 2 and cfg.resume
    for argv, message in ((["--resume-step", "2", "--export"], "--resume-step 2: not with --export"),
                          (["--resume-step", "2", "--no-resume"], "--resume-step 2: resumes the run; not with "
                                                                   "--no-resume")):
        with pytest.raises(UsageError, match=re.escape(message)):
            parse_args(["--output-dir", str(out), *argv])
    with pytest.raises(UsageError, match=re.escape(f"--resume-step 1: no checkpoint 1 in {out / 'checkpoints'} "
                                                   "(it has 2, 3)")):
        Trainer.create(cfg, resume_step=1)
    with pytest.raises(UsageError, match="--resume-step 2: only with --resume"):
        Trainer.create(dataclasses.replace(cfg, resume=False), resume_step=2)
    with pytest.raises(UsageError, match="--resume-step 2: past --max-steps 1"):
        Trainer.create(dataclasses.replace(cfg, max_steps=1), resume_step=2)
    with pytest.raises(UsageError, match="ema_decay"):   # what a checkpoint holds cannot change: refused at restore
        Trainer.create(dataclasses.replace(cfg, ema_decay=None), resume_step=2)
    assert complete_steps(out) == [2, 3] and not (out / "abandoned_checkpoints").exists()
    assert sorted(p.name for p in (out / "samples").glob("step-*.png")) == ["step-000002.png", "step-000003.png"]
    (out / "abandoned_checkpoints" / "3").mkdir(parents=True)
    trainer = Trainer.create(cfg, resume_step=2)
    try:
        assert int(trainer.state.step) == 2 and trainer.data.step == 2
        expected = saved_state(full_run["out"], 2)["params"]
        assert max_diff(jax.device_get(trainer.state.params), expected) == 0
    finally:
        trainer.close()
    assert complete_steps(out) == [2]
    assert sorted(p.name for p in (out / "abandoned_checkpoints").iterdir()) == ["3", "3-2"]
    assert [row["step"] for row in metrics(out)] == [1, 2]
    assert sorted(p.name for p in (out / "samples").glob("step-*.png")) == ["step-000002.png"]   # not 3's
    with pytest.raises(UsageError, match=r"--resume-step 3: no checkpoint 3 in .* \(it has 2\)"):
        Trainer.create(cfg, resume_step=3)


def test_a_new_run_does_not_replace_an_earlier_runs_export(full_run, pipeline_dir, data_dir, tmp_path):
    """An earlier run whose checkpoints were deleted (to free the disk) left final/: a new run there,
    or a --resume that finds no checkpoint, is refused before anything is touched."""
    out = tmp_path / "run"
    shutil.copytree(full_run["out"], out)
    shutil.rmtree(out / "checkpoints")
    (out / "final" / "notes.txt").write_text("mine")
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    for resume in (False, True):
        with pytest.raises(UsageError, match=re.escape(f"{out} holds an earlier run's export (final) and no "
                                                       "checkpoints: this run would replace it")):
            Trainer.create(config(out, pipeline_dir, data_dir, resume=resume))
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before
    (tmp_path / "fresh" / "final").mkdir(parents=True)   # an empty final/ (a mount point) is no export
    Trainer.create(config(tmp_path / "fresh", pipeline_dir, data_dir)).close()


def test_a_checkpoint_folder_as_a_model_says_how_to_export_it(full_run):
    from sdjax import StableDiffusion
    from sdjax.weights import CheckpointError
    out = full_run["out"]
    with pytest.raises(CheckpointError, match=re.escape(
            f"it looks like a training checkpoint: export it with train.py --output-dir {out} --export "
            "--export-step 2")):
        StableDiffusion.from_pretrained(out / "checkpoints" / "2")


def test_train_py_outputs_and_config_precedence(full_run):
    out = full_run["out"]
    assert f"done: 3 steps; pipeline exported to {out / 'final'}" in full_run["stdout"]
    used = json.loads((out / "train_config.json").read_text())
    # Flags win over the preset; the preset wins over the defaults.
    assert (used["max_steps"], used["checkpoint_every"], used["random_flip"]) == (3, 2, False)
    assert (used["learning_rate"], used["ema_decay"], used["gradient_accumulation"], used["resolution"]) == \
        (1e-5, 0.9, 2, SIZE)
    assert complete_steps(out) == [2, 3]
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) and {"loss", "lr", "grad_norm"} <= r.keys() for r in rows)
    assert sorted(p.name for p in (out / "samples").glob("*.png")) == ["step-000002.png", "step-000003.png"]
    grid = np.asarray(Image.open(out / "samples" / "step-000003.png").convert("RGB"))   # 1 prompt x 1 seed
    assert min(grid.shape[:2]) >= SIZE and grid.std() > 0
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert Image.open(out / "loss_curve.png").size[0] > 100
    for name in ("model_index.json", "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_flax_model.msgpack",
                 "text_encoder/model.safetensors", "scheduler/scheduler_config.json",
                 "tokenizer/tokenizer_config.json"):
        assert (out / "final" / name).is_file(), name


def test_export_loads_in_sdjax_and_diffusers_with_ema_weights(full_run):
    """final/ loads in sdjax and in diffusers' StableDiffusionPipeline, which give the same images
    from the same latents; its UNet is the EMA of the last checkpoint, not the raw weights; then
    ``train.py --export --export-step 2`` re-exports checkpoint 2 (and keeps the run's logs)."""
    import torch
    from diffusers import StableDiffusionPipeline
    from sdjax import StableDiffusion

    out = full_run["out"]
    final = out / "final"
    latents = np.random.default_rng(0).standard_normal((2, SIZE // 2, SIZE // 2, 4)).astype(np.float32)
    prompts = ["the red dog", "a photo of the cat"]
    ours = StableDiffusion.from_pretrained(final)(prompts, num_inference_steps=3, height=SIZE, width=SIZE,
                                                  latents=latents).images
    reference = StableDiffusionPipeline.from_pretrained(final, safety_checker=None)
    reference.set_progress_bar_config(disable=True)
    theirs = reference(prompts, num_inference_steps=3, height=SIZE, width=SIZE, output_type="np",
                       latents=torch.from_numpy(latents.transpose(0, 3, 1, 2))).images
    assert ours.shape == theirs.shape == (2, SIZE, SIZE, 3)
    assert theirs.std() > 0.01
    assert np.abs(ours - theirs).max() <= 2e-5

    last = saved_state(out, 3)
    assert max_diff(last["ema"]["unet"], last["params"]["unet"]) > 1e-6     # EMA and raw weights differ (~3e-6)
    assert max_diff(exported_unet(final), last["ema"]["unet"]) <= 1e-7
    assert max_diff(exported_unet(final, format="flax"), last["ema"]["unet"]) <= 1e-7

    # only the output folder: the rest comes from the run's train_config.json. The export reads no
    # training data (here: a folder that is not there), and rewrites neither the log nor the record.
    # --export-single-file also writes final.safetensors, the web UIs' single file, here in float16.
    recorded = (out / "train_config.json").read_bytes()
    assert not (out / "final.safetensors").exists()
    rc, stdout, stderr = run_train_py(["--output-dir", out, "--export", "--export-step", "2",
                                       "--train-data", out / "moved", "--export-single-file", "float16"])
    assert rc == 0, stderr
    assert (out / "train_config.json").read_bytes() == recorded
    assert f"settings recorded in {out / 'train_config.json'}" in stdout
    assert f"exported step 2 to {final} and {out / 'final.safetensors'} (float16)" in stdout
    ema = saved_state(out, 2)["ema"]["unet"]
    assert max_diff(exported_unet(final), ema) <= 1e-7
    single = StableDiffusion.from_single_file(out / "final.safetensors", config=str(final))
    assert {v.dtype for v in load_file(str(out / "final.safetensors")).values()} == {np.dtype(np.float16)}
    half = jax.tree.map(lambda x: np.asarray(x, np.float16).astype(np.float32), ema)   # the float16 rounding
    assert max_diff(nnx.to_pure_dict(nnx.state(single.unet, nnx.Param)), half) == 0
    # exported files and folders get the usual permissions (safetensors and mkdtemp would make them private)
    mask = umask()
    assert {oct(p.stat().st_mode & 0o777) for p in [out / "final.safetensors", *final.rglob("*")] if p.is_file()} \
        == {oct(0o666 & ~mask)}
    assert {oct(p.stat().st_mode & 0o777) for p in [final, *final.rglob("*")] if p.is_dir()} == {oct(0o777 & ~mask)}
    # an export without the single file removes the earlier one, which would pass for this export
    rc, stdout, stderr = run_train_py(["--output-dir", out, "--export", "--export-step", "2"])
    assert rc == 0 and not (out / "final.safetensors").exists(), stderr
    assert [r["step"] for r in metrics(out)] == [1, 2, 3]          # --export leaves the run's log alone


def test_a_failed_export_leaves_the_earlier_folder_and_single_file(full_run, tmp_path, monkeypatch):
    """final/ and final.safetensors are one export: when writing either fails (a full disk), both
    stay as the earlier export left them, and no partial file is left beside them."""
    from sdjax.pipeline import StableDiffusion
    cfg, _ = parse_args(["--output-dir", str(full_run["out"]), "--export", "--export-single-file", "float32"])
    trainer = Trainer.for_export(cfg, step=2)
    try:
        final = trainer.export(tmp_path / "final")
        single = Trainer.single_file_path(final)
        before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
        assert single in before and final / "unet" / "diffusion_pytorch_model.safetensors" in before
        trainer.state = trainer.state._replace(ema=jax.tree.map(lambda x: x + 1, trainer.state.ema))
        original = {name: getattr(StableDiffusion, name) for name in ("save_pretrained", "save_single_file")}
        for failing in original:
            def fail(self, path, *args, _failing=failing, **kwargs):
                if _failing == "save_single_file":   # the whole (temporary) file, then the disk fills up
                    original[_failing](self, path, *args, **kwargs)
                raise OSError(28, "No space left on device")   # the folder: before its rename into place
            with monkeypatch.context() as patch:
                patch.setattr(StableDiffusion, failing, fail)
                with pytest.raises(OSError, match="No space left"):
                    trainer.export(final)
            assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before, failing
        trainer.export(final)   # the new weights, once nothing fails: both change
        after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
        assert after.keys() == before.keys() and after[single] != before[single]
        assert after[final / "unet" / "diffusion_pytorch_model.safetensors"] != \
            before[final / "unet" / "diffusion_pytorch_model.safetensors"]
        (tmp_path / "mine").mkdir()   # a folder of other files is not replaced (it was, files and all)
        (tmp_path / "mine" / "notes.txt").write_text("mine")
        with pytest.raises(FileExistsError, match="holds files and no model_index.json"):
            trainer.export(tmp_path / "mine")
        assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]
        assert not (tmp_path / "mine.safetensors").exists()
        trainer.state = trainer.state._replace(ema=jax.tree.map(lambda x: x * np.nan, trainer.state.ema))
        with pytest.raises(ValueError, match="not finite .*not exported"):   # (a caught TrainingDiverged's state)
            trainer.export(final)
        assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p.parent.name != "mine"} == after
    finally:
        trainer.close()


@pytest.mark.parametrize("failure", ["full_disk", "out_of_device_memory"])
def test_train_py_export_that_cannot_write_or_runs_out_of_memory_is_one_line(full_run, failure, tmp_path,
                                                                             monkeypatch):
    """train.py --export when writing the export fails (a full disk) or the device runs out of
    memory: one line (naming what could not be written, or with advice) and exit 1, as in training,
    not a traceback; the run's earlier export stays as it was."""
    from sdjax.pipeline import StableDiffusion
    out = tmp_path / "run"
    shutil.copytree(full_run["out"], out)
    before = {p: p.read_bytes() if p.is_file() else None for p in out.rglob("*")}
    if failure == "full_disk":
        def fail(self, *args, **kwargs):
            raise OSError(28, "No space left on device")
        monkeypatch.setattr(StableDiffusion, "save_pretrained", fail)   # after the single file's temporary copy
        expected = (f"train.py: error: cannot write the export {out / 'final'} and {out / 'final.safetensors'} "
                    "(float16): [Errno 28] No space left on device; an earlier export there is left as it was\n")
    else:
        reason = "RESOURCE_EXHAUSTED: Out of memory allocating 786354382176 bytes."

        def fail(self, *args, **kwargs):
            raise jax.errors.JaxRuntimeError(reason)
        monkeypatch.setattr(Trainer, "sampling_pipeline", fail)   # where the weights are gathered from the devices
        expected = (f"train.py: error: out of device memory ({reason}): run the same command with JAX_PLATFORMS=cpu "
                    "to export from the computer's memory instead\n")
    rc, stdout, stderr = run_train_py(["--output-dir", out, "--export", "--export-single-file", "float16"])
    assert rc == 1 and stderr == expected, stderr
    assert "exported" not in stdout
    assert {p: p.read_bytes() if p.is_file() else None for p in out.rglob("*")} == before


STOPPED_IN_COMPILE = textwrap.dedent("""
    import os, runpy, signal, sys, threading
    import jax, jax.numpy as jnp
    import jax._src.compiler as compiler
    import sdjax.training.loop as loop
    real_compile = compiler.backend_compile_and_load
    armed = []

    def compile_then_sigterm(*args, **kwargs):   # the signal arrives while XLA compiles f
        if armed:
            armed.clear()
            threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM)).start()
        return real_compile(*args, **kwargs)
    compiler.backend_compile_and_load = compile_then_sigterm

    def train_step_compiling(cfg, **_):
        def f(x):
            for i in range(1500):
                x = jnp.sin(x) * (i + 1.0) + jnp.cos(x @ x.T)
            return x
        x = jnp.ones((8, 8))
        armed.append(True)
        jax.jit(f)(x).block_until_ready()
        print("compiled and ran: the signal came too late", file=sys.stderr)
    loop.train = train_step_compiling
    sys.argv = ["train.py", *sys.argv[1:]]
    runpy.run_path(os.environ["TRAIN_PY"], run_name="__main__")
""")


def test_sigterm_while_compiling_exits_143(pipeline_dir, data_dir, tmp_path):
    """SIGTERM landing inside XLA's compiler (a preemption at the start of a run): exit status 143
    and the resume line, not a segfault in the interpreter's teardown (exit 139, jaxlib 0.10)."""
    script = tmp_path / "stopped_in_compile.py"
    script.write_text(STOPPED_IN_COMPILE)
    argv = flags(model=pipeline_dir, train_data=data_dir, output_dir=tmp_path / "run", **{
        k: v for k, v in BASE.items() if k in ("resolution", "batch_size")}) + ["--compilation-cache", "none"]
    done = subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TRAIN_PY": str(ROOT / "train.py")})
    assert "the signal came too late" not in done.stderr   # it did land in the compiler
    assert "Fatal Python error" not in done.stderr, done.stderr[-3000:]
    assert done.returncode == 143, done.stderr[-3000:]
    assert "train.py: terminated (SIGTERM); no checkpoint was saved yet" in done.stderr


def test_a_resumed_run_loads_the_compiled_step_from_the_compilation_cache(pipeline_dir, data_dir, tmp_path):
    """train.py turns on JAX's persistent compilation cache (as sample.py does): a run resumed in a
    fresh process (after a preemption) loads the train step and the sampler instead of compiling
    them again (minutes for SD v1.5). Read from JAX's compiler log, not from timings."""
    env = {**os.environ, "SDJAX_CACHE_DIR": str(tmp_path / "cache"), "JAX_EXPLAIN_CACHE_MISSES": "1",
           "JAX_LOG_COMPILES": "1", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    # No accumulation, no EMA: a smaller step to compile (the cache does not depend on what the step does).
    settings = {k: v for k, v in BASE.items() if k != "ema_decay"}
    base = flags(**{**settings, "model": pipeline_dir, "train_data": data_dir, "output_dir": tmp_path / "run",
                    "checkpoint_every": 1, "gradient_accumulation": 1})
    hits, misses = [], []
    for extra in (["--max-steps", "1"], ["--resume", "--max-steps", "2"]):
        done = subprocess.run([sys.executable, str(ROOT / "train.py"), *base, *extra], capture_output=True,
                              text=True, timeout=600, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        hits.append(re.findall(r"Persistent compilation cache hit for '([^']+)'", done.stderr))
        misses.append(re.findall(r"PERSISTENT COMPILATION CACHE MISS for '([^']+)'", done.stderr))
    assert {"jit_placed_step", "jit_generate"} <= set(misses[0]), misses[0]
    assert {"jit_placed_step", "jit_generate"} <= set(hits[1]) and not misses[1], (hits[1], misses[1])


@pytest.mark.parametrize("stop", ["interrupt", "sigterm", "disk_full", "image_gone"])
def test_a_stopped_run_says_where_it_can_resume(full_run, stop, pipeline_dir, data_dir, tmp_path, monkeypatch):
    """Ctrl-C, SIGTERM (a preempted VM, a scheduler's stop), an OSError such as a full disk, or an
    image deleted since the data was checked, mid-run: one line naming the newest complete
    checkpoint and the --resume command (or that none was saved yet), not a traceback."""
    import sdjax.training.loop as loop
    from sdjax.training.data import ImageReadError
    gone = "data: cannot read image of example 3 ('a.png'): FileNotFoundError: a.png"

    def stopped(cfg, **_):
        if stop == "interrupt":
            raise KeyboardInterrupt
        if stop == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)   # train.py's handler raises in this (the main) thread
            time.sleep(10)                          # not reached
        if stop == "image_gone":
            raise ImageReadError(gone)
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(loop, "train", stopped)
    out = full_run["out"]
    handler = signal.getsignal(signal.SIGTERM)
    rc, _, stderr = run_train_py(["--output-dir", out, "--resume"])
    said = {"interrupt": "train.py: interrupted", "sigterm": "train.py: terminated (SIGTERM)",
            "disk_full": "train.py: error: [Errno 28] No space left on device",
            "image_gone": f"train.py: error: {gone}"}[stop]
    after = " once the image is back (leaving its row out changes the data, which a resume refuses)" \
        if stop == "image_gone" else ""
    assert rc == {"interrupt": 130, "sigterm": 143}.get(stop, 1)
    assert signal.getsignal(signal.SIGTERM) is handler   # main() put the handler back
    assert stderr.strip() == f"{said}; the newest complete checkpoint is step 3: python train.py --output-dir {out} " \
                              f"--resume continues from it{after}"
    rc, _, stderr = run_train_py(flags(model=pipeline_dir, train_data=data_dir, output_dir=tmp_path / "new",
                                       checkpoint_every=50))
    assert f"{said}; no checkpoint was saved yet in {tmp_path / 'new' / 'checkpoints'} (the first is at step 50)" \
        in stderr


def test_a_run_stopped_before_its_first_checkpoint_names_the_step_it_would_have_been(tmp_path):
    """The first checkpoint is at --checkpoint-every or, in a shorter run, at its last step (a run of
    50 steps stopped early said "the first is at step 500", the default --checkpoint-every)."""
    from sdjax.training.loop import TrainConfig
    for max_steps, first in ((50, 50), (1000, 500)):
        said = train_script.how_to_resume(TrainConfig(output_dir=str(tmp_path), max_steps=max_steps))
        assert said == f"no checkpoint was saved yet in {tmp_path / 'checkpoints'} (the first is at step {first})"


def test_an_output_dir_that_cannot_be_written_is_refused_before_loading(pipeline_dir, data_dir, tmp_path):
    """--output-dir under a file (or on a read-only disk): a usage error before the model and data
    load, where Orbax raised NotADirectoryError at its first checkpoint."""
    (tmp_path / "afile").write_text("")
    rc, _, stderr = run_train_py(flags(model=pipeline_dir, train_data=data_dir, output_dir=tmp_path / "afile" / "run"))
    assert rc == 2 and stderr == f"train.py: error: --output-dir {tmp_path / 'afile' / 'run'}: {tmp_path / 'afile'} " \
                                 "is a file, not a folder\n", stderr


def test_resume_below_the_checkpoint_step_is_refused(full_run):
    """--resume --max-steps 2 of a run at step 3 would export step 3's weights as "done: 2 steps"
    (and rewrite step 2's samples with them): it is an error pointing to --export-step, and
    nothing of the run changes."""
    out = full_run["out"]
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    rc, stdout, stderr = run_train_py(["--output-dir", out, "--resume", "--max-steps", "2"])
    assert rc == 2, stderr
    assert f"--max-steps 2: the run in {out} is already at step 3" in stderr and "--export-step" in stderr
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_resume_refusals_come_before_the_model_loads(full_run, monkeypatch):
    """A resume that the record or the checkpoint's data position refuses (another seed or global
    batch, a setting that changes what a checkpoint holds, --max-steps below the checkpoint) says so
    before the model and the training state load (a minute or more for SD v1.5), changing nothing."""
    from sdjax.training import loop
    out = full_run["out"]
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")
    monkeypatch.setattr(loop, "_build_model", no_model)
    recorded = TrainConfig.from_run(out)
    for change, error, message in (
            (dict(seed=recorded.seed + 1), DataError, rf"saved seed={recorded.seed}, now {recorded.seed + 1}"),
            (dict(gradient_accumulation=1), DataError, r"saved global_batch_size=16, now 8"),
            (dict(ema_decay=None), UsageError, r"the run that saved it had ema_decay="),
            (dict(max_steps=2), UsageError, rf"--max-steps 2: the run in {re.escape(str(out))} is already at step 3")):
        with pytest.raises(error, match=message):
            Trainer.create(TrainConfig.from_run(out, **change))
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("change", [("ema_decay", "none"), ("max_grad_norm", "0"), ("train_text_encoder", None),
                                    ("lora_rank", "2")])
def test_resume_with_a_setting_that_changes_the_checkpoint_layout(full_run, change):
    """--resume with EMA off, clipping off or the text encoder trained, where the run had them the
    other way: the checkpoint's tree cannot fit, and the error names the setting and its recorded
    value (not Orbax's "tree structures do not match"); nothing of the run changes."""
    out = full_run["out"]
    name, value = change
    flag = "--" + name.replace("_", "-")
    before = {p: p.read_bytes() for p in (out / "train_config.json", out / "metrics.jsonl")}
    rc, stdout, stderr = run_train_py(["--output-dir", out, "--resume", flag, *([value] if value else [])])
    assert rc == 2, stderr
    recorded = json.loads(before[out / "train_config.json"])[name]
    assert f"the run that saved it had {name}={recorded!r}" in stderr, stderr
    assert re.search(rf"resuming with settings changed from the recorded run: {name}=\S+ \(was {recorded!r}\)$",
                     stdout, re.M), stdout
    assert {p: p.read_bytes() for p in before} == before
    assert complete_steps(out) == [2, 3]


@pytest.mark.parametrize("damage", ["truncated_array_file", "data_position_not_json"])
def test_a_damaged_checkpoint_is_one_line_naming_the_others(full_run, damage, tmp_path):
    """--resume or --export of a checkpoint with a truncated array file or a data position that is
    not JSON: exit 2 and one line naming the checkpoint, why it cannot be read and the flag that
    takes another (not Orbax's and TensorStore's hundreds of lines); nothing of the run changes.
    One --export runs as its own process: the other reads' "Event loop is closed" tracebacks print
    at its exit."""
    out = tmp_path / "run"
    shutil.copytree(full_run["out"], out)
    step = out / "checkpoints" / "3"
    if damage == "truncated_array_file":
        largest = max((step / "state" / "ocdbt.process_0" / "d").iterdir(), key=lambda p: p.stat().st_size)
        os.truncate(largest, largest.stat().st_size // 2)
        reason = 'OUT_OF_RANGE: Error reading "'
    else:
        (step / "data" / "metadata").write_text("{not json")
        reason = "Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"
    before = {p: p.read_bytes() if p.is_file() else None for p in out.rglob("*")}
    start = f"train.py: error: cannot read checkpoint 3 ({step}): {reason}"
    for argv, way_out in ((["--resume"], "pass --resume-step N to resume from another of its checkpoints: 2"),
                          (["--export"], "pass --export-step N to export another of its checkpoints: 2")):
        rc, _, stderr = run_train_py(["--output-dir", out, *argv])
        end = f"; one of its files is damaged, missing or unreadable; {way_out}\n"
        assert rc == 2 and stderr.startswith(start) and stderr.endswith(end) and stderr.count("\n") == 1, stderr
    if damage == "truncated_array_file":
        done = subprocess.run([sys.executable, str(ROOT / "train.py"), "--output-dir", str(out), "--export",
                               "--compilation-cache", "none"], capture_output=True, text=True, timeout=300)
        assert done.returncode == 2 and done.stderr.startswith(start) and done.stderr.count("\n") == 1, done.stderr
    assert {p: p.read_bytes() if p.is_file() else None for p in out.rglob("*")} == before
    shutil.rmtree(out / "checkpoints" / "2")
    rc, _, stderr = run_train_py(["--output-dir", out, "--export"])
    assert rc == 2 and stderr.endswith(f"; {out / 'checkpoints'} has no other checkpoint to export\n"), stderr


# ----------------------------------------------------------------------------- 6/7. train.py errors
BAD_VALUES = {   # flag value -> what the error says; all checked before the model is loaded
    "lr_schedule": ("step", "lr_schedule='step' is not one of 'constant', 'constant_with_warmup', 'cosine', 'linear', "
                    "'cosine_with_restarts', 'polynomial' (--lr-schedule)"),
    "seed": ("-1", "seed=-1 must be >= 0 (--seed)"),
    "export_format": ("onnx", "export_format='onnx' is not one of 'both', 'pytorch', 'flax' (--export-format)"),
    "export_single_file": ("fp16", "export_single_file='fp16' is not one of 'float16', 'bfloat16', 'float32' or "
                           "none (--export-single-file)"),
    "max_grad_norm": ("-1", "max_grad_norm=-1.0 must be >= 0"),
    "min_snr_gamma": ("-5", "min_snr_gamma=-5.0 must be > 0"),
    "noise_offset": ("-0.1", "noise_offset=-0.1 must be >= 0"),
    "prediction_type": ("sample", "prediction_type='sample' is not one of 'epsilon', 'v_prediction' or none"),
    "mixed_precision": ("fp16", "mixed_precision='fp16' is not one of 'no', 'bf16' (--mixed-precision)"),
    "adam_b1": ("1.5", "adam_b1=1.5 must be in [0, 1) (--adam-b1)"),
    "output_dir": ("gs://bucket/run", "output_dir='gs://bucket/run' must be a folder of the file system"),
    "model_config": ("elsewhere", "--model-config elsewhere: only for a single-file --model"),
    "image_key": ("img", "image_key='img' is a TFDS setting, and train_data="),   # with folder data
    "caption_key": ("text", "caption key 'text' (--caption-key) names a column of a metadata.jsonl or metadata.csv, "
                    "or a TFDS feature; "),   # the data folder has an image_captions.csv
}


@pytest.mark.parametrize("case", ["unknown_key", "resolution", "no_train_data", "bad_type", "missing_config",
                                  "preset_of_sample_py",
                                  "tfds_not_installed", "resume_wrong_dir", "export_wrong_dir", "float_seeds",
                                  "export_step_alone",
                                  "samples_past_the_schedule", "x0_model", "unsupported_noise_schedule",
                                  "data_under_a_batch", "abbreviated_flag", "empty_caption_key",
                                  "ema_weights_of_a_folder", "inpainting_model", *BAD_VALUES])
def test_train_py_usage_errors(case, pipeline_dir, data_dir, tmp_path, monkeypatch):
    base = flags(model=pipeline_dir, train_data=data_dir, output_dir=tmp_path / "out")
    preset = tmp_path / "bad.yaml"
    preset.write_text("learning_rate: 1e-4\nlearning_rat: 1e-3\n")
    seeds_preset = tmp_path / "seeds.yaml"
    seeds_preset.write_text("validation_seeds: [1, 1.5]\n")
    edited_model = tmp_path / "edited-model"   # the pipeline with one scheduler setting changed
    edits = {"x0_model": {"prediction_type": "sample"},   # predicts the clean latents, not the noise
             "unsupported_noise_schedule": {"beta_schedule": "sigmoid"}}   # diffusers has it, sdjax not
    if case in edits:
        shutil.copytree(pipeline_dir, edited_model)
        scheduler = json.loads((edited_model / "scheduler" / "scheduler_config.json").read_text())
        (edited_model / "scheduler" / "scheduler_config.json").write_text(json.dumps({**scheduler, **edits[case]}))
    if case == "inpainting_model":   # its UNet takes 9 channels: the latents, a mask and the masked image's latents
        from safetensors.numpy import save_file
        shutil.copytree(pipeline_dir, edited_model)
        unet = edited_model / "unet"
        (unet / "config.json").write_text(json.dumps({**json.loads((unet / "config.json").read_text()),
                                                      "in_channels": 9}))
        weights = load_file(str(unet / "diffusion_pytorch_model.safetensors"))
        weights["conv_in.weight"] = np.concatenate([weights["conv_in.weight"]] * 3, axis=1)[:, :9].copy()
        save_file(weights, str(unet / "diffusion_pytorch_model.safetensors"))
        (unet / "diffusion_flax_model.msgpack").unlink()
    argv, expected = {
        "unknown_key": (["--config", preset, *base], [str(preset), "unknown key 'learning_rat'"]),
        "resolution": ([*base, "--resolution", "100"], ["resolution=100 must be a multiple of 8"]),
        "no_train_data": (flags(model=pipeline_dir, output_dir=tmp_path / "out"), ["--train-data"]),
        "bad_type": ([*base, "--batch-size", "two"], ["batch_size='two' is not a valid int"]),
        "missing_config": (["--config", tmp_path / "nope.yaml", *base], ["nope.yaml", "does not exist"]),
        "preset_of_sample_py": (["--config", "draft", *base], ["config file 'draft' does not exist; 'draft' is a "
                                "preset of sample.py", "the presets here are lora, low_memory, style"]),
        "tfds_not_installed": (flags(model=pipeline_dir, train_data="tfds:mnist", output_dir=tmp_path / "out"),
                               ['sources need the optional package tensorflow-datasets', 'pip install -e ".[tfds]" in the sdjax checkout']),
        "resume_wrong_dir": (["--output-dir", tmp_path / "out", "--resume"],
                             [f"--resume: {tmp_path / 'out'} has no train_config.json", "and no checkpoints"]),
        "export_wrong_dir": (["--output-dir", tmp_path / "out", "--export"],
                             [f"--export: {tmp_path / 'out'} has no train_config.json", "and no checkpoints"]),
        "float_seeds": (["--config", seeds_preset, *base], ["validation_seeds=[1, 1.5] is not a valid int"]),
        "export_step_alone": ([*base, "--export-step", "2"], ["--export-step 2: only with --export"]),
        # checked once the model is loaded, before any training
        "samples_past_the_schedule": ([*base, "--sample-steps", "1000"],
                                      [f"{pipeline_dir}: its scheduler config with --sample-steps 1000: pndm with "
                                       "1000 steps", "reaches timestep 1000, past the last training timestep 999"]),
        "data_under_a_batch": ([*base, "--batch-size", "17"],
                               [f"{data_dir}: 16 usable examples, fewer than one global batch of "
                                f"{17 * jax.device_count()} (--batch-size 17 x {jax.device_count()} devices x "
                                "--gradient-accumulation 1)"]),
        "abbreviated_flag": ([*base, "--lr", "1e-4"], ["unrecognized arguments: --lr 1e-4"]),   # not --lr-schedule
        "ema_weights_of_a_folder": ([*base, "--ema-weights"], ["--ema-weights: picks the EMA copy in a single-file "
                                                               "training checkpoint", f"({pipeline_dir}) holds one"]),
        "empty_caption_key": ([*base, "--caption-key="], ["caption_key='' must name a TFDS feature or a metadata "
                                                          "file's column (--caption-key)"]),
        "x0_model": (flags(model=edited_model, train_data=data_dir, output_dir=tmp_path / "out"),
                     [f"{edited_model}: its scheduler config has prediction_type='sample'; sdjax fine-tunes 'epsilon' "
                      "and 'v_prediction' models"]),
        "inpainting_model": (flags(model=edited_model, train_data=data_dir, output_dir=tmp_path / "out"),
                             [f"{edited_model}: its UNet takes 9 input channels, the VAE's 4 latent ones and 5 more "
                              "(an inpainting model's mask and masked image); sdjax's training makes no masks from "
                              "its data, so it fine-tunes text-to-image models only"]),
        "unsupported_noise_schedule": (flags(model=edited_model, train_data=data_dir, output_dir=tmp_path / "out"),
                                       [f"{edited_model / 'scheduler' / 'scheduler_config.json'}: beta_schedule "
                                        "'sigmoid' is not supported"]),
        **{name: ([*base, "--" + name.replace("_", "-"), value], [message])
           for name, (value, message) in BAD_VALUES.items()},
    }[case]
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)   # not installed (makes the import fail)
    rc, stdout, stderr = run_train_py(argv)
    assert rc == 2
    assert stderr.startswith("train.py: error: ")
    for text in expected:
        assert text in stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("reason", ["RESOURCE_EXHAUSTED: Out of memory allocating 786354382176 bytes.",
                                    "INTERNAL: something else"])
def test_train_py_out_of_device_memory_is_one_line_with_advice(reason, pipeline_dir, data_dir, tmp_path,
                                                               monkeypatch):
    from sdjax.training import loop

    def fails(cfg, **kwargs):
        raise jax.errors.JaxRuntimeError(reason)
    monkeypatch.setattr(loop, "train", fails)
    argv = flags(model=pipeline_dir, train_data=data_dir, output_dir=tmp_path / "out")
    if reason.startswith("RESOURCE_EXHAUSTED"):
        rc, stdout, stderr = run_train_py(argv)
        assert rc == 1 and stderr == (
            f"train.py: error: out of device memory ({reason}): lower --batch-size (and raise --gradient-accumulation "
            "to keep the global batch), or try --mixed-precision bf16, --gradient-checkpointing, a lower --resolution, "
            f"or --config low_memory; --resume continues from the last checkpoint in {tmp_path / 'out'}\n")
    else:   # any other runtime error keeps its traceback
        with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL"):
            run_train_py(argv)


def test_export_without_a_checkpoint_changes_nothing(tmp_path):
    """--export of a run that saved no checkpoint yet says so before loading anything, and leaves
    metrics.jsonl and train_config.json as they were (it used to delete the log and rewrite the
    record with resume: true); so does an --export with a bad setting."""
    out = tmp_path / "run"
    out.mkdir()
    recorded = dataclasses.asdict(TrainConfig(model=str(tmp_path / "model"), train_data=str(tmp_path / "data"),
                                              output_dir=str(out)))
    (out / "train_config.json").write_text(json.dumps(recorded))
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n')
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    rc, stdout, stderr = run_train_py(["--output-dir", out, "--export"])
    assert rc == 2 and f"--export: no checkpoint in {out / 'checkpoints'}" in stderr, stderr
    rc, stdout, stderr = run_train_py(["--output-dir", out, "--export", "--export-format", "onnx"])
    assert rc == 2 and "export_format='onnx'" in stderr, stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_bad_row_stops_before_training_unless_skipped(pipeline_dir, tmp_path, monkeypatch):
    data = write_captioned_folder(tmp_path / "data", _images(17))
    (data / "train_images" / "000016.png").write_bytes(b"not a png")
    argv = flags(**{**BASE, "model": pipeline_dir, "train_data": data, "output_dir": tmp_path / "out",
                    "max_steps": 1})
    rc, stdout, stderr = run_train_py(argv)
    assert rc == 2
    assert "1 bad row of 17" in stderr and "row 17 (line 18) '000016.png'" in stderr
    assert "--skip-bad-rows" in stderr
    assert not (tmp_path / "out").exists()                          # stopped before anything ran

    def failing_samples(self, step):   # (sampling is tested above) a failure there keeps the export
        raise RuntimeError("sampling failed")
    monkeypatch.setattr(Trainer, "write_samples", failing_samples)
    with pytest.raises(RuntimeError, match="sampling failed"):
        run_train_py([*argv, "--skip-bad-rows"])
    assert complete_steps(tmp_path / "out") == [1]
    assert (tmp_path / "out" / "final" / "model_index.json").is_file()


def test_captions_are_tokenized_once_with_one_line_for_the_long_ones(pipeline_dir, tmp_path, capsys):
    """One summary line at the start (examples, skipped rows, captions past CLIP's 77 tokens), and
    no warning per caption at the step that first uses it."""
    import warnings
    from sdjax.text import tokenize
    items = _images(17)
    items[3] = (items[3][0], "a red dog " * 40)
    items[5] = (items[5][0], "a blue cat " * 40)
    data = write_captioned_folder(tmp_path / "data", items)
    (data / "train_images" / "000016.png").write_bytes(b"not a png")
    with pytest.warns(UserWarning, match=r"skipped 1 bad row of 17:\n  row 17 \(line 18\) '000016.png': unreadable"):
        trainer = Trainer.create(config(tmp_path / "out", pipeline_dir, data, max_steps=1, skip_bad_rows=True,
                                        gradient_accumulation=1))
    try:
        assert capsys.readouterr().out.splitlines()[0] == (
            f"training data: 16 examples from {data} (1 bad row skipped); 2 captions over 77 tokens, cut to the "
            "first 77 (CLIP's window)")
        for _ in range(trainer.data.steps_per_epoch):   # every example once
            indices = trainer.data.indices_for_step(trainer.data.step)
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                ids = np.asarray(trainer.next_batch()["input_ids"]).reshape(-1, 77)
            np.testing.assert_array_equal(ids, tokenize(trainer.pipe.tokenizer, [items[i][1] for i in indices],
                                                        warn=False))
    finally:
        trainer.close()


def test_fine_tune_a_single_file_checkpoint(pipeline_dir, data_dir, tmp_path, monkeypatch):
    """--model FILE.safetensors --model-config DIR starts from the file's weights, and the run records
    both paths absolute (so --resume from elsewhere finds them). Stops before the first step."""
    from sdjax.pipeline import StableDiffusion
    pipe = StableDiffusion.from_pretrained(pipeline_dir)
    single = pipe.save_single_file(tmp_path / "model.safetensors")
    monkeypatch.chdir(tmp_path)
    trainer = Trainer.create(config("out", "model.safetensors", data_dir, model_config=os.path.relpath(pipeline_dir)))
    try:
        assert max_diff(trainer.state.params["unet"], nnx.to_pure_dict(nnx.state(pipe.unet, nnx.Param))) == 0
    finally:
        trainer.close()
    recorded = json.loads((tmp_path / "out" / "train_config.json").read_text())
    assert recorded["model"] == str(single) and recorded["model_config"] == str(pipeline_dir)


def test_gradient_checkpointing_on_the_cpu_warns_that_it_saves_nothing(pipeline_dir, tmp_path):
    """XLA:CPU undoes jax.checkpoint (BENCHMARKS.md), so a CPU run says so before it starts (here
    it then stops at the missing data folder, so nothing compiles)."""
    cfg = config(tmp_path / "out", pipeline_dir, tmp_path / "no_data", gradient_checkpointing=True)
    with pytest.warns(UserWarning, match="gradient_checkpointing saves no memory on the CPU"):
        with pytest.raises(DataError, match="training data folder not found"):
            Trainer.create(cfg)


def test_a_new_run_in_the_folder_of_its_captioned_images_is_refused(pipeline_dir, tmp_path):
    """Data of a caption file beside each image is read by walking its folder: a run whose --output-dir
    is that folder trained, and then its --resume stopped at its own loss_curve.png and samples as
    bad rows (found by training and resuming so). Refused before anything is made or loaded; an
    image_captions.csv folder reads only the images it lists, so there the same folder is fine."""
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (32, 32)).save(data / "a.png")
    (data / "a.txt").write_text("a photo")
    with pytest.raises(UsageError, match="is the --train-data folder, whose images .* are found by walking it"):
        Trainer.create(config(data, pipeline_dir, data))
    with pytest.raises(UsageError, match="is the --train-data folder"):
        Trainer.create(config(str(data) + "/./", pipeline_dir, data))   # the same folder, spelled otherwise
    assert sorted(p.name for p in data.iterdir()) == ["a.png", "a.txt"]
    listed = write_captioned_folder(tmp_path / "listed", _images(1))
    with pytest.raises(UsageError, match="fewer than one global batch"):   # past the check, at the data's size
        Trainer.create(config(listed, pipeline_dir, listed))


def test_a_warmup_as_long_as_the_run_warns(pipeline_dir, tmp_path):
    """--config style (50 warmup steps) with --max-steps 4 would train at a fraction of the rate."""
    cfg = config(tmp_path / "out", pipeline_dir, tmp_path / "no_data", warmup_steps=50, max_steps=4, learning_rate=1e-4)
    with pytest.warns(UserWarning, match=re.escape("warmup_steps=50 is not below max_steps=4: the learning rate "
                                                   "reaches 6% of 0.0001 at the last update (lower --warmup-steps)")):
        with pytest.raises(DataError, match="training data folder not found"):
            Trainer.create(cfg)


def test_training_with_another_vae_from_a_weights_variant(pipeline_dir, data_dir, tmp_path):
    """--variant fp16 loads a folder's .fp16.safetensors (upcast: fp32 master weights) and --vae
    replaces the model's VAE (a diffusers VAE folder): training encodes with it, and final/ holds it.
    Both are recorded for the resume and the export. No step is compiled: step 0 is exported."""
    import reference as R
    from safetensors.numpy import save_file
    from sdjax import AutoencoderKL, StableDiffusion
    from sdjax.weights import CheckpointError
    model = tmp_path / "fp16-only"
    shutil.copytree(pipeline_dir, model)
    for weights in [*model.glob("*/*.safetensors"), *model.glob("*/*.msgpack")]:
        if weights.suffix == ".safetensors":
            save_file({k: v.astype(np.float16) for k, v in load_file(weights).items()},
                      weights.with_name(weights.stem + ".fp16.safetensors"))
        weights.unlink()
    other_vae = tmp_path / "other-vae"
    R.torch_vae(R.TINY_VAE, seed=1).save_pretrained(other_vae)
    out = tmp_path / "run"
    with pytest.raises(CheckpointError):
        Trainer.create(config(out, model, data_dir))   # only variant files: named with --variant
    trainer = Trainer.create(config(out, model, data_dir, variant="fp16", vae=other_vae, max_steps=1))
    try:
        original = StableDiffusion.from_pretrained(pipeline_dir)
        rounded = jax.tree.map(lambda a: np.asarray(a).astype(np.float16).astype(np.float32), _pure(original.unet))
        unet = trainer.state.params["unet"]
        assert all(a.dtype == np.float32 for a in jax.tree.leaves(unet)) and max_diff(unet, rounded) == 0
        assert max_diff(unet, _pure(original.unet)) > 0                    # the fp16 files were read
        vae = _pure(AutoencoderKL.from_pretrained(other_vae))
        assert max_diff(trainer.frozen.vae, vae) == 0                      # the training images' encoder
        trainer.save_checkpoint()
    finally:
        trainer.close()
    recorded = json.loads((out / "train_config.json").read_text())
    assert (recorded["variant"], recorded["vae"]) == ("fp16", str(other_vae))
    exporter = Trainer.for_export(TrainConfig.from_run(out))
    try:
        final = exporter.export()
    finally:
        exporter.close()
    assert max_diff(_pure(AutoencoderKL.from_pretrained(final / "vae")), vae) == 0


def test_another_prediction_type_is_trained_and_exported(pipeline_dir, data_dir, tmp_path):
    """--prediction-type v_prediction on an epsilon model: the step's target, the samples' scheduler
    config and the exported final/ all say v_prediction (diffusers' script exports the old config).
    No step is compiled: a checkpoint of step 0 is exported."""
    out = tmp_path / "v"
    trainer = Trainer.create(config(out, pipeline_dir, data_dir, prediction_type="v_prediction", max_steps=1))
    try:
        model_config = json.loads((pipeline_dir / "scheduler" / "scheduler_config.json").read_text())
        assert model_config.get("prediction_type", "epsilon") == "epsilon"
        assert trainer.step_cfg.prediction_type == "v_prediction"
        assert trainer.sampling_pipeline().scheduler_config["prediction_type"] == "v_prediction"
        trainer.save_checkpoint()
    finally:
        trainer.close()
    exporter = Trainer.for_export(TrainConfig.from_run(out))
    try:
        final = exporter.export()
    finally:
        exporter.close()
    assert json.loads((final / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "v_prediction"
    # the single file has no place to say so: the export warns, naming the way to load it
    exporter = Trainer.for_export(TrainConfig.from_run(out, export_single_file="float16"))
    try:
        with pytest.warns(UserWarning, match=re.escape("final.safetensors holds a v_prediction model, which nothing "
                                                       f"in the file says: load it with final/'s configs (sdjax: "
                                                       f"--model-config {final}, the default beside it;")):
            exporter.export()
    finally:
        exporter.close()
    assert (out / "final.safetensors").is_file()


# ----------------------------------------------------------------------------- 8. presets
def test_resume_with_the_runs_own_preset_of_relative_paths(tmp_path, monkeypatch):
    """A preset that names the model and data by relative paths starts a run (recorded with absolute
    paths) and, given again, resumes and exports it: its paths are compared as the record holds them."""
    (tmp_path / "models" / "base").mkdir(parents=True)
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    preset = tmp_path / "mine.yaml"
    preset.write_text("model: models/base\ntrain_data: ./data\nresolution: 32\n")
    started, _ = parse_args(["--config", "./mine.yaml", "--output-dir", "run"])
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "train_config.json").write_text(json.dumps(_record(started)))
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["train_data"] == str(tmp_path / "data")
    for mode in ("--resume", "--export"):
        again, args = parse_args(["--config", "./mine.yaml", "--output-dir", "run", mode])
        assert args.recorded and (again.model, again.train_data) == (str(tmp_path / "models" / "base"),
                                                                     str(tmp_path / "data"))
    preset.write_text("model: models/base\ntrain_data: ./other\nresolution: 32\n")   # another folder: refused
    with pytest.raises(UsageError, match=re.escape(f"train_data ('./other', recorded '{tmp_path / 'data'}')")):
        parse_args(["--config", "./mine.yaml", "--output-dir", "run", "--resume"])


def test_resume_and_export_take_the_recorded_settings(tmp_path):
    """--resume/--export: flags > the run's train_config.json > a preset > the defaults; a new run
    ignores the file."""
    out = tmp_path / "run"
    out.mkdir()
    recorded = dataclasses.asdict(TrainConfig(model="base", train_data="data", output_dir="elsewhere",
                                              learning_rate=5e-5, random_flip=False, max_steps=100))
    (out / "train_config.json").write_text(json.dumps(recorded))
    resumed, args = parse_args(["--output-dir", str(out), "--resume", "--max-steps", "200"])
    assert args.recorded == out / "train_config.json" and resumed.resume
    assert (resumed.model, resumed.train_data, resumed.output_dir) == ("base", "data", str(out))
    assert (resumed.learning_rate, resumed.random_flip, resumed.max_steps) == (5e-5, False, 200)
    # A preset below the record would do nothing where it differs from it: an error naming those keys
    # and the flags that would change them (keys set as flags, or equal to the record, are fine).
    with pytest.raises(UsageError) as refused:
        parse_args(["--output-dir", str(out), "--resume", "--config", "style", "--random-flip", "--max-steps", "200"])
    message = str(refused.value)
    assert message.startswith(f"--config style: with --resume, the settings recorded in {out / 'train_config.json'}")
    for key, flag in [("learning_rate", "--learning-rate 1e-05"), ("ema_decay", "--ema-decay 0.9999"),
                      ("caption_dropout", "--caption-dropout 0.1"), ("warmup_steps", "--warmup-steps 50")]:
        assert key in message and flag in message, key
    assert "random_flip" not in message and "max_steps" not in message
    assert "leave out --config (the record already holds the settings the run was started with)" in message
    style = load_train_config(CONFIG_DIR / "style.yaml")
    (out / "train_config.json").write_text(json.dumps({**recorded, **style}))
    resumed, _ = parse_args(["--output-dir", str(out), "--resume", "--config", "style"])   # the run's own preset
    assert (resumed.learning_rate, resumed.ema_decay) == (1e-5, 0.9999)
    (out / "train_config.json").write_text(json.dumps(recorded))
    exported, args = parse_args(["--output-dir", str(out), "--export"])
    assert args.recorded and exported.learning_rate == 5e-5
    (out / "train_config.json").write_text(json.dumps({**recorded, "export_single_file": "float16"}))
    assert parse_args(["--output-dir", str(out), "--export"])[0].export_single_file == "float16"
    for off in ("none", "null"):   # an optional text setting turned off from the command line
        assert parse_args(["--output-dir", str(out), "--export", "--export-single-file", off])[0].export_single_file \
            is None
    (out / "train_config.json").write_text(json.dumps(recorded))
    fresh, args = parse_args(["--output-dir", str(out), "--train-data", "other"])
    assert args.recorded is None and (fresh.learning_rate, fresh.train_data) == (TrainConfig.learning_rate, "other")
    (out / "train_config.json").write_text(json.dumps({**recorded, "learning_rat": 1}))
    with pytest.raises(UsageError, match="train_config.json: unknown key 'learning_rat'"):
        parse_args(["--output-dir", str(out), "--resume"])


def test_a_bad_value_from_a_preset_names_the_file_and_key(tmp_path):
    """A value out of range in a preset is named by the file and key (as sample.py does), not by a
    flag that was not given; the flag is named when it is the flag's value."""
    preset = tmp_path / "p.yaml"
    preset.write_text("resolution: 30\nseed: 4294967296\n")
    with pytest.raises(UsageError, match=re.escape(f"{preset}: key 'seed' has value 4294967296: must be <= ")):
        parse_args(["--config", str(preset), "--train-data", "d"])
    with pytest.raises(UsageError, match=re.escape(f"{preset}: key 'resolution' has value 30: must be a multiple of 8")):
        parse_args(["--config", str(preset), "--train-data", "d", "--seed", "1"])
    with pytest.raises(UsageError, match=re.escape("resolution=31 must be a multiple of 8 (--resolution)")):
        parse_args(["--config", str(preset), "--train-data", "d", "--resolution", "31", "--seed", "1"])


def test_training_presets_and_their_documentation():
    style, _ = parse_args(["--config", "style", "--train-data", "data"])
    assert (style.learning_rate, style.max_steps, style.ema_decay, style.caption_dropout) == (1e-5, 1000, 0.9999, 0.1)
    assert (style.center_crop, style.random_flip, style.resolution) == (True, True, 512)
    assert (style.checkpoint_every, style.sample_every) == (250, 250)
    low, _ = parse_args(["--config", "low_memory", "--train-data", "data", "--gradient-accumulation", "8"])
    assert (low.gradient_checkpointing, low.mixed_precision, low.batch_size) == (True, "bf16", 1)
    assert low.gradient_accumulation == 8                            # the flag wins over the preset's 4
    lora, _ = parse_args(["--config", "lora", "--train-data", "data"])
    assert (lora.lora_rank, lora.lora_alpha, lora.learning_rate, lora.max_steps) == (16, None, 1e-4, 1500)
    for name in ("style", "low_memory", "lora"):
        lines = (ROOT / "configs" / "train" / f"{name}.yaml").read_text().splitlines()
        keys = [i for i, line in enumerate(lines) if line and not line.startswith(("#", " ", "-"))]
        assert keys
        for i in keys:   # every key has its own comment
            assert lines[i - 1].startswith("#") or "#" in lines[i], (name, lines[i])
    readme = (ROOT / "configs" / "README.md").read_text()
    assert "# Sampling presets" in readme and "Training presets" in readme
    training_part = readme[readme.index("Training presets"):]
    for field in dataclasses.fields(TrainConfig):
        assert f"`{field.name}`" in training_part, field.name


def test_a_checkpoint_whose_ema_held_the_unet_alone_still_restores(tmp_path):
    """Checkpoints written before the EMA covered every trained model hold the UNet's EMA tree
    alone; they restore into today's state (EMA {"unet": ..., "text_encoder": ...}), the text
    encoder's EMA starting from its checkpointed weights, with a warning. Anything else that does
    not fit is still refused."""
    import optax
    from sdjax.training import loop
    rng = np.random.default_rng(0)
    params = {"unet": {"w": rng.normal(size=(8, 4)).astype(np.float32)},
              "text_encoder": {"e": rng.normal(size=(6, 2)).astype(np.float32)}}
    old = S.init_state(jax.tree.map(jax.numpy.asarray, params), optax.sgd(0.1), seed=0, ema=True)
    old = old._replace(ema={"w": jax.numpy.full((8, 4), 7.0)}, step=jax.numpy.int32(5))   # the old layout
    checkpoints = Checkpointer(tmp_path / "checkpoints", async_save=False)
    checkpoints.save(5, old, {"epoch": 0})
    checkpoints.wait()

    template = S.init_state(jax.tree.map(lambda a: jax.numpy.zeros_like(a), params), optax.sgd(0.1), seed=0, ema=True)
    cfg = TrainConfig(train_data="unused", output_dir=str(tmp_path), ema_decay=0.9, train_text_encoder=True)
    with pytest.warns(UserWarning, match="whose EMA held the UNet alone; the text encoder's EMA starts from its"):
        state, position = loop._restore(checkpoints, template, None, cfg, None, "--resume-step")
    assert int(state.step) == 5 and position == {"epoch": 0}
    np.testing.assert_array_equal(state.ema["unet"]["w"], np.full((8, 4), 7.0))
    np.testing.assert_array_equal(state.ema["text_encoder"]["e"], params["text_encoder"]["e"])
    np.testing.assert_array_equal(state.params["text_encoder"]["e"], params["text_encoder"]["e"])

    other = template._replace(params={"unet": {"w": jax.numpy.zeros((8, 5))}, "text_encoder": template.params[
        "text_encoder"]}, ema={"unet": {"w": jax.numpy.zeros((8, 5))}, "text_encoder": template.ema["text_encoder"]})
    with pytest.raises(UsageError, match="does not fit this run's model and settings"):
        loop._restore(checkpoints, other, None, cfg, None, "--resume-step")
    checkpoints.close()


def test_a_lora_checkpoint_with_ema_that_does_not_fit_is_refused_by_name(tmp_path):
    """A LoRA run's checkpoint (EMA {"lora": ...}) restored into a state of other shapes (--resume or
    --export with another --model): the UsageError naming what to keep, not a KeyError from the
    fallback for the old UNet-only EMA layout, which a LoRA state never had (found by resuming a
    rank-2 LoRA run with EMA on a model of other widths)."""
    import optax
    from sdjax.training import loop

    def lora_state(width):
        params = {"lora": {"lora_unet_x_to_q": {"down": np.ones((width, 2), np.float32),
                                                "up": np.zeros((2, width), np.float32)}}}
        return S.init_state(jax.tree.map(jax.numpy.asarray, params), optax.sgd(0.1), seed=0, ema=True)
    checkpoints = Checkpointer(tmp_path / "checkpoints", async_save=False)
    checkpoints.save(3, lora_state(4), {"epoch": 0})
    checkpoints.wait()
    cfg = TrainConfig(train_data="unused", output_dir=str(tmp_path), ema_decay=0.9, lora_rank=2)
    try:
        with pytest.raises(UsageError, match="does not fit this run's model and settings"):
            loop._restore(checkpoints, lora_state(6), None, cfg, None, "--resume-step")
    finally:
        checkpoints.close()


def test_the_checkpoint_module_imports_where_orbax_moved_its_private_asyncio_helpers():
    """sdjax patches a function of Orbax's private asyncio_utils (a save cut short, cleaned up); an
    Orbax that moved that module must cost only that clean-up, not train.py's import."""
    code = ("import sys, orbax.checkpoint, orbax.checkpoint._src as src; del src.asyncio_utils; "
            "sys.modules['orbax.checkpoint._src.asyncio_utils'] = None; "
            "import sdjax.training.checkpoint as c, sdjax.training; print(c._orbax_asyncio)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 0 and done.stdout.split() == ["None"], done.stderr[-2000:]


def test_a_ctrl_c_during_a_save_logs_no_orbax_traceback(caplog):
    """Orbax logs ERROR with a traceback when a KeyboardInterrupt passes through its wait for a
    save; train.py's one line says where the run stopped, so that record is dropped. Other errors
    are logged as before."""
    import logging
    absl = logging.getLogger("absl")
    for error in (KeyboardInterrupt(), ValueError("disk")):
        try:
            raise error
        except BaseException:
            absl.exception("Save Finalize thread (save_finalize) failed.")
    assert [r.exc_info[0] for r in caplog.records if r.name == "absl"] == [ValueError]


# ----------------------------------------------------------------------------- LoRA
LORA = dict(lora_rank=2, lora_alpha=4.0, train_text_encoder=True, learning_rate=1e-2)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, pipeline_dir, data_dir):
    """train.py --lora-rank 2 --lora-alpha 4 --train-text-encoder: 2 updates on 8 devices (EMA 0.9,
    accumulation 2, checkpoints at 1 and 2)."""
    out = tmp_path_factory.mktemp("lora") / "run"
    rc, stdout, stderr = run_train_py(flags(**{**BASE, **LORA}, model=pipeline_dir, train_data=data_dir,
                                            output_dir=out, max_steps=2, checkpoint_every=1))
    assert rc == 0, stderr
    return dict(out=out, stdout=stdout)


def _lora_weights(pair_tree: dict, base_unet: dict, base_text: dict, scale: float) -> dict:
    """{"unet", "text_encoder"}: torch-layout state dicts of the base models with each LoRA module's
    ``scale * (down @ up)`` added to its kernel, found by its kohya name, derived here in float64."""
    from sdjax.weights import to_torch_layout, torch_key
    out = {}
    for part, base in (("unet", base_unet), ("text_encoder", base_text)):
        weights = {}
        for key, value in flat(base).items():
            path = tuple(int(p) if p.isdigit() else p for p in key.split("/"))
            module = torch_key(path)[:-len(".weight")].replace(".", "_")
            name = ("lora_unet_" if part == "unet" else "lora_te_") + module
            value = np.asarray(value, np.float64)
            if path[-1] == "kernel" and name in pair_tree:
                pair = pair_tree[name]
                value = value + scale * np.asarray(pair["down"], np.float64) @ np.asarray(pair["up"], np.float64)
            weights[torch_key(path)] = to_torch_layout(value, path)
        out[part] = weights
    return out


def test_a_lora_run_trains_saves_and_exports_the_lora_alone(lora_run, pipeline_dir):
    """A LoRA run's checkpoints hold the LoRA (and its EMA) alone: rank-2 pairs for the micro UNet's
    attention projections (its mid block: attn1 and attn2, 4 each) and the text encoder's (1 layer,
    4); final/pytorch_lora_weights.safetensors is their EMA in kohya's layout, and diffusers'
    ``load_lora_weights(final) + fuse_lora`` and sdjax's ``fuse_lora`` both give the base weights plus
    ``alpha / rank * down @ up``, derived here from the checkpoint: the LoRA modules' kernels change,
    nothing else."""
    import torch
    from diffusers import StableDiffusionPipeline
    from sdjax import StableDiffusion
    from sdjax.weights import to_torch_layout, torch_key

    out = lora_run["out"]
    file = out / "final" / "pytorch_lora_weights.safetensors"
    assert f"done: 2 steps; LoRA exported to {file}" in lora_run["stdout"]
    assert complete_steps(out) == [1, 2] and sorted(p.name for p in (out / "final").iterdir()) == [file.name]
    saved = saved_state(out, 2)
    assert set(saved["params"]) == set(saved["ema"]) == {"lora"}
    names = sorted(saved["params"]["lora"])
    assert len(names) == 12 and sum(n.startswith("lora_te_text_model_encoder_layers_0_self_attn_") for n in names) == 4
    assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0" in names
    assert {a.shape[1] for pair in saved["params"]["lora"].values() for a in [pair["down"]]} == {2}
    assert max_diff(saved["ema"], saved["params"]) > 1e-4      # the export is the EMA, not the raw weights

    tensors = load_file(str(file))
    assert len(tensors) == 3 * 12 and {float(v) for k, v in tensors.items() if k.endswith(".alpha")} == {4.0}

    base = StableDiffusion.from_pretrained(pipeline_dir)
    base_unet, base_text = (nnx.to_pure_dict(nnx.state(m, nnx.Param)) for m in (base.unet, base.text_encoder))
    want = _lora_weights(saved["ema"]["lora"], base_unet, base_text, scale=4.0 / 2)
    reference = StableDiffusionPipeline.from_pretrained(pipeline_dir, safety_checker=None)
    before = {part: {k: v.clone() for k, v in getattr(reference, part).state_dict().items()}
              for part in ("unet", "text_encoder")}
    reference.load_lora_weights(out / "final")
    reference.fuse_lora(lora_scale=1.0)
    reference.unload_lora_weights()
    base.fuse_lora(file)
    for part in ("unet", "text_encoder"):
        theirs = getattr(reference, part).state_dict()   # (transformers 5's CLIPTextModel: no "text_model.")
        theirs = {k if k in want[part] else "text_model." + k: v for k, v in theirs.items()}
        before[part] = {k if k in want[part] else "text_model." + k: v for k, v in before[part].items()}
        ours = {torch_key(path): to_torch_layout(np.asarray(v), path) for k, v in
                flat(nnx.to_pure_dict(nnx.state(getattr(base, part), nnx.Param))).items()
                for path in [tuple(int(p) if p.isdigit() else p for p in k.split("/"))]}
        changed = {k for k in theirs if not torch.equal(theirs[k], before[part][k])}
        assert len(changed) == (8 if part == "unet" else 4), part
        for key, value in want[part].items():
            np.testing.assert_allclose(theirs[key].numpy(), value, atol=2e-6, err_msg=key)
            np.testing.assert_allclose(ours[key], value, atol=2e-6, err_msg=key)


def test_a_resumed_lora_run_equals_the_uninterrupted_one(lora_run, pipeline_dir, data_dir, tmp_path):
    """1 update, then --resume to 2: the LoRA, its EMA and the optimizer state equal the uninterrupted
    run's; the loaded models are never trained (a resume restores the LoRA alone)."""
    out = tmp_path / "run"
    argv = flags(**{**BASE, **LORA}, model=pipeline_dir, train_data=data_dir, output_dir=out, checkpoint_every=1)
    assert run_train_py([*argv, "--max-steps", "1"])[0] == 0
    rc, stdout, stderr = run_train_py(["--output-dir", out, "--resume", "--max-steps", "2"])
    assert rc == 0, stderr
    ours, uninterrupted = saved_state(out, 2), saved_state(lora_run["out"], 2)
    for part in ("params", "ema", "opt_state"):
        assert max_diff(ours[part], uninterrupted[part]) <= 1e-6, part
    assert [r["loss"] for r in metrics(out)] == [r["loss"] for r in metrics(lora_run["out"])]


def test_a_lora_resume_or_export_with_another_alpha_or_rank_is_refused_before_the_model_loads(lora_run, monkeypatch):
    """alpha / rank scales every change the LoRA learned: a resume or export with another alpha (the
    rank's default included) would change the model it trained, so it is refused, as another rank
    is, before the model loads and with nothing written; the same alpha spelled out is taken."""
    from sdjax.training import loop
    out = lora_run["out"]
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")
    monkeypatch.setattr(loop, "_build_model", no_model)
    for change, message in ((dict(lora_alpha=8.0), "its LoRA was trained with alpha 4 (now 8)"),
                            (dict(lora_alpha=None), "its LoRA was trained with alpha 4 (now 2)"),
                            (dict(lora_rank=4), "the run that saved it had lora_rank=2 (now 4)")):
        with pytest.raises(UsageError, match=re.escape(message)):
            Trainer.create(TrainConfig.from_run(out, max_steps=3, **change))
        with pytest.raises(UsageError, match=re.escape(message)):
            Trainer.for_export(TrainConfig.from_run(out, **change))
    with pytest.raises(AssertionError, match="the model was loaded"):
        Trainer.for_export(TrainConfig.from_run(out, lora_alpha=4))
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_a_lora_resume_or_export_refuses_a_folder_holding_other_files(lora_run, tmp_path, monkeypatch):
    """A LoRA export writes its file alone in its folder: into one holding other files it is refused
    (FileExistsError, nothing written), and a resume or train.py --export whose final/ holds them is refused
    before the model loads, not once trained; an export to a new folder is the run's final/ file."""
    from sdjax.training import loop
    out = lora_run["out"]
    stray = out / "final" / "notes.txt"
    stray.write_text("mine")
    try:
        def no_model(*args, **kwargs):
            raise AssertionError("the model was loaded before the refusal")
        monkeypatch.setattr(loop, "_build_model", no_model)
        with pytest.raises(UsageError, match=re.escape(f"{out / 'final'} holds notes.txt: a LoRA export writes "
                                                       "pytorch_lora_weights.safetensors alone in its folder, and "
                                                       "this run exports there once trained")):
            Trainer.create(TrainConfig.from_run(out, max_steps=3))
        rc, _, stderr = run_train_py(["--output-dir", out, "--export"])   # (train.py --export: before loading too)
        assert rc == 2, stderr
        assert stderr.strip().endswith(f"--export: {out / 'final'} holds notes.txt: a LoRA export writes "
                                       "pytorch_lora_weights.safetensors alone in its folder"), stderr
        monkeypatch.undo()
        busy = tmp_path / "busy"
        busy.mkdir()
        (busy / "a.txt").write_text("")
        with Trainer.for_export(TrainConfig.from_run(out)) as trainer:
            for directory in (busy, None):
                with pytest.raises(FileExistsError, match="alone in its folder; export to a new or empty folder"):
                    trainer.export(directory)
            assert trainer.export(tmp_path / "new") == tmp_path / "new"
        assert sorted(p.name for p in busy.iterdir()) == ["a.txt"]
        assert sorted(p.name for p in (out / "final").iterdir()) == ["notes.txt", "pytorch_lora_weights.safetensors"]
        file = "pytorch_lora_weights.safetensors"
        new, final = load_file(str(tmp_path / "new" / file)), load_file(str(out / "final" / file))
        assert sorted(new) == sorted(final) and all(np.array_equal(new[k], final[k]) for k in final)
    finally:
        stray.unlink()


def test_a_lora_export_killed_while_writing_does_not_block_the_next_one(tmp_path):
    """A LoRA export killed while writing (SIGKILL: no clean-up) leaves atomic_write's temporary
    ``.pytorch_lora_weights.safetensors.<hex>.tmp`` in final/. That leftover, never a file of the
    user's, made every later --export and --resume refuse the folder as holding other files (found by
    leaving one there and exporting). It is now left out of that check and removed by the next
    export; a file of the user's is still refused."""
    import types
    import uuid
    from sdjax.training import lora, loop
    final = tmp_path / "final"
    final.mkdir()
    leftover = final / f".pytorch_lora_weights.safetensors.{uuid.uuid4().hex}.tmp"
    leftover.write_bytes(b"\0" * 100)   # cut short
    assert loop.lora_export_problem(final) is None
    down, up = np.ones((4, 2), np.float32), np.full((2, 3), 0.5, np.float32)
    trainer = types.SimpleNamespace(step_cfg=types.SimpleNamespace(lora=lora.LoraSpec(rank=2, alpha=2.0, targets=())),
                                    out=tmp_path, state=types.SimpleNamespace(step=7))
    assert Trainer._export_lora(trainer, final, {"lora_unet_x_to_q": {"down": down, "up": up}}) == final
    assert sorted(p.name for p in final.iterdir()) == ["pytorch_lora_weights.safetensors"]
    written = load_file(str(final / "pytorch_lora_weights.safetensors"))
    np.testing.assert_array_equal(written["lora_unet_x_to_q.lora_down.weight"], down.T)
    (final / "notes.txt").write_text("mine")
    assert loop.lora_export_problem(final) == (f"{final} holds notes.txt: a LoRA export writes "
                                                "pytorch_lora_weights.safetensors alone in its folder")


@pytest.mark.slow   # compiles the LoRA step for one device, ~60 s
def test_a_lora_run_on_one_device_equals_eight(lora_run, pipeline_dir, data_dir, tmp_path):
    """Global batch 16: 8 x 1 device x 2 micro-batches == lora_run's 1 x 8 devices x 2: the same
    losses, LoRA, EMA (split over 8 devices there, whole here) and exported file."""
    out = tmp_path / "one"
    with Trainer.create(config(out, pipeline_dir, data_dir, **LORA, batch_size=8, max_steps=2, checkpoint_every=1),
                        mesh=parallel.data_mesh(jax.devices()[:1])) as one:
        one.run(progress=False)
        assert one.export() == out / "final"
    np.testing.assert_allclose([r["loss"] for r in metrics(out)], [r["loss"] for r in metrics(lora_run["out"])],
                               rtol=1e-5)
    ours, reference = saved_state(out, 2), saved_state(lora_run["out"], 2)
    for part in ("params", "ema"):
        assert max_diff(ours[part], reference[part]) <= 1e-5, part
    file = "final/pytorch_lora_weights.safetensors"
    exported, want = load_file(str(out / file)), load_file(str(lora_run["out"] / file))
    assert sorted(exported) == sorted(want)
    assert max(float(np.max(np.abs(exported[k] - want[k]))) for k in want) <= 1e-5


@pytest.mark.slow   # two processes compile the LoRA step (twice; a cache makes the second a load), ~150 s
def test_two_processes_train_resume_and_export_a_lora_as_one(lora_run, pipeline_dir, data_dir, tmp_path):
    """A LoRA run with EMA on 2 processes x 4 CPU devices, 1 update then a resume to 2 with `train`:
    the same losses, LoRA, EMA and exported file as the one-process 8-device run. The export gathers
    the EMA's arrays, split over the devices of both processes, with a collective every process
    joins; only process 0 writes the file."""
    out = tmp_path / "run"
    first = dataclasses.asdict(config(out, pipeline_dir, data_dir, **LORA, max_steps=1, checkpoint_every=1))
    then = {**first, "max_steps": 2, "resume": True}
    logs = run_two_processes(MULTIHOST_TRAIN_WORKER, tmp_path, json.dumps([first, then]), tmp_path / "jax-cache",
                             timeout=900)
    assert f"EXPORTED {out / 'final'}" in logs[0] and "EXPORTED None" in logs[1]
    assert complete_steps(out) == [1, 2]
    np.testing.assert_allclose([r["loss"] for r in metrics(out)], [r["loss"] for r in metrics(lora_run["out"])],
                               rtol=1e-5)
    ours, reference = saved_state(out, 2), saved_state(lora_run["out"], 2)
    for part in ("params", "ema"):   # (gloo's reductions: another order than one process's)
        assert max_diff(ours[part], reference[part]) <= 1e-5, part
    file = "final/pytorch_lora_weights.safetensors"
    assert sorted(p.name for p in (out / "final").iterdir()) == ["pytorch_lora_weights.safetensors"]
    exported, want = load_file(str(out / file)), load_file(str(lora_run["out"] / file))
    assert sorted(exported) == sorted(want)
    assert max(float(np.max(np.abs(exported[k] - want[k]))) for k in want) <= 1e-5
    for name, pair in ours["ema"]["lora"].items():   # the EMA, gathered whole
        np.testing.assert_array_equal(exported[f"{name}.lora_down.weight"], np.asarray(pair["down"]).T)


def test_a_bf16_lora_run_holds_the_frozen_models_in_bf16(pipeline_dir, data_dir, tmp_path):
    """With --mixed-precision bf16 a LoRA run loads the models it does not train in bf16 (half the
    memory; the step casts nothing): the pipeline's and the step's frozen weights are bf16, the LoRA and
    its optimizer state float32. (The losses and the export equal those of the same run with fp32-loaded
    models cast in the step, bit for bit: BENCHMARKS.md, "LoRA training on the CPU".)"""
    import jax.numpy as jnp
    trainer = Trainer.create(config(tmp_path / "run", pipeline_dir, data_dir, lora_rank=2, mixed_precision="bf16"))
    try:
        frozen = [trainer.frozen.unet, trainer.frozen.text_encoder, trainer.frozen.vae,
                  *(nnx.to_pure_dict(nnx.state(m, nnx.Param)) for m in (trainer.pipe.unet, trainer.pipe.vae))]
        assert {a.dtype for tree in frozen for a in jax.tree.leaves(tree)} == {jnp.dtype(jnp.bfloat16)}
        assert {a.dtype for a in jax.tree.leaves((trainer.state.params, trainer.state.opt_state))
                if jnp.issubdtype(a.dtype, jnp.floating)} == {jnp.dtype(jnp.float32)}
    finally:
        trainer.close()
