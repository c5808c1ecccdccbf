"""The GPU benchmarks as one device-tool call each, under a time budget.

    python3 benchmarks/gpu_session.py sample --wheels .whl --budget 540   # call 1
    python3 benchmarks/gpu_session.py train --wheels .whl --budget 240    # call 2, at once (machine still warm)
    python benchmarks/gpu_session.py sample --dry-run                      # tiny models, any device, minutes

Why: a task that is lent a GPU gets 15 minutes of device time in all, the machine's start (a
minute or more) and every idle wait included, and 10 minutes a command. The scripts beside this one
measure everything the issue asks for, but run one after another with their defaults they need
far longer (every sdjax batch size and every training setting is one XLA compile). So a plan is
a fixed list of stages, ordered by what the goals need, each one of those scripts in its own
process group, given what is left of ``--budget`` as its time limit (``--child-timeout``: a stage
stopped part-way keeps the batches it finished). A stage that cannot start in the time left is
skipped, and the output says so.

Plans:
- ``sample``: prep (the random SD v1.5 folder and the XLA FLOP counts on the CPU, the bf16 matmul
  peak on the GPU, all three at once); diffusers fp16 SDPA, then sdjax bf16 with cuDNN attention,
  each at batches 1,16,64,4 (the goal sizes first; diffusers capped so that sdjax keeps its time);
  sdjax with XLA attention at batch 16 (the attention comparison), if time is left. Two timed
  calls per batch after an untimed first one.
- ``train``: prep; the training step of sdjax and of diffusers/PyTorch at batch 8 per device without
  remat; the profile of one UNet step (cuDNN and XLA attention each timed and traced, time by op
  kind, each block timed alone with cuDNN attention); the training step of both at batch 16 with
  remat, if time is left.

Output: every stage's JSON merged into ``$OUT/session-<plan>.json`` (or ``--output``), the tables,
and the goals check printed last (the device tool returns the end of the output). Tee the output
into ``$OUT/session-<plan>.log`` for the whole log.

``--wheels DIR``: install the wheels carried in DIR (benchmarks/README.md says how to fetch them)
whose package is missing on the machine or fails pyproject.toml's requirement, into a folder put
first on every stage's PYTHONPATH; the others are left alone and named. Then a child imports sdjax
as the stages will and samples from a tiny random pipeline on the CPU; where it cannot (flax 0.12.9 or
older under jax 0.11.2, for one), the sdjax stages are skipped with that error as their status and the
PyTorch stages keep the time (their random folder then built by diffusers: `common.ensure_pipeline`).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

HERE = Path(__file__).resolve().parent
SITE = "/tmp/sdjax-site"
GOALS = {"large_batch": 16, "speedup": 1.3, "mfu_pct": 40.0, "batch1_speedup": 1.0}  # issue 5's acceptance


@dataclasses.dataclass
class Stage:
    name: str
    script: str
    args: list[str]
    needs_s: float                 # the least time worth starting it with
    cap_s: float | None = None     # the most it may take, so later stages keep theirs
    child_timeout: bool = True     # the script takes --child-timeout
    covers: str | None = None      # a stage whose unmeasured batches this one takes on (`covering`)

    @property
    def uses_sdjax(self) -> bool:  # all but the PyTorch-only stages
        return "--no-sdjax" not in self.args


def plan(name: str, dry_run: bool, peak_tflops: float | None, workdir: str) -> list[Stage]:
    common = (["--dry-run"] if dry_run else []) + (["--peak-tflops", f"{peak_tflops:.6g}"] if peak_tflops else
                                                   ["--skip-peak"]) + ["--workdir", workdir]
    b = (lambda full, dry: dry) if dry_run else (lambda full, dry: full)  # noqa: E731
    if name == "sample":
        return [
            Stage("sample-diffusers", "gpu_sample.py", ["--no-sdjax", "--batches", b("1,16,64,4", "1,2"),
                                                        "--repeats", "2", "--warmup", "0", *common],
                  needs_s=60, cap_s=200),
            Stage("sample-sdjax-cudnn", "gpu_sample.py", ["--no-diffusers", "--attention", "cudnn", "--batches",
                                                          b("1,16,64,4", "1,2"), "--repeats", "2", "--warmup", "0",
                                                          *common], needs_s=90),
            Stage("sample-sdjax-xla", "gpu_sample.py", ["--no-diffusers", "--attention", "xla", "--batches",
                                                        b("16", "2"), "--repeats", "2", "--warmup", "0", *common],
                  needs_s=90, covers="sample-sdjax-cudnn"),
        ]
    if name == "train":
        def train(side: str, remat: str, batch: str) -> Stage:
            skip = "--no-torch" if side == "sdjax" else "--no-sdjax"
            return Stage(f"train-{side}-remat-{remat}-b{batch}", "gpu_train.py",
                         [skip, "--remat", remat, "--batches", batch, "--steps", b("6", "2"), "--warmup", "1",
                          *common], needs_s=60 if side == "sdjax" else 30)
        profile = ["--attention", "cudnn,xla", "--no-hlo-check", "--repeats", b("10", "3"), "--skip-peak"]
        return [train("sdjax", "off", b("8", "1")), train("torch", "off", b("8", "1")),
                Stage("profile-unet-step", "gpu_profile.py", profile + (["--dry-run"] if dry_run else []),
                      needs_s=60, child_timeout=False),
                train("sdjax", "on", b("16", "2")), train("torch", "on", b("16", "2"))]
    raise SystemExit(f"unknown plan {name!r}: sample or train")


def covering(stage: Stage, covered: Stage, session: dict) -> Stage:
    """``stage`` with the batches ``covered`` planned and did not measure added after its own: cuDNN
    can refuse its fused attention when XLA compiles the step, after JAX's checks passed, and the
    sdjax figures then come from XLA's attention. Batches that ran out of device memory are not
    tried again."""
    def batches(s: Stage) -> list[str]:
        return s.args[s.args.index("--batches") + 1].split(",")
    rows = (((session["stages"].get(covered.name) or {}).get("result")) or {}).get("rows", [])
    done = {str(r["batch"]) for r in rows if "images_per_s" in r or r.get("out_of_memory")}
    own = batches(stage)
    extra = [b for b in batches(covered) if b not in done and b not in own]
    if not extra:
        return stage
    args = list(stage.args)
    args[args.index("--batches") + 1] = ",".join(own + extra)
    C.log(f"{stage.name} also takes batches {','.join(extra)}: {covered.name} did not measure them")
    return dataclasses.replace(stage, args=args)


# ----------------------------------------------------------------------------- the machine
def install_wheels(directory: Path) -> dict:
    """pip-install the carried wheels whose package is missing or fails the project's requirement
    (dependencies and extras of pyproject.toml) into `SITE`, first on PYTHONPATH from then on."""
    chosen, kept = wheels_to_install(directory)
    if chosen:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--upgrade", "--target", SITE, *map(str, chosen)], check=True)
        os.environ["PYTHONPATH"] = os.pathsep.join([SITE, *filter(None, [os.environ.get("PYTHONPATH")])])
    result = {"installed": [w.name for w in chosen], "machine_has": kept}
    C.log(f"wheels: installed {result['installed'] or 'none'}; the machine's own kept: {kept or 'none'}")
    return result


def wheels_to_install(directory: Path) -> tuple[list[Path], dict[str, str]]:
    """(the wheels in ``directory`` to install, {package: installed version} of those left alone)."""
    import tomllib
    from importlib.metadata import PackageNotFoundError, version
    try:
        from packaging.requirements import Requirement
        from packaging.utils import canonicalize_name, parse_wheel_filename
    except ImportError as e:
        raise SystemExit(f"--wheels needs the 'packaging' module: {e}")
    project = tomllib.loads((C.ROOT / "pyproject.toml").read_text())["project"]
    specs = [*project["dependencies"], *(r for extra in project.get("optional-dependencies", {}).values()
                                         for r in extra)]
    requirements = {canonicalize_name(r.name): r for r in map(Requirement, specs) if r.marker is None
                    or r.marker.evaluate()}
    chosen, kept = [], {}
    wheels = sorted(Path(directory).glob("*.whl"))
    if not wheels:  # e.g. the device call did not name the folder in its carry list
        raise SystemExit(f"--wheels {directory}: no .whl files there (benchmarks/README.md says how to fetch them)")
    for wheel in wheels:
        name = parse_wheel_filename(wheel.name)[0]
        try:
            have = version(name)
        except PackageNotFoundError:
            have = None
        need = requirements.get(name)
        if have is None or (need is not None and not need.specifier.contains(have, prereleases=True)):
            chosen.append(wheel)
        else:
            kept[name] = have
    return chosen, kept


def machine_report() -> dict:
    """GPU name, driver and memory (nvidia-smi), where there is one."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        out = ""
    return {"nvidia_smi": out or None}


