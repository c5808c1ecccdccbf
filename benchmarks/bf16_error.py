"""How far the bf16 sampler lands from the fp32 one, through the whole pipeline.

The same prompts, seeds, initial noise and scheduler go through ``sampling.generate`` (CLIP, the
``lax.scan`` of guided UNet calls, the VAE decode) twice: every model in fp32, then every model in
bf16 (weights and activations; the scheduler state and the guidance combination stay fp32). Per
scheduler it prints the error of the bf16 images against the fp32 ones (on [0, 1]: max and mean
abs, PSNR, the largest 8-bit level difference) and of the last predicted clean latents (relative
L2), and writes a JSON (``--output``, default ``$OUT/bf16_error.json`` when ``$OUT`` is set).

    python benchmarks/bf16_error.py --resolution 256 --steps 10 --schedulers pndm,euler_a,dpmpp_2m  # 2-core CPU: 9 min
    python benchmarks/bf16_error.py --schedulers pndm                        # on a GPU: 512 px, 50 steps

The weights are the random SD v1.5 folder of benchmarks/common.py (written once to ``--workdir``),
so this measures the bf16 rounding through the sampler, not image quality with trained weights.
``SDJAX_ATTENTION=cudnn`` runs the bf16 side with cuDNN's fused attention (GPU). The tiny-config
bound is tested in tests/test_sampling.py::test_bf16_sampler_stays_close_to_fp32.
Needs sdjax (the model configs come from the torch-free tests/model_configs.py).
"""
from __future__ import annotations

import argparse
import os
import time

import common as C  # benchmarks/common.py (this script's folder is on sys.path)


def sampler(directory, dtype):
    """A function (scheduler, steps, resolution, prompts, seeds, noise) -> (images [B, H, W, 3], last
    predicted clean latents), sampling with every model of the folder loaded in ``dtype``."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from sdjax import sampling
    from sdjax.pipeline import StableDiffusion
    from sdjax.text import tokenize

    t0 = time.perf_counter()
    pipe = StableDiffusion.from_pretrained(directory, dtype=dtype)
    C.log(f"loaded in {jnp.dtype(dtype).name} in {time.perf_counter() - t0:.0f} s")
    graphdefs, state = zip(*(nnx.split(m) for m in (pipe.text_encoder, pipe.unet, pipe.vae)))
    graphdefs, state = sampling.SDState(*graphdefs), sampling.SDState(*state)
    run = jax.jit(sampling.generate, static_argnums=0,
                  static_argnames=("latent_shape_HWC", "use_guidance", "return_predictions"))

    def sample(*, scheduler: str, steps: int, resolution: int, prompts, seeds, noise):
        latent_shape = (resolution // pipe.vae_scale,) * 2 + (pipe.unet.config.in_channels,)
        t0 = time.perf_counter()
        out = run(graphdefs, state, pipe.make_scheduler(scheduler, steps), tokenize(pipe.tokenizer, prompts),
                  tokenize(pipe.tokenizer, [""] * len(prompts)), jnp.asarray(seeds, jnp.uint32), noise,
                  jnp.float32(7.5), latent_shape_HWC=latent_shape, use_guidance=True, return_predictions=True)
        images, last_x0 = np.asarray(out.images), np.asarray(out.predictions[-1], np.float32)
        C.log(f"  {jnp.dtype(dtype).name}: {time.perf_counter() - t0:.0f} s (compile + run)")
        return images, last_x0
    return sample


def compare(ref, got, ref_x0, got_x0) -> dict:
    import numpy as np
    err = np.abs(got.astype(np.float64) - ref)
    mse = float((err ** 2).mean())
    levels = np.abs(np.round(got * 255).astype(int) - np.round(ref * 255).astype(int))
    return {"image_max_abs": float(err.max()), "image_mean_abs": float(err.mean()),
            "psnr_db": float(10 * np.log10(1.0 / mse)) if mse > 0 else float("inf"),
            "max_8bit_levels": int(levels.max()), "pixels_off_by_2_levels_pct": float(100 * (levels > 2).mean()),
            "x0_rel_l2": float(np.linalg.norm(got_x0 - ref_x0) / np.linalg.norm(ref_x0)),
            "fp32_image_std": float(ref.std()), "fp32_clipped_pct": float(100 * ((ref <= 0) | (ref >= 1)).mean())}


COLUMNS = [("scheduler", "scheduler", "s"), ("steps", "steps", "d"), ("image max abs", "image_max_abs", ".4f"),
           ("image mean abs", "image_mean_abs", ".5f"), ("PSNR dB", "psnr_db", ".1f"),
           ("max 8-bit levels", "max_8bit_levels", "d"), ("% pixels > 2 levels", "pixels_off_by_2_levels_pct", ".3f"),
           ("last x0 rel. L2", "x0_rel_l2", ".4f"), ("fp32 image std", "fp32_image_std", ".3f"),
           ("fp32 % clipped", "fp32_clipped_pct", ".1f")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=C.DEFAULT_WORKDIR)
    parser.add_argument("--size", choices=["sd15", "tiny"], default="sd15")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--schedulers", default="pndm,euler_a,dpmpp_2m")
    parser.add_argument("--images", type=int, default=2, help="prompts (one seed each)")
    parser.add_argument("--output", default=C.default_results_path("bf16_error.json"))
    args = parser.parse_args()
    if args.resolution % 64:
        parser.error(f"--resolution {args.resolution}: use a multiple of 64")

    import jax
    import jax.numpy as jnp
    import numpy as np
    directory = C.ensure_pipeline(args.workdir, args.size)
    scale = C.vae_scale(C.sd_configs(args.size)["vae"])
    prompts = [C.PROMPTS[i % len(C.PROMPTS)] for i in range(args.images)]
    seeds = list(range(args.images))
    noise = np.random.default_rng(0).standard_normal(
        (args.images, args.resolution // scale, args.resolution // scale, 4)).astype(np.float32)
    sample_fp32, sample_bf16 = sampler(directory, jnp.float32), sampler(directory, jnp.bfloat16)
    rows = []
    for name in args.schedulers.split(","):
        C.log(f"{name}, {args.steps} steps, {args.resolution} px, {args.images} images:")
        kw = dict(scheduler=name, steps=args.steps, resolution=args.resolution, prompts=prompts, seeds=seeds,
                  noise=noise)
        # JAX's default precision lets XLA:GPU compute float32 matmuls and convolutions in TF32: the
        # reference would not be fp32 there (on the CPU this changes nothing).
        with jax.default_matmul_precision("highest"):
            ref, ref_x0 = sample_fp32(**kw)
        got, got_x0 = sample_bf16(**kw)
        rows.append({"scheduler": name, "steps": args.steps, **compare(ref, got, ref_x0, got_x0)})
        C.log(C.markdown_table(rows[-1:], COLUMNS))
    payload = {"script": "bf16_error.py", "env": C.env_info(), "device": C.device_name(),
               "backend": jax.default_backend(), "attention": os.environ.get("SDJAX_ATTENTION", "auto"),
               "args": vars(args), "rows": rows, "columns": COLUMNS}
    C.save_results(args.output, payload)
    print(f"\nbf16 vs fp32 sampler, {args.size} random weights, {args.resolution} px, {args.images} images, "
          f"guidance 7.5, {payload['device']}, SDJAX_ATTENTION={payload['attention']}\n")
    print(C.markdown_table(rows, COLUMNS))


if __name__ == "__main__":
    main()
