"""The GPU session runner's own logic (benchmarks/gpu_session.py): which carried wheels it
installs, the goals check, that a stage over its time limit is stopped with its children, and
that the sdjax stages are skipped where sdjax cannot be imported; and the GPU-only branches of the
scripts it runs, on the CPU with fakes (FLOP counts, trace summary, out-of-memory batches)."""
import json
import os
import sys
import textwrap
import time
from importlib.metadata import version
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_session as G  # noqa: E402
from conftest import skip_unless_flax_needs_hiprimitive  # noqa: E402


def test_wheels_to_install_takes_only_what_is_missing(tmp_path):
    have = version("diffusers")  # the test extra pins it, so this version meets pyproject.toml
    for name in (f"diffusers-{have}-py3-none-any.whl", "no_such_package_sdjax-1.0-py3-none-any.whl"):
        (tmp_path / name).write_bytes(b"")
    chosen, kept = G.wheels_to_install(tmp_path)
    assert [w.name for w in chosen] == ["no_such_package_sdjax-1.0-py3-none-any.whl"]
    assert kept == {"diffusers": have}


def test_wheels_to_install_refuses_an_empty_folder(tmp_path):
    with pytest.raises(SystemExit, match="no .whl files"):
        G.wheels_to_install(tmp_path)


def row(impl, batch, images_per_s, mfu=None):
    return {"impl": impl, "batch": batch, "images_per_s": images_per_s, "mfu_pct": mfu}


def test_goals_compare_the_best_sdjax_variant_with_diffusers():
    rows = [row("diffusers", 1, 1.0), row("sdjax-cudnn", 1, 0.9, 10.0), row("sdjax-xla", 1, 1.1, 12.0),
            row("diffusers", 16, 2.0), row("sdjax-cudnn", 16, 2.8, 45.0),        # 1.4x, 45%: met
            row("diffusers", 64, 2.0), row("sdjax-cudnn", 64, 3.0, 35.0),        # 1.5x but 35% MFU: missed
            row("diffusers", 4, 1.5), row("sdjax-cudnn", 4, 1.0, 20.0),          # no goal at batch 4
            {"impl": "sdjax-cudnn", "batch": 32, "error": "out of memory"}, row("diffusers", 32, 2.0)]
    g = {t["batch"]: t for t in G.goals(rows)["per_batch"]}
    assert g[1]["sdjax_impl"] == "sdjax-xla" and g[1]["ratio"] == pytest.approx(1.1) and g[1]["met"] is True
    assert g[16]["ratio"] == pytest.approx(1.4) and g[16]["met"] is True
    assert g[64]["met"] is False
    assert g[4]["met"] is None
    assert 32 not in g  # sdjax failed there: no comparison
    assert any(line.startswith("batch 32: only diffusers") for line in G.goals(rows)["lines"])


