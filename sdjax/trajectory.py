"""Pictures of the diffusion process, both directions.

* :func:`denoising_trajectory` — sampling: watch the noise resolve into a picture. Frames are the
  decoded initial noise, the model's predicted clean image at evenly spaced steps, and the final image.
* :func:`noising_trajectory` — training: add noise, then learn to undo it. Frames are a real image
  pushed through the forward process q(x_t | x_0) at increasing timesteps with one fixed noise draw.

Lay frames out with :func:`image_strip` (one labelled strip or grid) or animate them with
:func:`save_gif`::

    frames, labels = denoising_trajectory(pipe, "a photo of a cat", seed=7, steps=50)
    image_strip(frames, labels).save("cat-trajectory.png")
    save_gif(frames, "cat-trajectory.gif")
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from sdjax import parallel, sampling
from sdjax.images import as_pil, image_batch, image_strip, save_gif
from sdjax.schedulers import add_noise, make_noise_schedule

__all__ = ["image_strip", "save_gif", "denoising_trajectory", "noising_trajectory", "trajectory_steps",
           "output_trajectory", "noise_images", "prepare_image"]

DEFAULT_NOISING_TIMESTEPS = (0, 100, 250, 500, 750, 999)


# ----------------------------------------------------------------------------- sampling direction
def trajectory_steps(num_model_calls: int, num_frames: int, first_call: int = 0) -> list[int]:
    """Loop indices at which to show the predicted clean image so that, with the noise frame in
    front and the final image at the end, there are at most ``num_frames`` frames (>= 3).
    ``first_call``: the index the schedule starts at (img2img: past 0)."""
    if num_frames < 3:
        raise ValueError(f"num_frames={num_frames}: a trajectory needs at least 3 frames (noise, a step, final)")
    # evenly spaced over [0, last], the last one dropped: the final image shows that step
    picks = np.linspace(first_call, num_model_calls - 1, num_frames - 1)[:-1]
    return sorted({int(round(x)) for x in picks})


def noise_images(pipe, seeds: Sequence[int], height: int, width: int, *, variation_seeds: Sequence[int] | None = None,
                 variation_strength: float = 0.0, seed_resize_from: tuple[int, int] | None = None) -> np.ndarray:
    """The initial noise of each seed (exactly what ``pipe`` starts from for that seed; with
    ``variation_seeds``, moved toward theirs as `sdjax.sampling.vary_noise` moves it; with
    ``seed_resize_from``, (height, width) pixels, drawn at that size as the pipeline draws it), decoded by
    the VAE: "step 0 — pure noise" as a picture. float32 [len(seeds), H, W, 3].

    Decoded with the pipeline's own jitted decoder on a batch padded and sharded like the
    pipeline's, so it reuses the compilation that decodes the intermediate steps.
    """
    seeds_np = np.asarray(list(seeds), np.uint32)
    latent_shape = (height // pipe.vae_scale, width // pipe.vae_scale, pipe.vae.config.latent_channels)
    varied = variation_seeds is not None and variation_strength
    noise = sampling.seed_noise(sampling.image_keys(jnp.asarray(seeds_np)), latent_shape,
                                jnp.asarray(np.asarray(variation_seeds, np.uint32)) if varied else None,
                                variation_strength, None if seed_resize_from is None else tuple(
                                    int(side) // pipe.vae_scale for side in seed_resize_from))
    return _decode_batch(pipe, np.asarray(noise))


def _decode_batch(pipe, latents_BHWC: np.ndarray) -> np.ndarray:
    n = latents_BHWC.shape[0]
    padded = parallel.pad_batch(np.asarray(latents_BHWC, np.float32), parallel.padded_size(n, pipe.mesh))
    images = pipe._decode(pipe.state.vae, parallel.shard_batch(padded, pipe.mesh))
    return parallel.to_host(images)[:n]


def _step_label(scheduler, i: int) -> str:
    t = int(round(float(np.asarray(scheduler.timesteps)[i])))
    return f"step {i + 1} t={t}"


def output_trajectory(out, index: int, scheduler, noise_frame: np.ndarray | None = None,
                      first_label: str = "noise") -> tuple[list[np.ndarray], list[str]]:
    """Frames and labels of image ``index`` of a pipeline output made with ``return_intermediates``:
    [noise (if given; img2img's init image, ``first_label``)] + predicted clean images at
    ``out.intermediate_steps`` + the final image.
    ``scheduler`` (the one that made ``out``) supplies each step's timestep for the labels."""
    if out.intermediates is None:
        raise ValueError("the output has no intermediates: call the pipeline with return_intermediates=...")
    frames, labels = [], []
    if noise_frame is not None:
        frames.append(np.asarray(noise_frame))
        labels.append(first_label)
    for k, step in enumerate(out.intermediate_steps):
        frames.append(out.intermediates[k, index])
        labels.append(_step_label(scheduler, step))
    frames.append(out.images[index])
    labels.append("final")
    return frames, labels


def denoising_trajectory(pipe, prompt: str, seed: int = 0, *, steps: int = 50, num_frames: int = 8,
                         negative_prompt: str | None = None, scheduler: str = "pndm", **kwargs
                         ) -> tuple[list[np.ndarray], list[str]]:
    """Generate one image and return how it got there: "watch the noise resolve into a picture".

    Frames (float [H, W, 3] in [0, 1]): the seed's initial noise decoded, the model's prediction of
    the clean image at evenly spaced steps, and the final image — ``num_frames`` at most (fewer when
    there are fewer steps). Labels: ``"noise"``, ``"step 10 t=801"``, ..., ``"final"``. Other keyword
    arguments (``guidance_scale``, ``height``, ``width``, ``scheduler_options``, ``latents``, ``clip_skip``,
    img2img's ``init_images`` and ``strength``) go to the pipeline call, so the final frame is exactly the
    image ``pipe(prompt, seeds=seed, ...)`` makes; img2img's first frame is its init image (``"init image"``).
    """
    sched = pipe.make_scheduler(scheduler, steps, **(kwargs.get("scheduler_options") or {}))
    init = kwargs.get("init_images")
    first_call = 0 if init is None else sampling.img2img_start(steps, kwargs.get("strength"))
    picks = trajectory_steps(sched.num_model_calls, num_frames, first_call)
    out = pipe(prompt, negative_prompt, seeds=seed, num_inference_steps=steps, scheduler=scheduler,
               return_intermediates=picks, **kwargs)
    height, width = out.images.shape[1:3]
    if init is not None:
        return output_trajectory(out, 0, sched, image_batch(init)[0], "init image")
    if kwargs.get("latents") is not None:
        noise = _decode_batch(pipe, np.asarray(kwargs["latents"], np.float32))[0]
    else:
        noise = noise_images(pipe, [seed], height, width)[0]
    return output_trajectory(out, 0, sched, noise)


# ----------------------------------------------------------------------------- training direction
def prepare_image(image, size: int | tuple[int, int] | None = None, multiple: int = 8) -> np.ndarray:
    """A PIL image or array -> float32 [H, W, 3] in [0, 1], with H and W multiples of ``multiple``.

    ``size`` (an int for a square, or (height, width)): resize so the image covers it, then
    center-crop to it. Without ``size``, center-crop to the largest multiple of ``multiple``.
    """
    pil = as_pil(image).convert("RGB")
    if size is not None:
        th, tw = (size, size) if np.ndim(size) == 0 else (int(size[0]), int(size[1]))
        scale = max(th / pil.height, tw / pil.width)
        pil = pil.resize((max(tw, round(pil.width * scale)), max(th, round(pil.height * scale))),
                         Image.Resampling.BICUBIC)
    else:
        th, tw = pil.height // multiple * multiple, pil.width // multiple * multiple
    if th % multiple or tw % multiple or th <= 0 or tw <= 0:
        raise ValueError(f"image size {tw}x{th} must be a positive multiple of {multiple}")
    left, top = (pil.width - tw) // 2, (pil.height - th) // 2
    pil = pil.crop((left, top, left + tw, top + th))
    return np.asarray(pil, np.float32) / 255.0


@functools.partial(jax.jit, static_argnums=0)
def _noise_and_decode(vae_graphdef, vae_state, image_1HWC, noise_1hwc, alphas_cumprod, timesteps_T):
    """Encode (posterior mean), noise at each timestep with the same noise, decode: [T, H, W, 3]."""
    vae = nnx.merge(vae_graphdef, vae_state)
    clean = vae.encode(image_1HWC * 2.0 - 1.0).mean * vae.scaling_factor      # [1, h, w, C] UNet space
    T = timesteps_T.shape[0]
    noisy = add_noise(alphas_cumprod, jnp.broadcast_to(clean, (T, *clean.shape[1:])),
                      jnp.broadcast_to(noise_1hwc, (T, *noise_1hwc.shape[1:])), timesteps_T)
    return sampling.decode_latents(vae, noisy)


def noising_trajectory(pipe, image, timesteps: Sequence[int] = DEFAULT_NOISING_TIMESTEPS, *, seed: int = 0,
                       size: int | tuple[int, int] | None = None) -> tuple[list[np.ndarray], list[str]]:
    """The forward (training) process on a real image: "add noise, then learn to undo it".

    ``image`` (PIL or array; see :func:`prepare_image` for ``size`` and cropping) is VAE-encoded to
    its posterior mean times the VAE scaling factor (the clean latents x_0 a training step uses),
    noised to x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps for each timestep with ONE noise draw
    ``eps = jax.random.normal(jax.random.key(seed), latent_shape)`` (abar from the pipeline's
    scheduler config), and decoded back. At t=0 the frame is (almost) the VAE round trip; at t=999
    almost only noise is left. Returns (frames float [H, W, 3] in [0, 1], labels ``"t=500"``).
    """
    timesteps = [int(t) for t in timesteps]
    alphas_cumprod = make_noise_schedule(pipe.scheduler_config)
    bad = [t for t in timesteps if not 0 <= t < len(alphas_cumprod)]
    if bad or not timesteps:
        raise ValueError(f"timesteps {bad or timesteps} must be a non-empty list in 0..{len(alphas_cumprod) - 1}")
    pixels = prepare_image(image, size, multiple=8)
    h, w = pixels.shape[0] // pipe.vae_scale, pixels.shape[1] // pipe.vae_scale
    noise = jax.random.normal(jax.random.key(seed), (h, w, pipe.vae.config.latent_channels), jnp.float32)
    frames = _noise_and_decode(pipe._graphdefs.vae, pipe.state.vae, jnp.asarray(pixels)[None], noise[None],
                               jnp.asarray(alphas_cumprod), jnp.asarray(timesteps, jnp.int32))
    frames = np.asarray(frames)
    return [frames[i] for i in range(len(timesteps))], [f"t={t}" for t in timesteps]
