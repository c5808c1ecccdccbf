"""Where the time of one sdjax UNet step goes (bf16, one CFG pair = UNet batch 2, 64x64 latents).

    python benchmarks/gpu_profile.py                    # trace into /tmp/sdjax-profile, copies in $OUT
    python benchmarks/gpu_profile.py --attention xla,cudnn --trace-dir DIR --repeats 20
    python benchmarks/gpu_profile.py --dry-run          # tiny UNet, 16x16 latents: any device
    python benchmarks/gpu_profile.py --attention xla --xla-flag-sets 'default;--xla_gpu_enable_triton_gemm=false'

1. The whole step, jitted: median time, XLA cost_analysis FLOPs, TFLOP/s and the share of the
   measured bf16 matmul peak; once per attention variant (``--attention xla,cudnn``).
2. ``jax.profiler.trace`` of a few steps into --trace-dir (TensorBoard/XProf/Perfetto readable);
   the ``.xplane.pb`` files are also copied flat into $OUT (the device tool brings back only two
   folder levels). The trace is then summarised in-process with ``jax.profiler.ProfileData``:
   device time per HLO op, grouped by kind (cuDNN convolutions, cuBLAS/Triton matmuls, fused
   attention, elementwise and reduction fusions, copies/transposes), using the compiled HLO to
   classify each op; the top ops are listed too.
3. Sub-blocks jitted and timed separately (same inputs as inside the UNet): conv_in + time
   embedding, every resnet, every transformer (and inside it the bare attention products), every
   down/up sampler, the output head. Per part: ms, share, GFLOP, TFLOP/s. Their sum is larger than
   the fused step (no fusion across the cuts, one launch per part); the ratio is printed.
4. HLO checks of the whole bf16 sampler (common.inspect_sampling_hlo): no host transfers or
   callbacks in the scan, bf16 convolutions/matmuls, f32 scheduler arithmetic; on a GPU also the
   optimised HLO (cuDNN/cuBLAS custom calls by operand type). ``--no-hlo-check`` skips it.

5. ``--xla-flag-sets 'default;FLAGS;...'``: instead of 1-4, the whole-step timing once per XLA_FLAGS
   setting, each in a fresh process (XLA reads its flags once per process), side by side.

Needs: jax (CUDA plugin on a GPU), flax, numpy (the configs come from tests/model_configs.py, no
torch). No weights: a random bf16 UNet is built in memory.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402


def timeit(fn, *args, repeats: int, warmup: int = 2) -> list[float]:
    import jax
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return times


def jit_module(module, fn):
    """``fn(module, *args)`` jitted over the module's state (the weights are arguments)."""
    import jax
    from flax import nnx
    graphdef, state = nnx.split(module)
    jitted = jax.jit(lambda s, *a: fn(nnx.merge(graphdef, s), *a))
    return jitted, state


def flops_of(jitted, *args, retrace=None) -> float:
    """XLA's FLOPs of ``jitted(*args)`` (its lowered HLO, `common.lowered_flops`). cuDNN's fused
    attention is one custom call that no cost analysis counts, so under SDJAX_ATTENTION=cudnn
    ``retrace()`` (a new jitted function of the same computation: a jitted function keeps its
    first trace) is traced with XLA's attention instead: the same math."""
    from sdjax.models import layers
    setting = layers.ATTENTION_IMPLEMENTATION
    try:
        if retrace is None or setting != "cudnn":
            return C.lowered_flops(jitted.lower(*args))
        layers.ATTENTION_IMPLEMENTATION = "xla"
        return C.lowered_flops(retrace().lower(*args))
    except Exception:  # noqa: BLE001
        return float("nan")
    finally:
        layers.ATTENTION_IMPLEMENTATION = setting


