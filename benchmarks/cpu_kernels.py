"""The CPU kernel choices of sdjax, measured: why `sdjax._xla_flags` turns YNNPACK's fusions off and
why large attention goes through `blocked_attention`.

    python benchmarks/cpu_kernels.py [--repeats 5] [--unet /tmp/sdjax-bench/sd15-random]

Each XLA setting runs in a fresh subprocess (XLA reads its flags once): "YNN on" is jaxlib's default
(``SDJAX_XLA_FLAGS=0``, no XLA_FLAGS), "YNN off" is what sdjax sets
(``--xla_cpu_experimental_ynn_fusion_type=``). fp32, one host device, best of ``--repeats`` warm
jitted calls, milliseconds. Shapes are the SD v1.5 UNet's at 256 px with the CFG batch of 4 (2
prompts) and the VAE decoder's middle attention for 2 images.

With ``--unet PIPELINE_DIR`` (the random-weight SD v1.5 folder that benchmarks/sample_cpu.py writes)
it also times one whole UNet call at that shape (latents 4x32x32x4, 77-token context), adding the
choices one at a time, from none of them (sdjax before they were made) to all (sdjax now).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import common as C  # benchmarks/common.py (this script's folder is on sys.path)

CONVS = [  # (batch, height=width, in, out): 3x3, stride 1, padding 1
    (4, 32, 320, 320), (4, 16, 640, 640), (4, 8, 1280, 1280), (4, 4, 1280, 1280), (4, 4, 2560, 1280),
]
ATTENTION = [  # (batch, query tokens, key tokens, heads, head dim)
    (4, 1024, 1024, 8, 40), (4, 256, 256, 8, 80), (4, 1024, 77, 8, 40), (2, 1024, 1024, 1, 512), (2, 4096, 4096, 8, 40),
]
YNN_OFF = "--xla_cpu_experimental_ynn_fusion_type="
BLOCK_MIB = (2, 4, 8, 16)  # blocked-attention score budgets swept on the two largest attention shapes
SETTINGS = {"YNN on (jaxlib default)": "", "YNN off (sdjax)": YNN_OFF}
UNET_STEPS = [  # (label, XLA_FLAGS, SDJAX_ATTENTION), cumulative
    ("none: YNN on, XLA attention", "", "xla"),
    ("+ YNN off", YNN_OFF, "xla"),
    ("+ blocked attention (sdjax now)", YNN_OFF, "auto"),
]


def measure_unet(directory: str, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from sdjax import UNet2DConditionModel
    graphdef, state = nnx.split(UNet2DConditionModel.from_pretrained(directory, subfolder="unet"))
    call = jax.jit(lambda state, x, t, context: nnx.merge(graphdef, state)(x, t, context))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((4, 32, 32, 4), np.float32))
    context = jnp.asarray(rng.standard_normal((4, 77, 768), np.float32))
    out = np.asarray(call(state, x, jnp.float32(500.0), context))
    times = C.timed_repeats(lambda: call(state, x, jnp.float32(500.0), context), warmup=0, repeats=repeats,
                            sync=jax.block_until_ready)
    return {"unet_call_s": min(times), "out_head": out.reshape(-1)[:4096].tolist()}


def measure(repeats: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from sdjax.models import layers

    def best_ms(fn, *args):
        return 1e3 * min(C.timed_repeats(lambda: fn(*args), warmup=1, repeats=repeats, sync=jax.block_until_ready))

    rng = np.random.default_rng(0)
    out = {"conv": [], "attention": []}
    conv = jax.jit(lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                                             dimension_numbers=("NHWC", "HWIO", "NHWC")))
    for B, S, cin, cout in CONVS:
        x = jnp.asarray(rng.standard_normal((B, S, S, cin), np.float32))
        w = jnp.asarray(rng.standard_normal((3, 3, cin, cout), np.float32) * 0.02)
        out["conv"].append({"shape": [B, S, cin, cout], "conv_ms": best_ms(conv, x, w),
                            "out_head": np.asarray(conv(x, w)).reshape(-1)[:4096].tolist()})
    xla = jax.jit(jax.nn.dot_product_attention)
    blocked = jax.jit(layers.blocked_attention)
    for B, T, S, N, H in ATTENTION:
        q = jnp.asarray(rng.standard_normal((B, T, N, H), np.float32))
        kv = jnp.asarray(rng.standard_normal((B, S, N, H), np.float32))
        err = float(jnp.abs(xla(q, kv, kv) - blocked(q, kv, kv)).max())
        out["attention"].append({"shape": [B, T, S, N, H], "xla_ms": best_ms(xla, q, kv, kv),
                                 "blocked_ms": best_ms(blocked, q, kv, kv), "max_abs_diff": err})
    # A convolution's kernel gradient alone, and inside a loop (train_step's micro-batch scan)
    x = jnp.asarray(rng.standard_normal((1, 32, 32, 320), np.float32))
    w = jnp.asarray(rng.standard_normal((3, 3, 320, 320), np.float32) * 0.02)
    kernel_grad = jax.grad(lambda w, x: jnp.sum(conv(x, w) ** 2))
    loops = {"alone": lambda w, x: kernel_grad(w, x),
             "lax.scan, 1 step": lambda w, x: jax.lax.scan(lambda c, _: (c + kernel_grad(w, x), None),
                                                           jnp.zeros_like(w), None, length=1)[0],
             "lax.fori_loop, 1 step": lambda w, x: jax.lax.fori_loop(0, 1, lambda i, c: c + kernel_grad(w, x),
                                                                     jnp.zeros_like(w))}
    out["kernel_grad"] = {}
    for name, fn in loops.items():
        fn = jax.jit(fn)
        labels = [line.split("dim_labels=")[1].split(",")[0] for line in fn.lower(w, x).compile().as_text().splitlines()
                  if " convolution(" in line]
        out["kernel_grad"][name] = {"ms": best_ms(fn, w, x), "dim_labels": labels}
    out["blocks"] = []
    for B, T, S, N, H in (ATTENTION[0], ATTENTION[-1]):
        q = jnp.asarray(rng.standard_normal((B, T, N, H), np.float32))
        row = {"shape": [B, T, S, N, H]}
        for mib in BLOCK_MIB:
            fn = jax.jit(lambda q, mib=mib: layers.blocked_attention(q, q, q, block_bytes=mib * 2 ** 20))
            row[f"{mib}"] = best_ms(fn, q)
        out["blocks"].append(row)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--unet", metavar="PIPELINE_DIR", help="also time whole UNet calls from this pipeline folder")
    parser.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        result = measure_unet(args.unet, args.repeats) if args.unet else measure(args.repeats)
        print(json.dumps(result))
        return
    results = {}
    for name, flags in SETTINGS.items():
        env = dict(os.environ, SDJAX_XLA_FLAGS="0", XLA_FLAGS=flags)
        proc = subprocess.run([sys.executable, __file__, "--_child", "--repeats", str(args.repeats)], env=env,
                              capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    on, off = results.values()
    print(f"fp32, best of {args.repeats} warm calls, ms\n")
    print("| 3x3 conv: batch, size, C_in -> C_out | YNN on | YNN off | max abs diff |")
    print("|---|---:|---:|---:|")
    for a, b in zip(on["conv"], off["conv"]):
        B, S, cin, cout = a["shape"]
        diff = max(abs(x - y) for x, y in zip(a["out_head"], b["out_head"]))
        print(f"| {B}, {S}x{S}, {cin} -> {cout} | {a['conv_ms']:.1f} | {b['conv_ms']:.1f} | {diff:.1e} |")
    print("\n| attention: batch, tokens q x k, heads x dim | XLA, YNN on | XLA, YNN off | blocked, YNN on |"
          " blocked, YNN off | max abs diff |")
    print("|---|---:|---:|---:|---:|---:|")
    for a, b in zip(on["attention"], off["attention"]):
        B, T, S, N, H = a["shape"]
        print(f"| {B}, {T} x {S}, {N} x {H} | {a['xla_ms']:.1f} | {b['xla_ms']:.1f} | {a['blocked_ms']:.1f} | "
              f"{b['blocked_ms']:.1f} | {max(a['max_abs_diff'], b['max_abs_diff']):.1e} |")
    print("\n| blocked attention, YNN off (sdjax): batch, tokens, heads x dim | "
          + " | ".join(f"{mib} MiB blocks" for mib in BLOCK_MIB) + " |")
    print("|---|" + "---:|" * len(BLOCK_MIB))
    for row in off["blocks"]:
        B, T, _, N, H = row["shape"]
        print(f"| {B}, {T}, {N} x {H} | " + " | ".join(f"{row[str(mib)]:.1f}" for mib in BLOCK_MIB) + " |")
    print("\n| kernel gradient of one 3x3 conv (1x32x32x320 -> 320), YNN off | ms | convolutions in the compiled HLO |")
    print("|---|---:|---|")
    for name, r in off["kernel_grad"].items():
        print(f"| {name} | {r['ms']:.1f} | {', '.join('`' + d + '`' for d in r['dim_labels'])} |")
    if not args.unet:
        return
    print(f"\nOne SD v1.5 UNet call, latents 4x32x32x4 (256 px, CFG batch of 4), best of {args.repeats}\n")
    print("| CPU choices | UNet call s | max abs diff to the first row |")
    print("|---|---:|---:|")
    first = None
    for label, flags, attention in UNET_STEPS:
        env = dict(os.environ, SDJAX_XLA_FLAGS="0", XLA_FLAGS=flags, SDJAX_ATTENTION=attention)
        proc = subprocess.run([sys.executable, __file__, "--_child", "--unet", args.unet, "--repeats", str(args.repeats)],
                              env=env, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"{label} failed:\n{proc.stderr[-3000:]}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        first = first or r["out_head"]
        diff = max(abs(a - b) for a, b in zip(first, r["out_head"]))
        print(f"| {label} | {r['unet_call_s']:.2f} | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