def prepare(args, size: str, resolution: int) -> dict:
    """The random pipeline folder and the FLOP counts (CPU children) and the matmul peak (GPU
    child), at once: the folder is disk and CPU work, the peak is a few seconds on the device."""
    results: dict = {}

    def job(key, fn):
        t0 = time.perf_counter()
        try:
            results[key] = fn()
        except (Exception, SystemExit) as e:  # noqa: BLE001 - ensure_pipeline exits when the build fails
            results[key] = None
            C.log(f"[prep] {key} failed: {type(e).__name__}: {e}")
        results[f"{key}_s"] = time.perf_counter() - t0

    jobs = {"pipeline": lambda: str(C.ensure_pipeline(args.workdir, size)),
            "flops": lambda: C.flop_counts(size, resolution, cache_dir=args.workdir),
            "peak": lambda: C.measure_peak(args.dry_run)}
    threads = [threading.Thread(target=job, args=item) for item in jobs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    C.log(f"[prep] folder {results['pipeline_s']:.0f} s, FLOP counts {results['flops_s']:.0f} s, peak "
          f"{results['peak_s']:.0f} s: " + (f"{results['peak']['tflops']:.4g} TFLOP/s" if results.get("peak")
                                            else "no peak (MFU will be '-')"))
    return results


# ----------------------------------------------------------------------------- running stages
def run_stage(stage: Stage, seconds: float, output: Path) -> tuple[str, float]:
    """Run one stage in its own process group for at most ``seconds``; returns (status, seconds)."""
    cmd = [sys.executable, str(HERE / stage.script), *stage.args, "--output", str(output)]
    if stage.child_timeout:
        cmd += ["--child-timeout", f"{max(seconds - 25, 10):.0f}"]  # the stage's own start-up and report
    C.log(f"\n===== {stage.name}: {seconds:.0f} s at most =====\n{' '.join(cmd)}")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=C.child_env(), start_new_session=True)
    try:
        code = proc.wait(timeout=seconds)
        status = "ok" if code == 0 else f"exit {code}"
    except subprocess.TimeoutExpired:  # stop the whole group: the stage's own children hold the GPU
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=10)
                break
            except subprocess.TimeoutExpired:
                continue
        status = f"stopped at its {seconds:.0f} s limit"
    return status, time.perf_counter() - t0


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("plan", choices=["sample", "train"])
    p.add_argument("--budget", type=float, default=540, help="seconds for the whole call (default %(default)s)")
    p.add_argument("--reserve", type=float, default=20, help="seconds kept for the summary at the end")
    p.add_argument("--wheels", help="folder of carried wheels to install where the machine lacks them")
    p.add_argument("--workdir", default=C.DEFAULT_WORKDIR)
    p.add_argument("--output", help="merged JSON (default: $OUT/session-<plan>.json when $OUT is set)")
    p.add_argument("--only", help="comma-separated stage names to run (default: all of the plan)")
    p.add_argument("--dry-run", action="store_true", help="tiny models and short runs: the logic on any device")
    args = p.parse_args(argv)
    deadline = time.monotonic() + args.budget - args.reserve
    names = [s.name for s in plan(args.plan, args.dry_run, None, args.workdir)]
    wanted = set(args.only.split(",")) if args.only else None
    if wanted is not None and not wanted <= set(names):  # before any device time is spent
        raise SystemExit(f"--only {','.join(sorted(wanted - set(names)))}: the {args.plan} plan's stages are "
                         + ", ".join(names))
    size, resolution = ("tiny", 32) if args.dry_run else ("sd15", 512)
    session = {"script": "gpu_session.py", "argv": sys.argv[1:], "plan": args.plan, "budget_s": args.budget,
               "machine": machine_report(), "stages": {}}
    if args.wheels:
        session["wheels"] = install_wheels(Path(args.wheels))
    session["env"] = env_of_children()
    sdjax_error = session["env"].get("sdjax_error")
    if sdjax_error:  # e.g. the machine's flax was not made for its jax: diffusers' stages still run
        C.log(f"sdjax does not work here, so its stages are skipped: {sdjax_error}")
    print(f"# gpu_session {args.plan}{' (DRY RUN)' if args.dry_run else ''}: budget {args.budget:.0f} s; "
          f"{session['machine']['nvidia_smi'] or 'no nvidia-smi'}\nversions: {json.dumps(session['env']['versions'])}",
          flush=True)
    output = Path(args.output) if args.output else C.default_results_path(f"session-{args.plan}.json")
    prep = prepare(args, size, resolution)
    session["prep"] = prep
    peak = (prep.get("peak") or {}).get("tflops")
    stage_dir = Path(args.workdir) / f"session-{args.plan}"
    stage_dir.mkdir(parents=True, exist_ok=True)
    stages = plan(args.plan, args.dry_run, peak, args.workdir)
    for stage in stages:
        if wanted is not None and stage.name not in wanted:
            continue
        if stage.covers in session["stages"]:   # (not where --only left the covered stage out)
            stage = covering(stage, next(s for s in stages if s.name == stage.covers), session)
        left = deadline - time.monotonic()
        if sdjax_error and stage.uses_sdjax:
            session["stages"][stage.name] = {"status": f"skipped: sdjax does not work here ({sdjax_error})"}
            continue
        if left < stage.needs_s:
            session["stages"][stage.name] = {"status": f"skipped: {left:.0f} s left, needs ~{stage.needs_s:.0f} s"}
            C.log(f"\n===== {stage.name}: skipped ({left:.0f} s left) =====")
            continue
        out = stage_dir / f"{stage.name}.json"
        out.unlink(missing_ok=True)
        status, seconds = run_stage(stage, min(left, stage.cap_s or left), out)
        session["stages"][stage.name] = {"status": status, "seconds": seconds,
                                         "result": json.loads(out.read_text()) if out.exists() else None}
        C.save_results(output, session)  # a call cut short keeps every finished stage
    summary = summarize(session, peak, args.dry_run)
    session["summary"] = summary
    path = C.save_results(output, session)
    if path:
        print(f"\nsession results written to {path}")


