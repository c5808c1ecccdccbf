"""Host time per call of a jitted function that takes a model: ``nnx.jit`` with the module as an
argument, ``jax.jit`` with the module, ``jax.jit`` with the state from one ``nnx.split`` (its graphdef
as a static argument, or bound into the function as `StableDiffusion`'s sampler has it).

    python benchmarks/jit_overhead.py [--size tiny|sd15] [--calls 50]

The function's body is trivial (``x + 1`` on 3 numbers), so the time is what the call itself costs
on the host: flattening the argument (``nnx.jit`` walks the module's graph and splits it at every
call) and dispatch. That is what a Python loop calling the UNet once per denoising step pays per
step; one jitted ``denoise`` pays it once. The UNet is built with random weights (``--size sd15``:
the real configuration, in bf16 to halve its 3.4 GB). Prints one table row per way.
"""
from __future__ import annotations

import argparse
import functools
import sys
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("tiny", "sd15"), default="tiny")
    parser.add_argument("--calls", type=int, default=50)
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from common import random_model, sd_configs
    from sdjax import UNet2DConditionModel

    unet = random_model(UNet2DConditionModel, sd_configs(args.size)["unet"],
                        dtype=jnp.bfloat16 if args.size == "sd15" else jnp.float32)
    graphdef, state = nnx.split(unet)
    x = jnp.zeros(3)
    ways = {"nnx.jit(f)(module, x)": (nnx.jit(lambda m, x: x + 1), (unet, x)),
            "jax.jit(f)(module, x)": (jax.jit(lambda m, x: x + 1), (unet, x)),
            "jax.jit(f)(state, x), state from nnx.split once": (jax.jit(lambda s, x: x + 1), (state, x)),
            # a static argument is hashed at every call, a graphdef all through its module tree
            "jax.jit(f, static_argnums=0)(graphdef, state, x)":
                (jax.jit(lambda g, s, x: x + 1, static_argnums=0), (graphdef, state, x)),
            "jax.jit(functools.partial(f, graphdef))(state, x)":
                (jax.jit(functools.partial(lambda g, s, x: x + 1, graphdef)), (state, x))}
    print(f"{args.size} UNet: {len(jax.tree.leaves(state))} weight arrays; {jax.devices()[0].device_kind}")
    print("| call | ms per call |\n| --- | --- |")
    for name, (fn, fn_args) in ways.items():
        fn(*fn_args).block_until_ready()   # compile
        seconds = timeit.timeit(lambda: fn(*fn_args).block_until_ready(), number=args.calls) / args.calls
        print(f"| `{name}` | {seconds * 1e3:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