def test_a_stage_over_its_limit_is_stopped_with_its_children(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    script = tmp_path / "stage.py"
    script.write_text(textwrap.dedent(f"""
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        open({str(pid_file)!r}, "w").write(str(child.pid))
        time.sleep(120)
    """))
    stage = G.Stage("sleepy", str(script), [], needs_s=0, child_timeout=False)
    t0 = time.monotonic()
    status, _ = G.run_stage(stage, 5, tmp_path / "out.json")
    assert status.startswith("stopped") and time.monotonic() - t0 < 30
    pid = int(pid_file.read_text())
    for _ in range(50):  # the orphan is reaped by init shortly after the kill
        try:
            os.kill(pid, 0)
            state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
            if state == "Z":
                break
        except (ProcessLookupError, FileNotFoundError):
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the stage's child process {pid} outlived the stage's time limit")


@pytest.mark.parametrize("dry_run", [False, True])
@pytest.mark.parametrize("plan", ["sample", "train"])
def test_every_stage_parses_with_its_script(plan, dry_run):
    """A flag a script does not take would stop that stage on the GPU, where time is short."""
    import importlib
    stages = G.plan(plan, dry_run, 123.0, "/tmp/some-workdir")
    assert stages and len({s.name for s in stages}) == len(stages)
    for stage in stages:
        script = importlib.import_module(stage.script.removesuffix(".py"))
        extra = ["--output", "/tmp/x.json"] + (["--child-timeout", "100"] if stage.child_timeout else [])
        args = script.parse_args(stage.args + extra)
        assert args.dry_run is dry_run
        if hasattr(args, "workdir"):  # the folder the session's prep built
            assert args.workdir == "/tmp/some-workdir"
        if hasattr(args, "peak_tflops"):
            assert args.peak_tflops == 123.0


def test_an_unknown_stage_name_stops_before_any_work(tmp_path):
    with pytest.raises(SystemExit, match="nope: the train plan's stages are train-sdjax-remat-off-b8"):
        G.main(["train", "--only", "nope", "--workdir", str(tmp_path)])
    assert not any(tmp_path.iterdir())  # no folder built, nothing measured


def test_the_session_asks_a_child_whether_sdjax_imports(tmp_path, monkeypatch):
    """As on a machine whose flax was not made for its jax (flax 0.12.9 under jax 0.11.2)."""
    skip_unless_flax_needs_hiprimitive()
    (tmp_path / "sitecustomize.py").write_text("import jax.experimental.hijax as h\ndel h.HiPrimitive\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    env = G.env_of_children()
    assert env["versions"]["flax"] == version("flax")
    assert env["sdjax_error"].startswith("import sdjax: ImportError: sdjax needs flax.nnx, but flax")


def test_the_session_asks_a_child_whether_sdjax_samples(tmp_path, monkeypatch):
    """sdjax imports, but a flax that behaves otherwise (here: nnx.merge refuses what sdjax passes)
    breaks loading or sampling: the child's tiny pipeline finds it before any stage runs."""
    assert "sdjax_error" not in G.env_of_children()
    (tmp_path / "sitecustomize.py").write_text(
        "from flax import nnx\n"
        "def merge(*args, **kwargs):\n    raise TypeError('merge takes other arguments in this flax')\n"
        "nnx.merge = merge\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    assert G.env_of_children()["sdjax_error"] == ("a tiny random pipeline built, loaded and sampled from on the CPU: "
                                                  "TypeError: merge takes other arguments in this flax")


def test_without_sdjax_only_the_pytorch_stages_run(tmp_path, monkeypatch):
    error = "ImportError: sdjax needs flax.nnx, but ..."
    monkeypatch.setattr(G, "env_of_children", lambda: {**G.C.env_info(), "sdjax_error": error})
    monkeypatch.setattr(G, "prepare", lambda *a: {})
    ran = []
    monkeypatch.setattr(G, "run_stage", lambda stage, seconds, out: ran.append(stage.name) or ("ok", 0.0))
    out = tmp_path / "session.json"
    for plan in ("sample", "train"):
        G.main([plan, "--workdir", str(tmp_path), "--output", str(out)])
        stages = json.loads(out.read_text())["stages"]
        assert {n for n, st in stages.items() if st["status"] == "ok"} == {
            s.name for s in G.plan(plan, False, None, str(tmp_path)) if not s.uses_sdjax}
        assert all(st["status"] == f"skipped: sdjax does not work here ({error})"
                   for st in stages.values() if st["status"] != "ok")
    assert ran == ["sample-diffusers", "train-torch-remat-off-b8", "train-torch-remat-on-b16"]


def test_the_readme_tiny_pipeline_builds_without_torch_and_keeps_other_folders(tmp_path):
    """README's way to try sdjax without the weights, `benchmarks/common.py build --size tiny`,
    runs on a plain install (here torch cannot be imported), writes only the folder asked for, and
    refuses a folder with other files unless --overwrite."""
    import subprocess
    from sdjax.pipeline import StableDiffusion
    no_torch = tmp_path / "no-torch" / "torch"
    no_torch.mkdir(parents=True)
    (no_torch / "__init__.py").write_text("raise ImportError('torch is not installed')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(no_torch.parent), os.environ.get("PYTHONPATH", "")]),
           "JAX_PLATFORMS": "cpu"}
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "common.py"

    def build(directory, *extra):
        return subprocess.run([sys.executable, str(script), "build", "--size", "tiny", "--dir", str(directory),
                               *extra], env=env, capture_output=True, text=True, timeout=300)
    done = build(tmp_path / "work" / "tiny-sd")
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["tiny-sd"]
    pipe = StableDiffusion.from_pretrained(tmp_path / "work" / "tiny-sd")
    assert pipe("a cat", num_inference_steps=1, height=16, width=16).images.shape == (1, 16, 16, 3)

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    refused = build(tmp_path / "mine")
    assert refused.returncode != 0 and "exists and is not empty: pass --overwrite" in refused.stderr
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert build(tmp_path / "mine", "--overwrite").returncode == 0
    assert not (tmp_path / "mine" / "notes.txt").exists() and (tmp_path / "mine" / "model_index.json").is_file()


def test_flop_counts_where_the_gpu_gives_none(monkeypatch):
    """On a GPU (the CUDA plugin: a PJRT C API backend) Lowered.cost_analysis() is None, and cuDNN's
    fused attention is a custom call no cost analysis counts (faked here by a host callback)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax._src.interpreters import pxla

    import gpu_profile as P
    from sdjax.models import layers
    q = jnp.ones((2, 64, 2, 8), jnp.bfloat16)
    attention = lambda: jax.jit(lambda q, k, v: layers.attention(q, k, v))  # noqa: E731 - a fresh trace each
    want = P.C.cost_flops(attention().lower(q, q, q).cost_analysis())
    assert want > 4 * 2 * 64 * 64 * 2 * 8
    monkeypatch.setattr(pxla.xb, "using_pjrt_c_api", lambda backend=None: True)
    assert attention().lower(q, q, q).cost_analysis() is None
    assert P.C.lowered_flops(attention().lower(q, q, q)) == want

    dpa = jax.nn.dot_product_attention

    def fused(q, k, v, *, implementation=None, **kwargs):
        if implementation != "cudnn":
            return dpa(q, k, v, implementation=implementation, **kwargs)
        return jax.pure_callback(lambda *a: np.asarray(dpa(*a)), jax.ShapeDtypeStruct(q.shape, q.dtype), q, k, v)
    monkeypatch.setattr(jax.nn, "dot_product_attention", fused)
    monkeypatch.setattr(layers, "ATTENTION_IMPLEMENTATION", "cudnn")
    f = attention()
    assert P.C.lowered_flops(f.lower(q, q, q)) < 0  # the custom call: unknown
    assert P.flops_of(f, q, q, q, retrace=attention) == want
    assert layers.ATTENTION_IMPLEMENTATION == "cudnn"


def test_the_trace_summary_counts_gpu_kernels_not_their_launches(tmp_path, monkeypatch):
    """A raw GPU trace has no "XLA Ops" line; XLA's annotations tag both the kernel (device plane)
    and its launch (host plane) with hlo_op."""
    import types

    import jax.profiler

    import gpu_profile as P
    tags = {"hlo_op": "fusion.1", "hlo_module": "jit_unet_step"}

    def plane(name, line, event, ns):
        ev = types.SimpleNamespace(name=event, duration_ns=ns, stats=list(tags.items()))
        return types.SimpleNamespace(name=name, lines=[types.SimpleNamespace(name=line, events=[ev])])
    space = types.SimpleNamespace(planes=[plane("/device:GPU:0", "Stream #7(Kernel)", "loop_fusion", 1_000_000),
                                          plane("/host:CPU", "Host Threads/12", "cuLaunchKernel", 3_000_000)])
    monkeypatch.setattr(jax.profiler, "ProfileData", types.SimpleNamespace(from_file=lambda f: space), raising=False)
    (tmp_path / "h.xplane.pb").write_bytes(b"")
    summary = P.summarize_trace(tmp_path, "%fusion.1 = bf16[2]{0} fusion(%p), kind=kLoop, calls=%c")
    assert summary["total_ms"] == 1.0 and summary["source"] == "device plane, kernels tagged hlo_op"


def test_a_sample_batch_out_of_memory_does_not_end_the_others(tmp_path, monkeypatch):
    import types

    import numpy as np

    import gpu_sample as S
    import sdjax

    class Pipe:
        vae_scale, unet = 8, types.SimpleNamespace(config=None)

        def make_scheduler(self, name, steps):
            return types.SimpleNamespace(num_model_calls=steps + 1)

        def __call__(self, prompts, *, batch_size, **kwargs):
            if batch_size == 2:
                raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 123 bytes.")
            if batch_size == 5:
                raise ValueError("not a memory problem")
            return types.SimpleNamespace(images=np.zeros((batch_size, 4, 4, 3), np.float32))
    monkeypatch.setattr(sdjax.StableDiffusion, "from_pretrained", lambda *a, **k: Pipe())
    monkeypatch.setattr(S, "check_attention_impl", lambda *a: [])
    args = S.parse_args(["--child", "--impl", "sdjax-xla", "--batches", "1,2,3,5,4", "--steps", "1",
                         "--resolution", "32", "--repeats", "1", "--warmup", "0", "--pipeline", "x",
                         "--partial", str(tmp_path / "partial.json")])
    rows = S.run_sdjax(args)["rows"]
    assert [(r["batch"], "error" in r) for r in rows] == [(1, False), (2, True), (3, False), (5, True)]


def test_the_random_folder_is_built_by_diffusers_where_sdjax_does_not_import(tmp_path, monkeypatch):
    """Else the PyTorch stages that the session keeps for such a machine would have no folder."""
    skip_unless_flax_needs_hiprimitive()
    fake = tmp_path / "site"
    fake.mkdir()
    (fake / "sitecustomize.py").write_text("import jax.experimental.hijax as h\ndel h.HiPrimitive\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(fake), os.environ.get("PYTHONPATH", "")]))
    folder = G.C.ensure_pipeline(tmp_path / "work", "tiny")
    assert json.loads((folder / "model_index.json").read_text())["scheduler"] == ["diffusers", "PNDMScheduler"]
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_xla_flop_counts_take_xla_attention_not_the_cpu_loop(monkeypatch):
    """The counting child runs on the CPU, where SDJAX_ATTENTION=auto picks the blocked kernel for
    large scores: a loop whose body cost analysis counts once."""
    from sdjax.models import layers
    counts = {}
    for setting in ("xla", "auto"):
        monkeypatch.setattr(layers, "ATTENTION_IMPLEMENTATION", setting)
        counts[setting] = G.C.xla_flops("tiny", 128)["flops"]   # 64x64 latents: 4096 tokens, blocked on the CPU
        assert layers.ATTENTION_IMPLEMENTATION == setting
    assert counts["auto"] == counts["xla"]
    assert counts["auto"]["unet_per_sample"] > 0.95 * G.C.analytic_flops("tiny", 128)["unet_per_sample"]


def test_the_profile_goes_on_when_an_attention_variant_fails(tmp_path, monkeypatch):
    """cuDNN's fused attention can still be refused when XLA compiles the step (after JAX's checks)."""
    import jax.numpy as jnp

    import gpu_profile as P
    from sdjax.models import layers
    monkeypatch.setattr(layers, "ATTENTION_IMPLEMENTATION", layers.ATTENTION_IMPLEMENTATION)  # restored after
    monkeypatch.setattr(P, "build", lambda args: (None, jnp.zeros((2, 4, 4, 4)), None, jnp.zeros((2, 77, 8))))

    def whole_step(unet, x, t, context, *, repeats, label):
        if label == "cudnn":
            raise RuntimeError("INTERNAL: cuDNN could not build the fused attention graph")
        return {"label": label, "compile_s": 1.0, "median_s": 0.01, "min_s": 0.01, "max_s": 0.01, "flops": 1e9,
                "tflops": 0.1, "compiled": None, "state": None, "hlo_text": ""}
    monkeypatch.setattr(P, "whole_step", whole_step)
    blocks = []
    monkeypatch.setattr(P, "time_parts", lambda *a, **k: blocks.append(layers.ATTENTION_IMPLEMENTATION) or [])
    monkeypatch.setattr(P, "print_parts", lambda *a: {})
    out = tmp_path / "profile.json"
    P.main(["--attention", "cudnn,xla", "--no-trace", "--no-hlo-check", "--skip-peak", "--output", str(out)])
    steps = json.loads(out.read_text())["steps"]
    assert [s["label"] for s in steps] == ["cudnn", "xla"] and "cuDNN could not build" in steps[0]["error"]
    assert blocks == ["xla"]


def test_the_xla_stage_takes_on_the_batches_the_cudnn_stage_did_not_measure():
    """cuDNN may refuse its fused attention when XLA compiles the step: sdjax's figures then come from
    XLA's attention, except at batches that ran out of memory."""
    stages = {s.name: s for s in G.plan("sample", False, None, "w")}
    xla, cudnn = stages["sample-sdjax-xla"], stages["sample-sdjax-cudnn"]

    def batches_after(rows):
        session = {"stages": {cudnn.name: {"status": "ok", "result": {"rows": rows}}}}
        args = G.covering(xla, cudnn, session).args
        return args[args.index("--batches") + 1]
    measured = {"images_per_s": 1.0}
    assert batches_after([{"batch": b, **measured} for b in (1, 16, 64, 4)]) == "16"
    assert batches_after([{"batch": 1, **measured}, {"batch": 16, "error": "XlaRuntimeError: INTERNAL: cuDNN"}]) \
        == "16,64,4"
    assert batches_after([{"batch": 1, "error": "JaxRuntimeError: INTERNAL"}]) == "16,1,64,4"
    assert batches_after([{"batch": 1, **measured}, {"batch": 16, **measured},
                          {"batch": 64, "error": "RESOURCE_EXHAUSTED", "out_of_memory": True},
                          {"batch": 4, **measured}]) == "16"
    assert xla.args[xla.args.index("--batches") + 1] == "16"  # the plan's stage itself is left as it was