def env_of_children() -> dict:
    """Versions as the stages see them (after --wheels changed PYTHONPATH), and whether sdjax works
    there (``sdjax_error``): asked of a child, before any stage spends device time on it. The child
    imports sdjax, then builds, loads and samples from a tiny random pipeline on the CPU (~5-10 s),
    so that a jax / flax pairing that imports but behaves otherwise (NNX's merge, its Rngs) stops
    here and not in every stage."""
    code = textwrap.dedent(f"""
        import json, sys, tempfile
        from pathlib import Path
        sys.path.insert(0, {str(HERE)!r})
        import common as C
        info = C.env_info(('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'torch', 'diffusers',
                           'transformers', 'numpy', 'tensorboardX'))
        step = 'import sdjax'
        try:
            import sdjax
            step = 'a tiny random pipeline built, loaded and sampled from on the CPU'
            with tempfile.TemporaryDirectory() as d:
                C.build_random_pipeline(Path(d) / 'tiny', 'tiny')
                pipe = sdjax.StableDiffusion.from_pretrained(str(Path(d) / 'tiny'))
                pipe('a cat', num_inference_steps=2, height=32, width=32)
        except Exception as e:
            info['sdjax_error'] = f'{{step}}: {{type(e).__name__}}: {{e}}'
        print(json.dumps(info))
    """)
    proc = subprocess.run([sys.executable, "-c", code], env=C.child_env(JAX_PLATFORMS="cpu"), capture_output=True,
                          text=True)
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return C.env_info()