# ----------------------------------------------------------------------------- 1. the whole step
def build(args):
    import jax
    import jax.numpy as jnp

    from sdjax import UNet2DConditionModel
    cfg = C.sd_configs(args.size)
    h = args.resolution // C.vae_scale(cfg["vae"])
    unet = C.random_model(UNet2DConditionModel, cfg["unet"], 0, dtype=jnp.bfloat16)
    n = 2 * args.batch  # one CFG pair per image
    kx, kc = jax.random.split(jax.random.key(1))
    x = jax.random.normal(kx, (n, h, h, cfg["unet"].get("in_channels", 4)), jnp.float32)
    t = jnp.full((n,), 500, jnp.int32)
    context = jax.random.normal(kc, (n, 77, cfg["unet"].get("cross_attention_dim", 768)), jnp.bfloat16)
    return unet, x, t, context


def whole_step(unet, x, t, context, *, repeats: int, label: str) -> dict:
    import jax
    from flax import nnx
    graphdef, state = nnx.split(unet)

    def unet_step(s, x, t, c):
        return nnx.merge(graphdef, s)(x, t, c)

    jitted = jax.jit(unet_step)
    t0 = time.perf_counter()
    lowered = jitted.lower(state, x, t, context)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    # Not the compiled module's count: on a GPU that leaves out every cuDNN/cuBLAS custom call.
    flops = flops_of(jitted, state, x, t, context,
                     retrace=lambda: jax.jit(lambda s, x, t, c: nnx.merge(graphdef, s)(x, t, c)))
    times = timeit(compiled, state, x, t, context, repeats=repeats)
    med = statistics.median(times)
    return {"label": label, "compile_s": compile_s, "median_s": med, "min_s": min(times), "max_s": max(times),
            "flops": flops, "tflops": flops / med / 1e12, "compiled": compiled, "state": state,
            "hlo_text": compiled.as_text()}


