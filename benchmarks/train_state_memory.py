"""Per-device bytes of the SD v1.5 training state (UNet fine-tune, AdamW, EMA) as sdjax places it,
and of a LoRA run's.

    python benchmarks/train_state_memory.py

Shapes only (``jax.eval_shape`` of the real SD v1.5 UNet config, no weights, no compute), on 16
simulated CPU devices: the weights are whole on every device, the AdamW moments and the EMA split
over the devices as ``sdjax.training.step.init_state(..., mesh=)`` puts them (``parallel.spread_sharding``).
Gradients and activations come on top (XLA's scratch memory; BENCHMARKS.md has those figures).
"""
import os
import sys
from pathlib import Path

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=16"
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))   # model_configs.py: the SD v1.5 configs

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import model_configs as R  # noqa: E402
from sdjax import UNet2DConditionModel, parallel  # noqa: E402
from sdjax.training import lora  # noqa: E402
from sdjax.training import step as S  # noqa: E402


def gib(tree, mesh=None) -> float:
    """GiB of ``tree`` on one device of ``mesh`` (split as spread_sharding says), or whole."""
    def shard_elements(a):
        return np.prod(parallel.spread_sharding(a.shape, mesh).shard_shape(a.shape) if mesh else a.shape)
    return sum(int(shard_elements(a)) * a.dtype.itemsize for a in jax.tree.leaves(tree)) / 2**30


def main() -> None:
    abstract = nnx.eval_shape(lambda: UNet2DConditionModel(R.SD15_UNET, rngs=nnx.Rngs(0)))
    params = {"unet": nnx.to_pure_dict(nnx.state(abstract, nnx.Param))}
    optimizer, _ = S.make_optimizer(1e-5, warmup_steps=0, schedule="constant", total_steps=None)
    state = jax.eval_shape(lambda p: S.init_state(p, optimizer, 0, ema=True), params)
    weights, split_parts = gib(state.params), (state.opt_state, state.ema)
    print(f"SD v1.5 UNet fp32: weights {weights:.2f} GiB, AdamW moments {gib(state.opt_state):.2f} GiB, "
          f"EMA {gib(state.ema):.2f} GiB")
    print("| devices | weights (whole) | moments + EMA (split) | per device | all replicated |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for n in (1, 2, 4, 8, 16):
        split = gib(split_parts, parallel.data_mesh(jax.devices()[:n]))
        print(f"| {n} | {weights:.2f} | {split:.2f} | {weights + split:.2f} | {weights + gib(split_parts):.2f} |")
    # LoRA (train.py --lora-rank): the UNet stays as loaded (fp32 here); the state is the LoRA alone
    frozen = params["unet"]
    print("\nLoRA of the UNet's attention projections (to_q, to_k, to_v, to_out.0), one device:")
    print("| rank | LoRA weights | state (weights + AdamW + EMA) | frozen UNet fp32 | LoRA file |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for rank in (4, 16, 64):
        spec = lora.lora_spec(params, rank=rank)
        lora_params = {"lora": jax.eval_shape(lambda: lora.init_lora(spec, params, jax.random.key(0)))}
        lora_state = jax.eval_shape(lambda p: S.init_state(p, optimizer, 0, ema=True), lora_params)
        file_mib = gib(lora_params) * 1024   # float32, as the export writes it (+ one alpha per module)
        print(f"| {rank} | {gib(lora_state.params) * 1024:.1f} MiB | {gib(lora_state) * 1024:.1f} MiB | "
              f"{gib(frozen):.2f} GiB | {file_mib:.1f} MiB |")


if __name__ == "__main__":
    import argparse
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                            formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    main()