# ----------------------------------------------------------------------------- the summary
def summarize(session: dict, peak: float | None, dry_run: bool) -> dict:
    import gpu_sample as S
    import gpu_train as T
    print(f"\n## Session summary ({session['env']['date']}; {session['machine']['nvidia_smi'] or 'no GPU'})\n")
    record = session["prep"].get("peak")
    print(f"{C.describe_peak(record) if record else 'no matmul peak: MFU not computed'}\n")
    for name, st in session["stages"].items():
        print(f"- {name}: {st['status']}" + (f" ({st['seconds']:.0f} s)" if "seconds" in st else ""))
    results = {n: st.get("result") or {} for n, st in session["stages"].items()}
    sample_rows = [r for n, res in results.items() if n.startswith("sample-") for r in res.get("rows", [])]
    train_rows = [r for n, res in results.items() if n.startswith("train-") for r in res.get("rows", [])]
    summary: dict = {}
    if sample_rows:
        setting = "DRY RUN: tiny models, 32 px, 2 steps" if dry_run else "512 px, 50 PNDM steps"
        print(f"\n### Text-to-image ({setting}, guidance 7.5)\n")
        print(C.markdown_table(sample_rows, S.COLUMNS))
        summary["goals"] = goals(sample_rows)
        print(f"\n### Goals (issue 5){' - DRY RUN: tiny models, not a measurement' if dry_run else ''}\n")
        for line in summary["goals"]["lines"]:
            print(f"- {line}")
    if train_rows:
        print(f"\n### Training step ({'DRY RUN: tiny models, 32' if dry_run else '512'} px)\n")
        print(C.markdown_table(train_rows, T.COLUMNS))
    prof = results.get("profile-unet-step") or {}
    for step in prof.get("steps", []):
        if "error" in step:
            print(f"\n### UNet step ({step['label']} attention): failed: {step['error']}")
            continue
        pct = f", {100 * step['tflops'] / peak:.1f}% of peak" if peak else ""
        print(f"\n### UNet step ({step['label']} attention): {1e3 * step['median_s']:.2f} ms, "
              f"{step['tflops']:.4g} TFLOP/s{pct}, cuDNN fmha calls {step.get('cudnn_fmha_calls')}")
    for variant, trace in (prof.get("traces") or {}).items():
        by_kind = (trace.get("summary") or {}).get("by_kind_ms") or {}
        if by_kind:
            total = sum(by_kind.values())
            print(f"\ntrace ({variant}), device time by op kind: "
                  + ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in by_kind.items()))
    if prof.get("parts_by_kind"):
        print(f"\nblocks timed alone: {json.dumps(prof['parts_by_kind'], default=str)[:1500]}")
    return summary