# ----------------------------------------------------------------------------- 2. trace + summary
def hlo_op_kinds(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> a coarse kind, from the optimised HLO text."""
    kinds = {}
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*\S.*?\s([\w\-]+)\(", line)
        if not m:
            continue
        name, opcode = m.group(1), m.group(2)
        target = re.search(r'custom_call_target="([^"]+)"', line)
        low = line.lower()
        if target:
            t = target.group(1).lower()
            kind = ("convolution (cuDNN)" if "conv" in t else "attention (cuDNN fused)" if "fmha" in t
                    else "matmul (cuBLAS)" if ("cublas" in t or "gemm" in t) else f"custom-call {target.group(1)}")
        elif opcode == "fusion":
            if "triton_gemm" in low or "__triton" in low or "kind=kcustom" in low:
                kind = "matmul/conv (custom fusion: Triton on GPU, YNNPACK on CPU)"
            elif "convolution" in name.lower():
                kind = "convolution fusion"
            elif "kind=koutput" in low:
                kind = "matmul/conv + epilogue fusion"
            elif "kind=kinput" in low:
                kind = "reduction fusion (norms, softmax)"
            else:
                kind = "elementwise fusion"
        elif opcode in ("convolution",):
            kind = "convolution"
        elif opcode in ("dot",):
            kind = "matmul"
        elif opcode in ("copy", "transpose", "copy-start", "copy-done", "bitcast", "reshape"):
            kind = "copy/transpose"
        else:
            kind = f"other ({opcode})"
        kinds[name] = kind
    return kinds


def summarize_trace(trace_dir: Path, hlo_text: str, module_hint: str = "unet_step", top: int = 15) -> dict | None:
    """Device time per HLO op from the newest .xplane.pb under ``trace_dir``."""
    files = sorted(trace_dir.glob("**/*.xplane.pb"), key=lambda p: p.stat().st_mtime)
    if not files:
        return None
    try:
        from jax.profiler import ProfileData
        data = ProfileData.from_file(str(files[-1]))
    except Exception as e:  # noqa: BLE001
        return {"error": f"could not read {files[-1]}: {type(e).__name__}: {e}"}
    planes = list(data.planes)
    device_planes = [p for p in planes if p.name.startswith("/device:")]

    def collect(candidates, only_xla_ops_line: bool) -> dict[str, float]:
        per_op: dict[str, float] = {}
        for plane in candidates:
            for line in plane.lines:
                if only_xla_ops_line and line.name != "XLA Ops":
                    continue
                for ev in line.events:
                    stats = dict(ev.stats)
                    op = stats.get("hlo_op") or (ev.name if line.name == "XLA Ops" else None)
                    module = str(stats.get("hlo_module", module_hint))
                    if not op or module_hint not in module or ev.name.startswith("end:"):
                        continue
                    per_op[op] = per_op.get(op, 0.0) + ev.duration_ns / 1e6
        return per_op

    # GPU: the device plane's "XLA Ops" line (kernel time per HLO op) where the trace has one (xprof derives
    # it; jax.profiler's raw trace may not), else the device plane's kernels on its stream lines, which XLA's
    # annotations tag with hlo_op (the host plane's kernel launches are tagged too: not device time); else
    # (CPU) any event tagged hlo_op.
    per_op, source = {}, ""
    if device_planes:
        per_op, source = collect(device_planes, True), "device plane, XLA Ops line"
        if not per_op:
            per_op, source = collect(device_planes, False), "device plane, kernels tagged hlo_op"
    if not per_op:
        per_op, source = collect(planes, False), "events tagged hlo_op (host threads on a CPU)"
    if not per_op:
        return {"error": f"no HLO-op events of {module_hint} in {files[-1]} (planes: {[p.name for p in planes]})"}
    kinds = hlo_op_kinds(hlo_text)
    by_kind: dict[str, float] = {}
    for op, ms in per_op.items():
        kind = kinds.get(op, "unclassified")
        by_kind[kind] = by_kind.get(kind, 0.0) + ms
    total = sum(per_op.values())
    return {"file": str(files[-1]), "source": source,
            "total_ms": total, "by_kind_ms": dict(sorted(by_kind.items(), key=lambda kv: -kv[1])),
            "top_ops": sorted(((op, kinds.get(op, "?"), ms) for op, ms in per_op.items()), key=lambda r: -r[2])[:top]}


def copy_flat(trace_dir: Path, dest: Path, prefix: str) -> list[str]:
    """Copy the trace's files into ``dest`` without subfolders (what the device tool returns)."""
    copied = []
    dest.mkdir(parents=True, exist_ok=True)
    for f in trace_dir.glob("**/*"):
        if f.is_file() and (f.name.endswith(".xplane.pb") or f.name.endswith(".trace.json.gz")):
            target = dest / f"{prefix}-{f.name}"
            if f.stat().st_size <= 16 * 2**20:
                shutil.copyfile(f, target)
                copied.append(str(target))
    return copied


# ----------------------------------------------------------------------------- 3. sub-blocks
def time_parts(unet, x, t, context, *, repeats: int) -> list[dict]:
    """The UNet's forward cut into separately jitted parts, in order (mirrors UNet2DConditionModel.__call__)."""
    import jax
    import jax.numpy as jnp

    from sdjax.models.layers import attention, timestep_embedding
    parts: list[dict] = []

    def measure(name, kind, module, fn, *args, extra=None):
        jitted, state = jit_module(module, fn)
        out = jitted(state, *args)
        times = timeit(jitted, state, *args, repeats=repeats)
        rec = {"part": name, "kind": kind, "ms": 1e3 * statistics.median(times),
               "gflop": flops_of(jitted, state, *args, retrace=lambda: jit_module(module, fn)[0]) / 1e9}
        rec["tflops"] = rec["gflop"] / rec["ms"] if rec["ms"] else float("nan")
        rec.update(extra or {})
        parts.append(rec)
        return out

    cfg = unet.config
    ctx = context.astype(unet.dtype)

    def stem(m, x, t):
        t_emb = timestep_embedding(jnp.broadcast_to(t, (x.shape[0],)), cfg.block_out_channels[0],
                                   flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift)
        return m.conv_in(x.astype(m.dtype)), m.time_embedding(t_emb.astype(m.dtype))

    h, temb = measure("conv_in + time embedding", "in/out", unet, stem, x, t)

    def attention_cores(block_attn, h_in, prefix):
        """Time the bare attention products of one Transformer2D (self and cross) at its shapes."""
        B, H, W, Cc = h_in.shape
        for blk_i, blk in enumerate(block_attn.transformer_blocks):
            for which, S in (("attn1", H * W), ("attn2", context.shape[1])):
                a = getattr(blk, which)
                q = jnp.ones((B, H * W, a.heads, a.head_dim), unet.dtype)
                kv = jnp.ones((B, S, a.heads, a.head_dim), unet.dtype)
                f = jax.jit(lambda q, k, v: attention(q, k, v))
                times = timeit(f, q, kv, kv, repeats=repeats)
                gflop = flops_of(f, q, kv, kv, retrace=lambda: jax.jit(lambda q, k, v: attention(q, k, v))) / 1e9
                ms = 1e3 * statistics.median(times)
                parts.append({"part": f"{prefix} {which} core (T={H * W}, S={S}, d={a.head_dim})",
                              "kind": "attention core (inside transformer)", "ms": ms, "gflop": gflop,
                              "tflops": gflop / ms if ms else float("nan"), "nested": True})

    skips = (h,)
    for i, block in enumerate(unet.down_blocks):
        outs = []
        for j, resnet in enumerate(block.resnets):
            h = measure(f"down{i}.resnet{j}", "resnet", resnet, lambda m, x, e: m(x, e), h, temb)
            if block.attentions is not None:
                attention_cores(block.attentions[j], h, f"down{i}.attn{j}")
                h = measure(f"down{i}.transformer{j}", "transformer", block.attentions[j],
                            lambda m, x, c: m(x, c), h, ctx)
            outs.append(h)
        if hasattr(block, "downsamplers"):
            h = measure(f"down{i}.downsample", "resample", block.downsamplers[0], lambda m, x: m(x), h)
            outs.append(h)
        skips += tuple(outs)
    mid = unet.mid_block
    h = measure("mid.resnet0", "resnet", mid.resnets[0], lambda m, x, e: m(x, e), h, temb)
    attention_cores(mid.attentions[0], h, "mid.attn0")
    h = measure("mid.transformer0", "transformer", mid.attentions[0], lambda m, x, c: m(x, c), h, ctx)
    h = measure("mid.resnet1", "resnet", mid.resnets[1], lambda m, x, e: m(x, e), h, temb)
    for i, block in enumerate(unet.up_blocks):
        n = len(block.resnets)
        skips, block_skips = skips[:-n], skips[-n:]
        for j, resnet in enumerate(block.resnets):
            h = measure(f"up{i}.resnet{j} (+skip concat)", "resnet", resnet,
                        lambda m, x, s, e: m(jnp.concatenate([x, s], axis=-1), e), h, block_skips[-1 - j], temb)
            if block.attentions is not None:
                attention_cores(block.attentions[j], h, f"up{i}.attn{j}")
                h = measure(f"up{i}.transformer{j}", "transformer", block.attentions[j],
                            lambda m, x, c: m(x, c), h, ctx)
        if hasattr(block, "upsamplers"):
            size = tuple(skips[-1].shape[1:3]) if skips else None
            h = measure(f"up{i}.upsample", "resample", block.upsamplers[0], lambda m, x, s=size: m(x, s), h)
    measure("norm_out + conv_out", "in/out", unet, lambda m, x: m.conv_out(jax.nn.silu(m.conv_norm_out(x))), h)
    return parts


def print_parts(parts: list[dict], step_ms: float, peak_tflops: float | None) -> dict:
    top = [p for p in parts if not p.get("nested")]
    total = sum(p["ms"] for p in top)
    print(f"\nSub-blocks jitted separately: sum {total:.2f} ms vs the fused step {step_ms:.2f} ms "
          f"(ratio {total / step_ms:.2f}: launch gaps and fusion lost at the cuts)\n")
    print("| part | kind | ms | % of sum | GFLOP | TFLOP/s | % of peak |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for p in parts:
        share = "" if p.get("nested") else f"{100 * p['ms'] / total:.1f}"
        pk = f"{100 * p['tflops'] / peak_tflops:.1f}" if peak_tflops and p["tflops"] == p["tflops"] else "-"
        name = ("&nbsp;&nbsp;&nbsp;" + p["part"]) if p.get("nested") else p["part"]
        print(f"| {name} | {p['kind']} | {p['ms']:.3f} | {share} | {p['gflop']:.4g} | {p['tflops']:.4g} | {pk} |")
    by_kind: dict = {}
    for p in parts:
        d = by_kind.setdefault(p["kind"], {"ms": 0.0, "gflop": 0.0, "count": 0})
        d["ms"] += p["ms"]
        d["gflop"] += p["gflop"]
        d["count"] += 1
    print("\n| kind | parts | ms | % of sum | GFLOP | TFLOP/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for kind, d in sorted(by_kind.items(), key=lambda kv: -kv[1]["ms"]):
        share = "(inside transformers)" if kind.startswith("attention core") else f"{100 * d['ms'] / total:.1f}"
        print(f"| {kind} | {d['count']} | {d['ms']:.3f} | {share} | {d['gflop']:.4g} | "
              f"{d['gflop'] / d['ms'] if d['ms'] else float('nan'):.4g} |")
    return by_kind


# ----------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=1, help="images per step; the UNet sees 2x (CFG pair)")
    p.add_argument("--resolution", type=int, default=512, help="image size; latents are 1/8")
    p.add_argument("--attention", default="xla,cudnn", help="attention variants for the whole-step timing")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--trace-dir", help="default: /tmp/sdjax-profile (the .xplane.pb files are also copied into $OUT)")
    p.add_argument("--no-trace", action="store_true")
    p.add_argument("--no-blocks", action="store_true", help="skip the sub-block timing")
    p.add_argument("--no-hlo-check", action="store_true", help="skip the sampler HLO checks")
    p.add_argument("--skip-peak", action="store_true")
    p.add_argument("--output", help="summary JSON (default: $OUT/gpu_profile.json when $OUT is set)")
    p.add_argument("--xla-flag-sets", help="';'-separated XLA_FLAGS settings ('default': none) whose whole-step "
                   "times to compare, each in a fresh process; skips the trace, sub-blocks and HLO checks")
    p.add_argument("--dry-run", action="store_true", help="tiny UNet at 16x16 latents, 3 repeats")
    p.add_argument("--size", default="sd15", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.dry_run:
        args.size, args.resolution, args.repeats = "tiny", 32, min(args.repeats, 3)
    return args


def flag_sweep(args) -> None:
    """The whole-step timing under each XLA_FLAGS setting, each in a fresh child process (this
    process never touches the device, so each child gets the whole GPU)."""
    rows = []
    for flags in [f.strip() for f in args.xla_flag_sets.split(";") if f.strip()]:
        with tempfile.TemporaryDirectory() as tmp:
            result = Path(tmp) / "step.json"
            cmd = [sys.executable, __file__, "--no-trace", "--no-blocks", "--no-hlo-check", "--attention",
                   args.attention, "--repeats", str(args.repeats), "--batch", str(args.batch), "--resolution",
                   str(args.resolution), "--output", str(result), *(["--skip-peak"] if args.skip_peak else []),
                   *(["--dry-run"] if args.dry_run else [])]
            C.log(f"XLA_FLAGS={flags} ...")
            proc = subprocess.run(cmd, env=C.child_env(XLA_FLAGS=None if flags == "default" else flags),
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            if proc.returncode != 0 or not result.exists():
                C.log(f"FAILED (exit {proc.returncode}) with XLA_FLAGS={flags}:\n{proc.stdout[-3000:]}")
                continue
            summary = json.loads(result.read_text())
        peak = (summary.get("peak") or {}).get("tflops")
        for step in summary["steps"]:
            if "error" in step:
                rows.append({"flags": flags, "attention": step["label"], "range": step["error"][:100],
                             "device": summary["device"], "env": summary["env"]})
                continue
            rows.append({"flags": flags, "attention": step["label"], "ms": 1e3 * step["median_s"],
                         "range": f"{1e3 * step['min_s']:.2f}-{1e3 * step['max_s']:.2f}", "compile_s": step["compile_s"],
                         "tflops": step["tflops"], "pct": 100 * step["tflops"] / peak if peak else None,
                         "device": summary["device"], "env": summary["env"]})
    columns = [("XLA_FLAGS", "flags", "s"), ("attention", "attention", "s"), ("step ms (median)", "ms", ".2f"),
               ("min-max ms", "range", "s"), ("compile s", "compile_s", ".1f"), ("TFLOP/s", "tflops", ".4g"),
               ("% of peak", "pct", ".1f")]
    print(f"# gpu_profile XLA flag sweep: UNet step, bf16, batch {2 * args.batch}, {args.resolution} px, "
          f"{rows[0]['device'] if rows else '?'}\n")
    print(C.markdown_table(rows, columns))
    path = C.save_results(args.output or C.default_results_path("gpu_profile_flags.json"),
                          {"script": "gpu_profile.py --xla-flag-sets", "argv": sys.argv[1:], "rows": rows,
                           "columns": columns, "env": rows[0]["env"] if rows else C.env_info()})
    if path:
        print(f"\nwritten to {path}")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.xla_flag_sets:
        return flag_sweep(args)
    import jax

    from sdjax.models import layers
    env = C.env_info(("jax", "jaxlib", "flax", "numpy"))
    print(f"# gpu_profile: {'DRY RUN (tiny UNet) ' if args.dry_run else ''}UNet step, bf16, batch "
          f"{2 * args.batch} (CFG pair x {args.batch}), {args.resolution} px images on {C.device_name()}  "
          f"({env['date']})")
    print(f"versions: {json.dumps(env['versions'])}")
    peak = None
    if not args.skip_peak:
        peak = C.matmul_peak(512 if args.dry_run else 8192, repeats=3 if args.dry_run else 10,
                             inner=5 if args.dry_run else 20)
        print(f"bf16 matmul peak: {peak['tflops']:.4g} TFLOP/s ({peak['n']}^3, median of {peak['repeats']})")
    peak_tflops = peak["tflops"] if peak else None
    unet, x, t, context = build(args)
    print(f"UNet input {tuple(x.shape)} (latents), context {tuple(context.shape)}")

    out_dir = C.out_dir()
    trace_dir = Path(args.trace_dir or "/tmp/sdjax-profile")
    summary: dict = {"script": "gpu_profile.py", "argv": sys.argv[1:], "env": env, "device": C.device_name(),
                     "peak": peak, "steps": [], "traces": {}}
    output = args.output or C.default_results_path("gpu_profile.json")
    save = lambda: C.save_results(output, summary)  # noqa: E731 - after every phase: a run stopped keeps them
    first = None
    print("\n| attention | step ms (median) | min-max ms | compile s | GFLOP (XLA) | TFLOP/s | % of peak | cuDNN fmha calls |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for variant in [a.strip() for a in args.attention.split(",") if a.strip()]:
        layers.ATTENTION_IMPLEMENTATION = variant  # read at trace time: a fresh jit per variant
        try:
            step = whole_step(unet, x, t, context, repeats=args.repeats, label=variant)
        except Exception as e:  # noqa: BLE001 - e.g. cuDNN refusing its fused attention when XLA compiles it
            error = f"{type(e).__name__}: {str(e)[:300]}"
            C.log(f"[{variant}] the UNet step failed: {error}")
            print(f"| {variant} | failed: {error.splitlines()[0][:150]} | | | | | | |")
            summary["steps"].append({"label": variant, "error": error})
            save()
            continue  # the other attention variants still run
        first = first or step
        pct = f"{100 * step['tflops'] / peak_tflops:.1f}" if peak_tflops else "-"
        fmha = len(re.findall(r'custom_call_target="__cudnn\$fmha', step["hlo_text"]))
        print(f"| {variant} | {1e3 * step['median_s']:.2f} | {1e3 * step['min_s']:.2f}-{1e3 * step['max_s']:.2f} | "
              f"{step['compile_s']:.1f} | {step['flops'] / 1e9:.5g} | {step['tflops']:.4g} | {pct} | {fmha} |")
        summary["steps"].append({k: v for k, v in step.items() if k not in ("compiled", "state", "hlo_text")}
                                | {"cudnn_fmha_calls": fmha})
        if not args.no_trace:
            vdir = trace_dir / variant
            shutil.rmtree(vdir, ignore_errors=True)
            with jax.profiler.trace(str(vdir)):
                for _ in range(3):
                    jax.block_until_ready(step["compiled"](step["state"], x, t, context))
            trace = summarize_trace(vdir, step["hlo_text"])
            if out_dir:  # the device tool brings back files at most two folders down: copy them flat
                trace_files = copy_flat(vdir, out_dir, f"trace-{variant}")
                if step is first and len(step["hlo_text"]) < 16 * 2**20:  # the device tool returns 8 files
                    (out_dir / f"unet-step-{variant}.hlo.txt").write_text(step["hlo_text"])
            else:
                trace_files = [str(p) for p in vdir.glob("**/*.xplane.pb")]
            summary["traces"][variant] = {"dir": str(vdir), "files": trace_files, "summary": trace}
        save()
    for variant, tr in summary["traces"].items():
        s = tr["summary"]
        print(f"\nTrace ({variant}): {tr['dir']}")
        if not s or "error" in (s or {}):
            print(f"  no summary: {(s or {}).get('error', 'no .xplane.pb written')}")
            continue
        print(f"  {s['source']}: {s['total_ms']:.2f} ms of HLO ops over 3 steps\n")
        print("| op kind | ms / step | % |")
        print("|---|---:|---:|")
        for kind, ms in s["by_kind_ms"].items():
            print(f"| {kind} | {ms / 3:.3f} | {100 * ms / s['total_ms']:.1f} |")
        print("\n| top HLO ops | kind | ms / step |")
        print("|---|---|---:|")
        for op, kind, ms in s["top_ops"]:
            print(f"| {op} | {kind} | {ms / 3:.3f} |")

    if first is not None:  # the blocks with the first attention variant whose step ran
        layers.ATTENTION_IMPLEMENTATION = first["label"]
    if not args.no_blocks and first is not None:
        parts = time_parts(unet, x, t, context, repeats=args.repeats)
        summary["parts"] = parts
        summary["parts_by_kind"] = print_parts(parts, 1e3 * first["median_s"], peak_tflops)
        save()
    if not args.no_hlo_check:
        steps = 2 if args.dry_run else 50
        compile_it = jax.default_backend() != "cpu" or args.dry_run
        hlo = C.inspect_sampling_hlo(args.size, args.resolution, compile=compile_it, steps=steps)
        summary["sampler_hlo"] = hlo
        print_hlo_report(hlo)
    path = save()
    if path:
        print(f"\nsummary written to {path}")


def print_hlo_report(hlo: dict) -> None:
    body = hlo["lowered"]["scan_body"]
    latent_key = next(k for k in body if k.startswith("ops_with_latent_shape"))
    print(f"\nSampler HLO ({hlo['size']}, {hlo['resolution']} px, {hlo['num_model_calls']} UNet calls, backend "
          f"{hlo['backend']}; lowered in {hlo['lower_seconds']:.1f} s):")
    print(f"- lowered scan body: host ops {body['host_ops'] or 'none'}; custom calls {body['custom_call_targets'] or 'none'}")
    print(f"- lowered scan body convs/matmuls: {body['matmul_and_conv_operand_types']}")
    print(f"- lowered scan body, not bf16 x bf16: {body['not_bf16'] or 'none'}")
    print(f"- lowered scan body, {latent_key.replace('_', ' ')}: {body[latent_key]}")
    whole = hlo["lowered"]["whole_module"]
    print(f"- lowered whole module: host ops {whole['host_ops'] or 'none'}; not bf16 x bf16: {whole['not_bf16'] or 'none'}")
    if "compiled" in hlo:
        comp = hlo["compiled"]
        print(f"- compiled ({hlo.get('compile_seconds', 0):.0f} s): host ops {comp['host_ops'] or 'none'}; while trip "
              f"counts {comp['while_trip_counts']} (scan found: {comp['scan_found']})")
        print(f"- compiled convs/matmuls by scope and operand type: {comp['matmul_and_conv_types']}")


if __name__ == "__main__":
    main()