def goals(rows: list[dict]) -> dict:
    """Issue 5's goals per batch size: sdjax's best images/s over diffusers' (eager, fp16 SDPA),
    and sdjax's MFU."""
    by_batch: dict[int, dict] = {}
    for r in rows:
        if "images_per_s" not in r:
            continue
        side = "diffusers" if r["impl"] == "diffusers" else ("sdjax" if r["impl"].startswith("sdjax") else None)
        if side is None:
            continue
        best = by_batch.setdefault(r["batch"], {}).get(side)
        if best is None or r["images_per_s"] > best["images_per_s"]:
            by_batch[r["batch"]][side] = r
    lines, table = [], []
    for batch in sorted(by_batch):
        s, d = by_batch[batch].get("sdjax"), by_batch[batch].get("diffusers")
        if not (s and d):
            lines.append(f"batch {batch}: only {'sdjax' if s else 'diffusers'} measured")
            continue
        ratio, mfu = s["images_per_s"] / d["images_per_s"], s.get("mfu_pct")
        if batch >= GOALS["large_batch"]:
            ok = ratio >= GOALS["speedup"] and mfu is not None and mfu >= GOALS["mfu_pct"]
            want = f">= {GOALS['speedup']}x and >= {GOALS['mfu_pct']:.0f}% MFU"
        elif batch == 1:
            ok, want = ratio >= GOALS["batch1_speedup"], f">= {GOALS['batch1_speedup']}x"
        else:
            ok, want = None, "no goal"
        verdict = {True: "MET", False: "MISSED", None: "-"}[ok]
        mfu_text = "-" if mfu is None else f"{mfu:.1f}%"
        lines.append(f"batch {batch}: {s['impl']} {s['images_per_s']:.3f} vs diffusers {d['images_per_s']:.3f} "
                     f"images/s = {ratio:.2f}x, sdjax MFU {mfu_text} (goal {want}): {verdict}")
        table.append({"batch": batch, "sdjax_impl": s["impl"], "ratio": ratio, "mfu_pct": mfu, "met": ok})
    return {"lines": lines, "per_batch": table}


if __name__ == "__main__":
    main()
