"""Text-to-image sampling as pure functions: encode prompts, denoise with one ``lax.scan``, decode.

Everything here is traceable: models are NNX modules (merged from their state inside the traced
function), the scheduler is a pytree, and prompts, seeds, guidance scale and latents are array
arguments, so a new prompt or seed never recompiles. `sdjax.pipeline.StableDiffusion` wraps these
with tokenization, batching and device sharding; research code can call them directly.
"""
from __future__ import annotations

import copy
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.typing import ArrayLike

from sdjax.models.layers import check_nhwc
from sdjax.schedulers import Scheduler, alpha_prediction_to_x0_and_eps, image_key_count

F32 = jnp.float32
DEFAULT_STRENGTH = 0.8   # img2img's, as diffusers' StableDiffusionImg2ImgPipeline


def image_keys(seeds_B) -> jax.Array:
    """One PRNG key per image, from its seed (integers in [0, 2**32 - 1], [B]; a list works too).
    Concrete seeds are checked (seeds out of range would wrap onto others' keys); traced ones, and
    an array spread over several processes, are taken as they are."""
    if not isinstance(seeds_B, jax.core.Tracer) and getattr(seeds_B, "is_fully_addressable", True):
        seeds = np.asarray(seeds_B)
        if seeds.ndim != 1 or seeds.dtype.kind not in "iu":
            raise ValueError(f"seeds_B: expected a 1-D array of integer seeds, got shape {seeds.shape} of {seeds.dtype}")
        if seeds.size and (seeds.min() < 0 or seeds.max() > 2**32 - 1):
            raise ValueError(f"seeds_B: seeds must be in [0, 2**32 - 1], got {seeds.min()}..{seeds.max()}")
        # a JAX array keeps its placement (split over devices: so are the keys)
        seeds_B = seeds_B.astype(jnp.uint32) if isinstance(seeds_B, jax.Array) else jnp.asarray(seeds.astype(np.uint32))
    return jax.vmap(jax.random.key)(seeds_B)


def initial_noise(keys_B, latent_shape_HWC) -> jax.Array:
    """Unscaled N(0, 1) latents [B, h, w, C], each image's from its own key, so an image does not
    depend on the batch it is generated in. ``keys_B``: typed keys [B] (`image_keys` makes them
    from seeds) or raw uint32 keys [B, 2]."""
    if image_key_count(keys_B) is None:
        raise ValueError(f"initial_noise takes one PRNG key per image (typed [B] or raw uint32 [B, 2]), got "
                         f"{_described(keys_B)}: "
                         "for seeds, initial_noise(image_keys(seeds), ...)")
    return jax.vmap(lambda k: jax.random.normal(k, latent_shape_HWC, F32))(keys_B)


def vary_noise(noise_BHWC, variation_BHWC, strength) -> jax.Array:
    """AUTOMATIC1111's variation seed ("Variation seed", "Variation strength"): each image's noise moved
    toward its variation seed's noise by ``strength`` in [0, 1] (0: the noise, 1: the variation's) along a
    great circle, as A1111's ``slerp`` does it: per image, for each column and channel (its noise is
    [C, h, w], normalised along h), and as its linear blend ``noise * strength + variation * (1 -
    strength)`` where the two are that close (mean cosine above 0.9995). ``strength``: a number (an
    input: new strengths compile nothing)."""
    low, high = jnp.asarray(noise_BHWC, F32), jnp.asarray(variation_BHWC, F32)
    if low.ndim != 4 or low.shape != high.shape:
        raise ValueError(f"vary_noise: noise of shape {tuple(low.shape)} and variation noise of shape "
                         f"{tuple(high.shape)}; expected the same [B, h, w, C]")
    val = jnp.asarray(strength, F32)
    dot = jnp.sum(low / jnp.linalg.norm(low, axis=1, keepdims=True)
                  * (high / jnp.linalg.norm(high, axis=1, keepdims=True)), axis=1)   # [B, w, C]
    omega = jnp.arccos(dot)
    so = jnp.sin(omega)
    slerped = (jnp.sin((1.0 - val) * omega) / so)[:, None] * low + (jnp.sin(val * omega) / so)[:, None] * high
    near = jnp.mean(dot, axis=(1, 2)) > 0.9995   # (A1111's blend there: its weights as it has them)
    return jnp.where(near[:, None, None, None], low * val + high * (1.0 - val), slerped)


def seed_noise(keys_B, latent_shape_HWC, variation_seeds_B=None, variation_strength=None,
               resize_from_hw: tuple[int, int] | None = None) -> jax.Array:
    """The noise each image starts from: `initial_noise` of its key, moved toward its variation seed's
    noise by ``variation_strength`` (`vary_noise`) where ``variation_seeds_B`` are given.
    ``resize_from_hw`` (latents' height, width): AUTOMATIC1111's "Seed resize from": that noise drawn at
    this size instead and laid over the middle of the seed's own noise at ``latent_shape_HWC`` (its middle
    part where it is larger), as A1111 places it (an odd difference leaves the extra row or column of the
    seed's own noise at the end), so that a seed keeps its picture's layout at another size."""
    h, w, c = latent_shape_HWC
    source = (h, w, c) if resize_from_hw is None else (*resize_from_hw, c)
    noise = initial_noise(keys_B, source)
    if variation_seeds_B is not None:
        noise = vary_noise(noise, initial_noise(image_keys(variation_seeds_B), source), variation_strength)
    if source[:2] == (h, w):
        return noise
    (h0, w0), (dy, dx) = source[:2], ((h - source[0]) // 2, (w - source[1]) // 2)
    rows, cols = h0 + 2 * min(dy, 0), w0 + 2 * min(dx, 0)   # (the part both have, at its place in each)
    part = noise[:, max(-dy, 0):max(-dy, 0) + rows, max(-dx, 0):max(-dx, 0) + cols]
    return initial_noise(keys_B, latent_shape_HWC).at[:, max(dy, 0):max(dy, 0) + rows,
                                                      max(dx, 0):max(dx, 0) + cols].set(part)


def _described(keys) -> str:
    """``keys`` that are not one key per image, for an error: its shape and dtype, or its type."""
    dtype = getattr(keys, "dtype", None)
    return f"shape {tuple(keys.shape)} of {dtype}" if dtype is not None else f"a {type(keys).__name__}"


def step_keys(keys_B) -> jax.Array:
    """The keys of the per-step noise of stochastic schedulers (euler_a, dpmpp_2m_sde, ddpm, ddim with eta > 0)
    as `generate` (and so the pipeline) derives them from the images' keys: distinct from the keys
    of the initial noise. ``denoise(..., keys_B=step_keys(image_keys(seeds)))`` gives the pipeline's
    images for those seeds."""
    return jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys_B)


def posterior_keys(keys_B) -> jax.Array:
    """The keys of img2img's draw from the VAE posterior of each init image, as `generate` (and so
    the pipeline) derives them from the images' keys: distinct from the initial noise's and the
    per-step noise's (`step_keys`)."""
    return jax.vmap(lambda k: jax.random.fold_in(k, 2))(keys_B)


def masked_image_keys(keys_B) -> jax.Array:
    """The keys of the draw from the VAE posterior of each masked image (an inpainting UNet's
    conditioning), as `generate` derives them from the images' keys: distinct from the init image's
    (`posterior_keys`), the initial noise's and the per-step noise's."""
    return jax.vmap(lambda k: jax.random.fold_in(k, 3))(keys_B)


def encode_images(vae, images_BHWC, keys_B=None) -> jax.Array:
    """Images float [B, H, W, 3] in [0, 1] -> UNet-space latents [B, H/8, W/8, C] (the other end of
    `decode_latents`): a draw from the VAE posterior with one key per image (``keys_B``: typed [B]
    or raw uint32 [B, 2]; `posterior_keys` gives the pipeline's), as diffusers' img2img pipeline
    encodes its init image, or the posterior mean with ``keys_B=None``; times ``vae.scaling_factor``.
    One image ([1, H, W, 3]) with B keys is encoded once and drawn from B times."""
    if hasattr(images_BHWC, "dtype") and not jnp.issubdtype(images_BHWC.dtype, jnp.floating):
        raise TypeError(f"images_BHWC has dtype {images_BHWC.dtype}; expected floats in [0, 1] (uint8 pixels / 255)")
    posterior = vae.encode(2.0 * jnp.asarray(images_BHWC, F32) - 1.0)
    if keys_B is None:
        return posterior.mean * vae.scaling_factor
    B = image_key_count(keys_B)
    if B is not None and posterior.mean.shape[0] == 1 < B:
        posterior = type(posterior)(*(jnp.broadcast_to(a, (B, *a.shape[1:])) for a in posterior))
    latents = posterior.sample(keys_B)
    return latents * vae.scaling_factor


def img2img_start(num_inference_steps: int, strength: float | None = None) -> int:
    """The loop index img2img begins at (``denoise(..., start=)``) for ``strength`` in (0, 1], the
    share of the schedule that is run (None: `DEFAULT_STRENGTH`), as diffusers'
    StableDiffusionImg2ImgPipeline computes it: the last ``int(num_inference_steps * strength)`` steps
    are denoised (PNDM's extra warm-up call included in its schedule: the index counts from its start
    all the same)."""
    strength = DEFAULT_STRENGTH if strength is None else strength
    if (isinstance(strength, (np.ndarray, jax.Array)) and strength.ndim == 0
            and not isinstance(strength, jax.core.Tracer)):
        strength = strength.item()   # a 0-d array of a number
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not 0 < strength <= 1:
        raise ValueError(f"strength must be a number in (0, 1], got {strength!r}")
    denoised = min(int(num_inference_steps * strength), num_inference_steps)
    if denoised == 0:
        raise ValueError(f"strength {strength} with {num_inference_steps} steps denoises no step: raise either")
    return num_inference_steps - denoised


def check_clip_skip(clip_skip, num_hidden_layers: int) -> int:
    """``clip_skip`` as a Python int, after checking it is a whole number in 1..``num_hidden_layers``
    (the text encoder's layer count); a ValueError naming the value and the range otherwise."""
    if (isinstance(clip_skip, (np.ndarray, jax.Array)) and clip_skip.ndim == 0
            and not isinstance(clip_skip, jax.core.Tracer)):
        clip_skip = clip_skip.item()   # a 0-d array of a number
    if (isinstance(clip_skip, (bool, np.bool_)) or not isinstance(clip_skip, numbers.Integral)
            or not 1 <= clip_skip <= num_hidden_layers):
        raise ValueError(f"clip_skip={clip_skip!r}: must be an integer in 1..{num_hidden_layers} (this text "
                         "encoder's layers; A1111's numbering: 1 = the last layer, 2 = the penultimate)")
    return int(clip_skip)


def emphasize(states_BTD, weights_BT, restore_mean: bool = True) -> jax.Array:
    """AUTOMATIC1111's prompt emphasis ("Original", its default) on text states [B, T, D]: each token's
    states times its weight ([B, T], `sdjax.text.tokenize_weighted` gives them), then each prompt's states
    rescaled so that their mean over tokens and channels is what it was before (A1111: "restoring original
    mean is likely not correct, but it seems to work well to prevent artifacts"). In float32, returned in
    the states' dtype; weights of 1 give the states back up to rounding. ``restore_mean=False``: the
    weighted states as they are (A1111's Emphasis "No norm")."""
    states = jnp.asarray(states_BTD)
    weights = jnp.asarray(weights_BT, F32)
    if states.ndim != 3 or weights.shape != states.shape[:2]:
        raise ValueError(f"emphasize: weights of shape {tuple(weights.shape)} for text states of shape "
                         f"{tuple(states.shape)}; expected one weight per token, {tuple(states.shape[:2])}")
    x = states.astype(F32)
    weighted = x * weights[:, :, None]
    if not restore_mean:
        return weighted.astype(states.dtype)
    scale = x.mean(axis=(1, 2), keepdims=True) / weighted.mean(axis=(1, 2), keepdims=True)
    return (weighted * scale).astype(states.dtype)


def encode_prompts(text_encoder, token_ids_BT, clip_skip: int = 1, weights_BT=None, *,
                   restore_mean: bool = True) -> jax.Array:
    """Text states [B, 77, D] that the UNet attends to, from token ids [B, 77] (`sdjax.text.tokenize`
    makes them from prompts): ``last_hidden_state``, or with ``clip_skip`` N > 1 ("Clip skip" as
    AUTOMATIC1111 numbers it; diffusers' ``clip_skip=k`` is N = k + 1) the output of the N-th layer from
    the end, ``hidden_states[-N]``, through the final layer norm as the web UIs and diffusers apply it.
    ``clip_skip`` is static (a Python int in 1..num_hidden_layers); under ``jit`` the layers after
    the one used are not computed. ``weights_BT``: AUTOMATIC1111's emphasis weights of the tokens
    (float [B, 77], `sdjax.text.tokenize_weighted`), applied to those states by `emphasize` (with
    ``restore_mean``, static: False is A1111's Emphasis "No norm"); None: none.

    Ids of k windows one after the other ([B, 77 * k], AUTOMATIC1111's long prompts and ``BREAK``:
    `sdjax.text.tokenize_weighted`) are encoded window by window, as A1111 does, and the windows' states
    concatenated ([B, 77 * k, D]); the weights (same shape as the ids) apply per window, each window's
    mean restored on its own (A1111's ``process_tokens`` on each chunk). The window is the text encoder's
    ``max_position_embeddings``; k is static (each k compiles its own program)."""
    if isinstance(token_ids_BT, str) or (isinstance(token_ids_BT, (list, tuple)) and token_ids_BT
                                         and isinstance(token_ids_BT[0], str)):
        raise TypeError("encode_prompts takes token ids, not text: tokenize the prompts first, "
                        "sdjax.text.tokenize(pipe.tokenizer, prompts)")
    clip_skip = check_clip_skip(clip_skip, text_encoder.config.num_hidden_layers)
    shape, window = np.shape(token_ids_BT), text_encoder.config.max_position_embeddings
    if len(shape) == 2 and shape[1] > window:   # several windows: each encoded on its own
        if shape[1] % window:
            raise ValueError(f"token_ids_BT has shape {tuple(shape)}: more tokens than the text encoder's window of "
                             f"{window} (max_position_embeddings), and not whole windows of it (k * {window}, "
                             "sdjax.text.tokenize_weighted lays out long prompts so)")
        if weights_BT is not None and np.shape(weights_BT) != shape:
            raise ValueError(f"weights_BT has shape {tuple(np.shape(weights_BT))}; expected one weight per token, "
                             f"{tuple(shape)}")
        B, k = shape[0], shape[1] // window
        per_window = lambda x: jnp.reshape(x, (B * k, window))  # noqa: E731
        states = encode_prompts(text_encoder, per_window(token_ids_BT), clip_skip,
                                None if weights_BT is None else per_window(weights_BT), restore_mean=restore_mean)
        return states.reshape(B, k * window, states.shape[-1])
    if clip_skip == 1:
        states = text_encoder(token_ids_BT).last_hidden_state
    else:
        hidden = text_encoder(token_ids_BT, output_hidden_states=True).hidden_states
        states = text_encoder.text_model.final_layer_norm(hidden[-clip_skip])
    return states if weights_BT is None else emphasize(states, weights_BT, restore_mean)


class TextSchedule(NamedTuple):
    """Text states that change during sampling (AUTOMATIC1111's prompt editing and alternation:
    `sdjax.text.edited_prompts`), as `denoise` takes them in place of one state per image:
    ``states_BPSD`` [B, P, S, D], the states of each image's P texts, and ``phases_BC`` int [B, C], for
    each of the run's C model calls (from the first one run) the text it conditions on; or phases
    [B, K, C], the texts of each image's K parts at once (a `Composition`'s)."""
    states_BPSD: jax.Array
    phases_BC: jax.Array

    def at(self, c) -> jax.Array:
        """The states [B, S, D] of model call ``c`` (counted from the run's first); [B, K, S, D] with
        phases [B, K, C]."""
        if self.phases_BC.ndim == 3:
            phase_BK = jax.lax.dynamic_index_in_dim(self.phases_BC, c, axis=2, keepdims=False)
            return jnp.take_along_axis(self.states_BPSD, phase_BK[:, :, None, None], axis=1)
        phase_B = jax.lax.dynamic_index_in_dim(self.phases_BC, c, axis=1, keepdims=False)
        return jnp.take_along_axis(self.states_BPSD, phase_B[:, None, None, None], axis=1)[:, 0]


class Composition(NamedTuple):
    """Several texts per image at once: AUTOMATIC1111's ``AND`` (composable diffusion, Liu et al. 2022),
    guided as eps_u + g * sum_k w_k (eps_k - eps_u) over each image's K texts, as A1111's
    ``combine_denoised`` does. ``texts``: their states [B, K, S, D], or a `TextSchedule` whose phases are
    [B, K, C] (prompt editing in the parts); ``weights_BK``: float [B, K], the parts' weights (a part of
    weight 0 adds nothing: the padding of an image with fewer parts). `denoise` takes it as ``cond_BSD``,
    with ``uncond_BSD`` given (the parts act through guidance)."""
    texts: Any
    weights_BK: jax.Array


class InpaintBlend(NamedTuple):
    """Inpainting with a text-to-image UNet, as diffusers' StableDiffusionInpaintPipeline does it for a
    4-channel UNet: after each scheduler step, the latents where ``mask_BHW1`` is 0 (the part of the
    picture that is kept) are replaced by ``image_latents_BHWC`` noised with ``noise_BHWC`` to the next
    model call's level (after the last step: the clean image latents). ``mask_BHW1``: float [B or 1, h, w,
    1] at the latents' size, 1 where the image is repainted (values between blend the two); the latents
    and noise: [B or 1, h, w, C]. `denoise` takes it as ``blend``."""
    mask_BHW1: jax.Array
    image_latents_BHWC: jax.Array
    noise_BHWC: jax.Array


def latent_mask(mask_BHW1, latent_hw: tuple[int, int]) -> jax.Array:
    """An image-size mask [B, H, W, 1] at the latents' size (h, w), by nearest neighbour as torch's
    ``F.interpolate`` (diffusers' inpainting) takes it: the top-left pixel of each H/h x W/w cell."""
    mask = jnp.asarray(mask_BHW1, F32)
    H, W = mask.shape[1:3]
    h, w = latent_hw
    if mask.ndim != 4 or mask.shape[-1] != 1 or H % h or W % w:
        raise ValueError(f"mask_BHW1 has shape {tuple(mask.shape)}; expected [B, H, W, 1] with H, W multiples of the "
                         f"latents' {h}, {w}")
    return mask[:, ::H // h, ::W // w]


def inpainting_inputs(vae, init_images_BHWC, mask_BHW1, keys_B) -> jax.Array:
    """An inpainting UNet's extra input channels (diffusers' StableDiffusionInpaintPipeline): the mask at
    the latents' size, then the latents of the masked image (the init images with the repainted part,
    ``mask_BHW1 >= 0.5``, set to gray), a posterior draw with ``keys_B`` (`masked_image_keys` in
    `generate`). Returns [B, h, w, 1 + C], for `denoise`'s ``unet_extra_BHWC``."""
    images = jnp.asarray(init_images_BHWC, F32)
    mask = jnp.asarray(mask_BHW1, F32)
    masked = jnp.where(mask < 0.5, images, 0.5)   # (0 in the VAE's [-1, 1])
    latents = encode_images(vae, masked, keys_B)
    small = latent_mask(mask, latents.shape[1:3])
    small = jnp.broadcast_to(small, (latents.shape[0], *small.shape[1:]))
    return jnp.concatenate([small, latents], axis=-1)


def extend_by_last_state(states, lengths) -> jax.Array:
    """Text states [B, P, S, D] of each image's P texts, each with its own length (``lengths`` int
    [B, P], tokens: 77 x its windows) brought to the longest of its image's by repeating its last
    state, as AUTOMATIC1111's ``reconstruct_multicond_batch`` lines up the parts of an ``AND`` that take
    different window counts; the states past an image's longest are left as they are."""
    S = states.shape[-2]
    lengths = jnp.asarray(lengths, jnp.int32)
    s = jnp.arange(S, dtype=jnp.int32)
    longest = lengths.max(axis=-1, keepdims=True)[..., None]                       # [B, 1, 1]
    source = jnp.where(s < longest, jnp.minimum(s, lengths[..., None] - 1), s)     # [B, P, S]
    return jnp.take_along_axis(states, source[..., None], axis=-2)


def encode_edited_prompts(text_encoder, token_ids_BPT, phases_BC, clip_skip: int = 1,
                          weights_BPT=None, *, restore_mean: bool = True) -> TextSchedule:
    """`encode_prompts` of each image's P texts (token ids [B, P, T], weights alike or None) and their
    model calls' phases ([B, C]), as a `TextSchedule`."""
    B, P, T = np.shape(token_ids_BPT)
    flat = lambda x: None if x is None else jnp.reshape(x, (B * P, T))  # noqa: E731
    states = encode_prompts(text_encoder, flat(token_ids_BPT), clip_skip, flat(weights_BPT), restore_mean=restore_mean)
    return TextSchedule(states.reshape(B, P, *states.shape[1:]), jnp.asarray(phases_BC, jnp.int32))


def predicted_clean(scheduler: Scheduler, model_input, model_output, i) -> jax.Array:
    """The model's estimate of the clean latents x_0 at loop index ``i`` (for trajectories).

    ``model_input`` is the variance-preserving sample x_t the UNet saw (schedulers that keep
    sigma-scaled latents scale them down in ``scale_model_input``).
    """
    x0, _ = alpha_prediction_to_x0_and_eps(scheduler.prediction_type, model_output, model_input,
                                           scheduler.alpha_bar(i))
    return x0


# AUTOMATIC1111's ControlNet "Control Mode"s (its extension's names): "prompt" weighs the residuals
# softly, the deeper ones more (ControlNet 1.1's soft injection: residual i of n times 0.825 ** (n - 1 - i));
# "controlnet" does so too and steers only the prompt's rows of guidance, not the negative prompt's (its
# "guess mode": the prompt's prediction alone carries the control)
# AUTOMATIC1111's inpainting "Masked content", what the repainted part starts from (sdjax's name -> A1111's):
# the picture's own latents, the picture filled with the colours around the part (before it is encoded:
# `sdjax.images.fill_masked`), the seed's noise or zeros in their place
MASKED_CONTENTS = {"original": "original", "fill": "fill", "latent_noise": "latent noise",
                   "latent_nothing": "latent nothing"}
CONTROL_MODES = {"balanced": "Balanced", "prompt": "My prompt is more important",
                 "controlnet": "ControlNet is more important"}
SOFT_INJECTION_BASE = 0.825


class ControlledUNet:
    """A UNet steered by a ControlNet, for `denoise` (which takes it as a UNet): at every call the
    ControlNet (`sdjax.models.ControlNetModel`) reads the latents, the text states and the control
    images and its residuals, times ``conditioning_scale``, are added to the UNet's skip connections
    and mid block, as diffusers' StableDiffusionControlNetPipeline adds them (at every step; its
    ``guess_mode=False``). ``control_images_BHWC``: float [B or 1, H, W, 3] in [0, 1], one per image
    (or one for all) at ``controlnet.config.image_scale`` pixels a latent; guidance's rows (an image's
    negative and prompt) repeat their image's. An inpainting UNet's extra channels are the UNet's only.
    ``conditioning_scale``: a number, or one per model call that `denoise` runs ([C], `control_scales`:
    diffusers' ``control_guidance_start`` / ``end``), which `denoise` picks with `at`.
    Several ControlNets (diffusers' ``MultiControlNetModel``): a tuple of them, a tuple of their control
    images and of their scales (or one scale for all); their residuals add up.
    ``control_mode``: AUTOMATIC1111's Control Mode (`CONTROL_MODES`, one for all or a tuple of one each):
    "balanced" (the above), "prompt" (residual i of n times 0.825 ** (n - 1 - i): the shallow ones
    weaker) or "controlnet" (so weighted, and added to the prompt's rows of guidance alone: `denoise`
    tells it which rows are the negative prompt's, `for_rows`)."""

    def __init__(self, unet, controlnet, control_images_BHWC, conditioning_scale: ArrayLike = 1.0,
                 control_mode: str | tuple[str, ...] = "balanced"):
        self.several = isinstance(controlnet, (list, tuple))
        self.unet, self.controlnets = unet, tuple(controlnet) if self.several else (controlnet,)
        n = len(self.controlnets)
        images = tuple(control_images_BHWC) if self.several else (control_images_BHWC,)
        scales = (tuple(conditioning_scale) if self.several and isinstance(conditioning_scale, (list, tuple))
                  else (conditioning_scale,) * n)
        if len(images) != n or len(scales) != n:
            raise ValueError(f"{n} ControlNets with {len(images)} control images and {len(scales)} scales: give "
                             "one of each a ControlNet")
        self.images = tuple(jnp.asarray(x) for x in images)
        self.scales = scales
        self.modes = tuple(control_mode) if isinstance(control_mode, (list, tuple)) else (control_mode,) * n
        if len(self.modes) != n or any(not isinstance(mode, str) or mode not in CONTROL_MODES for mode in self.modes):
            raise ValueError(f"control_mode={control_mode!r}: expected one of {', '.join(CONTROL_MODES)}"
                             + (f" for all {n} ControlNets, or a tuple of one each" if self.several else ""))
        self.uncond_rows = None   # (for_rows)
        for k, (cn, x) in enumerate(zip(self.controlnets, self.images)):
            check_nhwc(f"control_images_BHWC[{k}]" if self.several else "control_images_BHWC", x,
                       cn.config.conditioning_channels)

    def at(self, call) -> "ControlledUNet":
        """This UNet at model call ``call`` (from the first that runs): its scales there."""
        other = copy.copy(self)
        other.scales = tuple(s if np.ndim(s) == 0 else jnp.asarray(s)[call] for s in self.scales)
        return other

    def for_rows(self, uncond_rows) -> "ControlledUNet":
        """This UNet for a call whose rows are the negative prompt's where ``uncond_rows`` (bool [rows],
        static) is true: the "controlnet" Control Mode steers the others alone."""
        other = copy.copy(self)
        other.uncond_rows = np.asarray(uncond_rows, bool)
        return other

    @property
    def config(self):
        """The UNet's config (`denoise` checks the latents and text states against it)."""
        return self.unet.config

    def __call__(self, x_BHWC, t, text_BSD) -> jax.Array:
        down = mid = None
        uncond = self.uncond_rows
        if uncond is not None and uncond.shape != (x_BHWC.shape[0],):
            raise ValueError(f"uncond_rows has shape {uncond.shape} for a UNet call of {x_BHWC.shape[0]} rows")
        for k, (controlnet, images, scale, mode) in enumerate(zip(self.controlnets, self.images, self.scales,
                                                                  self.modes)):
            if mode == "controlnet" and uncond is not None and uncond.all():
                continue   # (it steers the prompt's rows alone: none in this call)
            if x_BHWC.shape[0] % images.shape[0]:
                raise ValueError(f"control_images_BHWC{f'[{k}]' if self.several else ''} has {images.shape[0]} images "
                                 f"for a UNet call of {x_BHWC.shape[0]} rows: give one control image, or one per "
                                 "image")
            images = jnp.repeat(images, x_BHWC.shape[0] // images.shape[0], axis=0)   # ([u0, c0, u1, c1, ...])
            d, m = controlnet(x_BHWC[..., :controlnet.config.in_channels], t, text_BSD, images, scale)
            if mode != "balanced":   # soft injection: the mid block's whole, each shallower one 0.825 times less
                d = tuple(r * SOFT_INJECTION_BASE ** (len(d) - i) for i, r in enumerate(d))
            if mode == "controlnet" and uncond is not None and uncond.any():
                keep = jnp.asarray(~uncond).reshape(-1, 1, 1, 1)
                d, m = tuple(r * keep.astype(r.dtype) for r in d), m * keep.astype(m.dtype)
            down, mid = (d, m) if down is None else (tuple(a + b for a, b in zip(down, d)), mid + m)
        return self.unet(x_BHWC, t, text_BSD, down, mid)


def control_scales(calls: int, scale: float = 1.0, start: float = 0.0, end: float = 1.0) -> np.ndarray:
    """The ControlNet's scale at each of ``calls`` model calls (float32 [calls]): ``scale`` where the
    call's share of the run lies within [``start``, ``end``], 0 elsewhere, as diffusers'
    ``control_guidance_start`` / ``control_guidance_end`` (AUTOMATIC1111's Guidance Start / End) keep
    it: call i is off where i / calls < start or (i + 1) / calls > end."""
    i = np.arange(calls)
    off = (i / calls < start) | ((i + 1) / calls > end)
    return np.where(off, 0.0, scale).astype(np.float32)


def guided_model_output(unet, model_input_B, t, cond_BSD, uncond_BSD, guidance_scale) -> jax.Array:
    """Classifier-free guidance as one batched UNet call: eps_u + g * (eps_c - eps_u), with
    ``guidance_scale`` g a number or one per image ([B]). ``cond_BSD`` / ``uncond_BSD``: text states
    per image, or one ([1, S, D]) for every image, as `denoise` takes them; ``uncond_BSD=None``: the
    conditional output alone. ``cond_BSD`` may be a `Composition` of states (several texts an image,
    A1111's ``AND``: one UNet call of K + 1 texts an image).

    The two halves are interleaved per image ([u0, c0, u1, c1, ...]) rather than concatenated, so
    with the batch split over devices each device keeps its own images' pairs (no cross-device
    traffic); the UNet has no batch coupling, so the order does not change the result. Text states of
    different lengths (AUTOMATIC1111's long prompts: a prompt and a negative prompt of different window
    counts) take two UNet calls, each at its own length, as A1111 runs them.
    """
    B = model_input_B.shape[0]
    cond_BSD, uncond_BSD = (_match_batch(x, B, name)   # (under denoise: already B rows)
                            for x, name in ((cond_BSD, "cond_BSD"), (uncond_BSD, "uncond_BSD")))
    if isinstance(cond_BSD, Composition):
        return _composed_model_output(unet, model_input_B, t, cond_BSD, uncond_BSD, guidance_scale)
    if uncond_BSD is None:
        return unet(model_input_B, t, cond_BSD).astype(F32)
    if uncond_BSD.shape[1] != cond_BSD.shape[1]:
        eps_uncond = _for_rows(unet, np.ones(B, bool))(model_input_B, t, uncond_BSD).astype(F32)
        eps_cond = unet(model_input_B, t, cond_BSD).astype(F32)
        return eps_uncond + _per_image(guidance_scale, B, eps_cond.ndim) * (eps_cond - eps_uncond)
    pair = lambda u, c: jnp.stack([u, c], axis=1).reshape(2 * B, *u.shape[1:])  # noqa: E731
    eps = _for_rows(unet, np.tile([True, False], B))(pair(model_input_B, model_input_B), t,
                                                     pair(uncond_BSD, cond_BSD)).astype(F32)
    eps = eps.reshape(B, 2, *eps.shape[1:])
    eps_uncond, eps_cond = eps[:, 0], eps[:, 1]
    return eps_uncond + _per_image(guidance_scale, B, eps_cond.ndim) * (eps_cond - eps_uncond)


def _composed_model_output(unet, x_B, t, parts: Composition, uncond_BSD, guidance_scale) -> jax.Array:
    """`guided_model_output` of a `Composition` of states [B, K, S, D]: each image's negative and its K
    parts in one UNet call ([u0, c0_1..c0_K, u1, ...]: an image's rows stay on its device), or with the
    negative prompt at another length, the negatives and the parts in a call each."""
    if uncond_BSD is None:
        raise ValueError("a Composition combines its texts through guidance: give uncond_BSD (AUTOMATIC1111's "
                         "AND needs guidance_scale > 1)")
    texts, weights = parts.texts, jnp.asarray(parts.weights_BK, F32)
    B, K, S, D = texts.shape
    shape = x_B.shape[1:]
    repeat = lambda n: jnp.broadcast_to(x_B[:, None], (B, n, *shape)).reshape(B * n, *shape)  # noqa: E731
    if uncond_BSD.shape[1] == S:
        states = jnp.concatenate([uncond_BSD[:, None], texts], axis=1).reshape(B * (K + 1), S, D)
        eps = _for_rows(unet, np.tile([True] + [False] * K, B))(repeat(K + 1), t, states).astype(F32)
        eps = eps.reshape(B, K + 1, *eps.shape[1:])   # (the output's channels: an inpainting UNet takes more)
        eps_uncond, eps_parts = eps[:, 0], eps[:, 1:]
    else:
        eps_uncond = _for_rows(unet, np.ones(B, bool))(x_B, t, uncond_BSD).astype(F32)
        eps_parts = unet(repeat(K), t, texts.reshape(B * K, S, D)).astype(F32)
        eps_parts = eps_parts.reshape(B, K, *eps_parts.shape[1:])
    w = weights.reshape(B, K, *([1] * (x_B.ndim - 1)))
    guided = jnp.sum(w * (eps_parts - eps_uncond[:, None]), axis=1)
    return eps_uncond + _per_image(guidance_scale, B, eps_uncond.ndim) * guided


def _for_rows(unet, uncond_rows: np.ndarray):
    """``unet`` for a call whose rows are the negative prompt's where ``uncond_rows``: a `ControlledUNet`
    told so (its Control Mode may steer the prompt's rows alone); any other as it is."""
    return unet.for_rows(uncond_rows) if isinstance(unet, ControlledUNet) else unet


def _per_image(guidance_scale, B: int, ndim: int) -> jax.Array:
    """A number, or one per image [B] shaped to multiply [B, h, w, C] row by row (a bare [B] would
    line up with the channels)."""
    g = jnp.asarray(guidance_scale, F32)
    if g.ndim == 0:
        return g
    if g.ndim == 1 and g.shape[0] in (1, B):
        return g.reshape(-1, *([1] * (ndim - 1)))
    if g.ndim == ndim and g.shape[0] in (1, B) and g.shape[1:] == (1,) * (ndim - 1):   # already [B, 1, 1, 1]
        return g
    raise ValueError(f"guidance_scale has shape {tuple(g.shape)}; expected a number or one per image ([{B}])")


def denoise(unet, scheduler: Scheduler, latents_BHWC, cond_BSD, uncond_BSD=None, guidance_scale: ArrayLike = 7.5,
            keys_B=None, return_predictions: bool = False, on_step=None, *, start: int = 0,
            unet_extra_BHWC=None, blend: InpaintBlend | None = None) -> Any:
    """Run the whole reverse process as one ``lax.scan`` over the scheduler's model calls.

    ``unet``: a `UNet2DConditionModel`, a `ControlledUNet` (a ControlNet's), or any function
    ``(x_BHWC, t, text_BSD) -> prediction`` (a guidance rule of your own: a function around the UNet,
    with ``uncond_BSD=None``).
    ``latents_BHWC``: initial latents already multiplied by ``scheduler.init_noise_sigma``; or,
    with ``start`` > 0 (img2img: a static int, the loop index to begin at), clean latents noised
    to that point, ``scheduler.add_noise_at(x0, noise, start)``; the scheduler
    is entered there as diffusers does (`Scheduler.starting_at`).
    ``cond_BSD`` / ``uncond_BSD``: text states for each image, or one ([1, S, D]) for all of them (S
    may differ between the two: `guided_model_output` then runs the UNet on each apart), or a
    `TextSchedule` (states that change from one model call to the next: prompt editing), or for
    ``cond_BSD`` a `Composition` (several texts an image: A1111's ``AND``);
    ``uncond_BSD=None`` skips guidance (one UNet pass); ``guidance_scale``: a number or one per
    image ([B]). ``keys_B``: one key per image (typed [B], or raw uint32 [B, 2]), needed by the
    stochastic schedulers (`step_keys` gives the pipeline's). Returns the final latents, and with
    ``return_predictions`` also the clean latents predicted at every model call, from that call's
    output before the scheduler's update ([num_model_calls - start, B, h, w, C]).

    ``unet_extra_BHWC``: channels appended to the (scaled) latents at every UNet call ([B or 1, h, w, E]:
    an inpainting UNet's mask and masked-image latents, `inpainting_inputs`); the UNet then takes C + E
    channels. ``blend``: an `InpaintBlend`, which keeps the unmasked part of an image on its noised
    latents after every step (inpainting with a text-to-image UNet).

    ``on_step``: an optional host function, called as ``on_step(i)`` (``i`` a 0-d int32 array) when the
    loop starts model call ``i``, so calls ``0..i-1`` are done; for progress bars. It runs through
    ``jax.debug.callback`` (one host callback per step, on a runtime thread) and, under ``jax.jit``,
    must be a static, hashable argument. ``None`` leaves the compiled loop free of callbacks.
    """
    if isinstance(scheduler, str):
        raise TypeError(f"denoise takes a Scheduler, not its name {scheduler!r}: "
                        "sdjax.schedulers.make_scheduler(name, scheduler_config, num_inference_steps)")
    # (a function has no config: the latents' own channels)
    channels = getattr(getattr(unet, "config", None), "in_channels", None)
    extra = 0 if unet_extra_BHWC is None else np.shape(unet_extra_BHWC)[-1]
    if channels is not None and extra >= channels:
        raise ValueError(f"unet_extra_BHWC has {extra} channels; the UNet takes {channels} in all, the latents' "
                         "among them")
    if channels is not None and not extra and latents_BHWC.ndim == 4 and latents_BHWC.shape[-1] < channels:
        raise ValueError(f"the UNet takes {channels} input channels and latents_BHWC has {latents_BHWC.shape[-1]}: "
                         f"an inpainting UNet, whose other {channels - latents_BHWC.shape[-1]} (the mask and the "
                         "masked image's latents) are unet_extra_BHWC (inpainting_inputs)")
    check_nhwc("latents_BHWC", latents_BHWC, latents_BHWC.shape[-1] if channels is None else channels - extra)
    if isinstance(start, jax.core.Tracer) or not isinstance(start, numbers.Integral):
        raise TypeError(f"start must be a Python int (static under jit: the loop's length depends on it), got "
                        f"{type(start).__name__}")
    B = latents_BHWC.shape[0]
    if cond_BSD is None:
        raise TypeError("cond_BSD is required: the text states the UNet attends to (encode_prompts); for "
                        "unconditional images pass the empty prompt's")
    if isinstance(uncond_BSD, Composition):
        raise TypeError("uncond_BSD is a Composition: the parts of an AND are the prompt's (cond_BSD); the negative "
                        "prompt is one text an image")
    as_array = lambda x: x if x is None or isinstance(x, (TextSchedule, Composition)) or hasattr(x, "ndim") \
        else jnp.asarray(x)  # noqa: E731
    cond_BSD, uncond_BSD = as_array(cond_BSD), as_array(uncond_BSD)
    calls = scheduler.num_model_calls - start
    for scale in unet.scales if isinstance(unet, ControlledUNet) else ():
        if np.ndim(scale) and np.shape(scale) != (calls,):
            raise ValueError(f"the ControlledUNet's conditioning_scale has shape {np.shape(scale)}; expected a number "
                             f"or one per model call run ({calls}: control_scales)")
    if isinstance(cond_BSD, Composition):
        cond_BSD = _checked_composition(cond_BSD, calls, uncond_BSD)
    for x, name in ((cond_BSD, "cond_BSD"), (uncond_BSD, "uncond_BSD")):
        if isinstance(x, TextSchedule):
            _check_text_schedule(x, calls, name)
        elif x is not None and not isinstance(x, Composition) and x.ndim != 3:
            raise ValueError(f"{name} has shape {tuple(x.shape)}; expected text states [batch or 1, tokens, width]")
    cond_shape, uncond_shape = (None if x is None else _states_shape(x) for x in (cond_BSD, uncond_BSD))
    if uncond_shape is not None and uncond_shape[2] != cond_shape[2]:
        raise ValueError(f"uncond_BSD has shape {uncond_shape} and cond_BSD {cond_shape}: "
                         "they must agree in width (tokens may differ: two UNet calls)")
    width = getattr(getattr(unet, "config", None), "cross_attention_dim", None)
    if width is not None and cond_shape[-1] not in set(width):   # (before the guidance pairs double the batch)
        raise ValueError(f"cond_BSD has shape {cond_shape}; the UNet attends to text states of width "
                         f"{width[0]} (cross_attention_dim): states of another text encoder?")
    cond_BSD, uncond_BSD = (_match_batch(x, B, name) for x, name in ((cond_BSD, "cond_BSD"), (uncond_BSD, "uncond_BSD")))
    _check_keys(scheduler, keys_B, B)
    shape = tuple(latents_BHWC.shape)
    if unet_extra_BHWC is not None:
        unet_extra_BHWC = _match_batch(jnp.asarray(unet_extra_BHWC), B, "unet_extra_BHWC")
        if unet_extra_BHWC.ndim != 4 or unet_extra_BHWC.shape[1:3] != shape[1:3]:
            raise ValueError(f"unet_extra_BHWC has shape {tuple(unet_extra_BHWC.shape)}; expected [{B} or 1, "
                             f"{shape[1]}, {shape[2]}, channels] beside the latents {shape}")
    if blend is not None:
        blend = InpaintBlend(*(_match_batch(jnp.asarray(x, F32), B, f"blend.{name}")
                               for x, name in zip(blend, InpaintBlend._fields)))
        for x, name, want in zip(blend, InpaintBlend._fields, ((*shape[:3], 1), shape, shape)):
            if tuple(x.shape) != want:
                raise ValueError(f"blend.{name} has shape {tuple(x.shape)}; expected {want} (the latents' "
                                 f"{shape}{', one channel' if name.startswith('mask') else ''})")
    if start:
        scheduler = scheduler.starting_at(start)
    last = scheduler.num_model_calls - 1

    def text_at(states, i):
        if isinstance(states, Composition):
            return Composition(text_at(states.texts, i), states.weights_BK)
        return states.at(i - start) if isinstance(states, TextSchedule) else states

    def body(carry, i):
        x, state = carry
        if on_step is not None:
            # The loop index is replicated, so this is one call per step with no cross-device
            # traffic; it fires once iteration i has begun, i.e. after step i - 1 has finished.
            jax.debug.callback(on_step, i)
        model_input = scheduler.scale_model_input(state, x, i)
        unet_input = model_input if unet_extra_BHWC is None else jnp.concatenate(
            [model_input, unet_extra_BHWC.astype(model_input.dtype)], axis=-1)
        model = unet.at(i - start) if isinstance(unet, ControlledUNet) else unet   # (its scale at this call)
        eps = guided_model_output(model, unet_input, scheduler.timestep(i), text_at(cond_BSD, i),
                                  text_at(uncond_BSD, i), guidance_scale)
        x0 = predicted_clean(scheduler, model_input, eps, i) if return_predictions else None
        x, state = scheduler.step(state, eps, i, x, keys_B)
        if blend is not None:   # (the scheduler's own state keeps what it computed, as diffusers' does)
            kept = jnp.where(i < last, scheduler.add_noise_at(blend.image_latents_BHWC, blend.noise_BHWC,
                                                              jnp.minimum(i + 1, last)),
                             blend.image_latents_BHWC)
            x = (1.0 - blend.mask_BHW1) * kept + blend.mask_BHW1 * x
        return (x, state), x0

    latents_BHWC = latents_BHWC.astype(F32)
    (latents, _), predictions = jax.lax.scan(body, (latents_BHWC, scheduler.init_state(latents_BHWC)),
                                             jnp.arange(start, scheduler.num_model_calls))
    return (latents, predictions) if return_predictions else latents


def _check_keys(scheduler: Scheduler, keys_B, B: int) -> None:
    """``keys_B`` of `denoise`: one key per image for a stochastic scheduler (typed [B] or raw
    uint32 [B, 2]); a [B] array of integers is seeds, and one key for the whole batch would give
    every image's noise from the batch's one key."""
    if keys_B is None:
        if scheduler.stochastic:
            raise ValueError(f"the {scheduler.name} scheduler is stochastic: denoise needs keys_B, one key per image "
                             "(the pipeline's: step_keys(image_keys(seeds)))")
        return
    if image_key_count(keys_B) == B:
        return
    raise ValueError(f"keys_B is {_described(keys_B)}; expected one key per image of the {B}: typed keys [{B}] or "
                     f"raw uint32 keys [{B}, 2] (from seeds: step_keys(image_keys(seeds)); from one key: "
                     f"jax.random.split(key, {B}))")


def _checked_composition(x: Composition, calls: int, uncond) -> Composition:
    """A `Composition` for `denoise`: its texts [B, K, S, D] (or a `TextSchedule` of phases [B, K, C])
    and weights [B or 1, K], with a negative prompt to guide against."""
    if uncond is None:
        raise ValueError("cond_BSD is a Composition (several texts an image, AUTOMATIC1111's AND), which acts "
                         "through guidance: give uncond_BSD (the negative prompt's states; AND needs "
                         "guidance_scale > 1)")
    texts = x.texts if isinstance(x.texts, TextSchedule) or hasattr(x.texts, "ndim") else jnp.asarray(x.texts)
    weights = jnp.asarray(x.weights_BK)
    if isinstance(texts, TextSchedule):
        _check_text_schedule(texts, calls, "cond_BSD's Composition", parts=True)
        batch, K = texts.phases_BC.shape[:2]
    else:
        if texts.ndim != 4:
            raise ValueError(f"cond_BSD is a Composition of texts of shape {tuple(texts.shape)}; expected states "
                             "[batch, parts, tokens, width] (or a TextSchedule)")
        batch, K = texts.shape[:2]
    # (texts for every image, batch 1, may have weights per image: both are matched to the latents' batch)
    if weights.ndim != 2 or weights.shape[1] != K or weights.shape[0] not in (1, batch) and batch != 1:
        raise ValueError(f"cond_BSD is a Composition of {K} parts an image with weights of shape "
                         f"{tuple(weights.shape)}; expected [{'batch' if batch == 1 else batch} or 1, {K}]: one "
                         "weight a part")
    return Composition(texts, weights)


def _states_shape(x) -> tuple:
    """The [batch, tokens, width] shape of text states, or of a `TextSchedule`'s per call, or of a
    `Composition`'s per part."""
    if isinstance(x, Composition):   # (texts [B, K, S, D] as a TextSchedule's [B, P, S, D]: Python ints)
        x = x.texts if isinstance(x.texts, TextSchedule) else TextSchedule(x.texts, None)
    if isinstance(x, TextSchedule):
        shape = tuple(x.states_BPSD.shape)
        return (shape[0], *shape[2:])
    return tuple(x.shape)


def _check_text_schedule(x: TextSchedule, calls: int, name: str, parts: bool = False) -> None:
    """A `TextSchedule`'s shapes: phases [B, C] (with ``parts``, a `Composition`'s: [B, K, C])."""
    states, phases = x.states_BPSD, x.phases_BC
    if states.ndim != 4 or phases.ndim != 2 + parts or phases.shape[0] != states.shape[0]:
        raise ValueError(f"{name} is a TextSchedule of states {tuple(states.shape)} and phases "
                         f"{tuple(phases.shape)}; expected states [batch, texts, tokens, width] and phases "
                         f"[batch, {'parts, ' if parts else ''}model calls] of the same batch")
    if phases.shape[-1] != calls:
        raise ValueError(f"{name}'s phases have {phases.shape[-1]} model calls per image; this run makes {calls} "
                         "(the scheduler's num_model_calls, less img2img's start)")
    if not jnp.issubdtype(phases.dtype, jnp.integer):
        raise ValueError(f"{name}'s phases are {phases.dtype}; expected integers (indices of the texts)")


def _match_batch(x, B: int, name: str):
    """``x`` with B rows: as it is, or one row broadcast to B (free under jit); a `TextSchedule`'s
    states and phases alike, and a `Composition`'s texts and weights."""
    if isinstance(x, (TextSchedule, Composition)):
        return type(x)(*(_match_batch(part if isinstance(part, TextSchedule) or hasattr(part, "shape")
                                      else jnp.asarray(part), B, name) for part in x))
    if x is None or x.shape[0] == B:
        return x
    if x.shape[0] == 1:
        return jnp.broadcast_to(x, (B, *x.shape[1:]))
    raise ValueError(f"{name} has batch {x.shape[0]} but the latents have {B}: give one per image, or one for all")


def decode_latents(vae, latents_BHWC) -> jax.Array:
    """UNet-space latents -> images float32 [B, H, W, 3] in [0, 1]."""
    images = vae.decode(latents_BHWC / vae.scaling_factor).astype(F32)
    return jnp.clip(images / 2 + 0.5, 0.0, 1.0)


class SDState(NamedTuple):
    """One part per model: their states (the arrays, as `nnx.State` or ``nnx.to_pure_dict``'s nested
    dicts: `StableDiffusion.state`) or their graphdefs, which stay static (`StableDiffusion.graphdefs`)."""
    text_encoder: Any
    unet: Any
    vae: Any


class GenerateOutput(NamedTuple):
    images: jax.Array | None          # [B, H, W, 3] in [0, 1]; None with decode=False
    predictions: jax.Array | None     # [steps, B, h, w, C] predicted clean latents, if asked
    latents: jax.Array | None = None  # [B, h, w, C] the final UNet-space latents, with return_latents


def upscale_latents(latents_BHWC, size_hw: tuple[int, int]) -> jax.Array:
    """Latents [B, h, w, C] resized to ``size_hw`` (h', w') bilinearly, as AUTOMATIC1111's Hires fix
    "Latent" upscaler does (torch's ``F.interpolate(mode="bilinear", align_corners=False,
    antialias=False)``: half-pixel centres, an edge sample's missing neighbour left out)."""
    check_nhwc("latents_BHWC", latents_BHWC, latents_BHWC.shape[-1])
    h, w = size_hw
    if h < latents_BHWC.shape[1] or w < latents_BHWC.shape[2]:   # (jax's linear kernel widens to antialias then)
        raise ValueError(f"upscale_latents: size {size_hw} is smaller than the latents' "
                         f"{tuple(latents_BHWC.shape[1:3])}; it only enlarges")
    B, _, _, C = latents_BHWC.shape
    return jax.image.resize(latents_BHWC.astype(F32), (B, h, w, C), "linear", antialias=False)


def generate(graphdefs: SDState, state: SDState, scheduler: Scheduler, cond_ids_BT, uncond_ids_BT, seeds_B,
             latents_BHWC, guidance_scale, init_images_BHWC=None, *, latent_shape_HWC, use_guidance: bool,
             return_predictions: bool = False, on_step=None, clip_skip: int = 1, start: int = 0,
             cond_weights_BT=None, uncond_weights_BT=None, cond_phases_BC=None,
             uncond_phases_BC=None, init_latents_BHWC=None, return_latents: bool = False,
             decode: bool = True, cond_part_weights_BK=None, cond_lengths_BP=None,
             restore_mean: bool = True, variation_seeds_B=None, variation_strength=None,
             mask_BHW1=None, controlnet_graphdef=None, controlnet_state=None, control_images_BHWC=None,
             control_scale=1.0, control_mode: str | tuple[str, ...] = "balanced",
             masked_noise_scale=None, seed_resize_from_hw: tuple[int, int] | None = None) -> GenerateOutput:
    """Prompts to images in one traced function: the body `StableDiffusion` jit-compiles.

    ``latents_BHWC=None`` draws each image's initial noise from its seed; otherwise those unscaled
    N(0, 1) latents are used. Seeds also key the per-step noise of stochastic schedulers.
    ``init_images_BHWC`` (img2img: float [B, H, W, 3] in [0, 1]) are encoded (`encode_images`, a
    posterior draw keyed by `posterior_keys`), noised to loop index ``start`` (static, from
    `img2img_start`) with that noise, and denoised from there, as diffusers' img2img pipeline does.
    ``on_step``: see :func:`denoise`; ``clip_skip`` (static): see :func:`encode_prompts`.
    ``cond_weights_BT`` / ``uncond_weights_BT``: AUTOMATIC1111's emphasis weights of the prompts' and
    negative prompts' tokens (float32 [B, 77 * k] as the ids, `sdjax.text.tokenize_weighted`), applied by
    `emphasize` per window (`encode_prompts`; ``restore_mean``, static: False is A1111's Emphasis "No norm");
    None (the default): no weighting, and no input of the compiled program.
    ``cond_phases_BC`` / ``uncond_phases_BC``: AUTOMATIC1111's prompt editing (int32 [B, C], C the model
    calls run: `sdjax.text.edited_prompts`' phases); the ids (and weights) are then [B, P, T], each image's
    P texts, encoded into a `TextSchedule` (`encode_edited_prompts`). None: ids [B, T], states that stay.
    ``cond_part_weights_BK``: AUTOMATIC1111's ``AND`` (float32 [B, K], each image's K parts' weights): the
    prompts' phases are then [B, K, C], each part's text per call, and the parts are combined by
    guidance (a `Composition`; needs ``use_guidance``). ``cond_lengths_BP`` (with the phases): each of an
    image's P prompt texts' own length in tokens (int32 [B, P]), from which `extend_by_last_state` brings
    the states of parts of different window counts to their image's longest. None: as they are encoded.
    ``init_latents_BHWC``: img2img from clean UNet-space latents [B, h, w, C] (of ``latent_shape_HWC``) in
    place of init images, with no VAE encode (the Hires fix's second pass: `upscale_latents` of a first
    pass's). ``return_latents`` (static): also return the final latents (``GenerateOutput.latents``);
    ``decode=False`` (static): do not decode them (``images`` is None).
    ``variation_seeds_B`` (uint32 [B]) and ``variation_strength`` (a number in [0, 1]): AUTOMATIC1111's
    variation seeds, each image's seed-drawn noise moved toward its variation seed's (`vary_noise`); not
    with ``latents_BHWC``. None: no input of the compiled program. ``seed_resize_from_hw`` (static, the
    latents' height and width): A1111's "Seed resize from", the seeds' noise drawn at that size (`seed_noise`).
    ``mask_BHW1`` (inpainting, with ``init_images_BHWC``: float [B or 1, H, W, 1], 1 where the image is
    repainted, 0 where it is kept; diffusers' pipeline binarizes it at 0.5 first): as diffusers'
    StableDiffusionInpaintPipeline, from pure noise at ``start`` 0 (its strength 1) or from the init
    images' latents noised to ``start``. An inpainting UNet (2 * C + 1 input channels) sees the mask and
    the masked image's latents at every call (`inpainting_inputs`, drawn with `masked_image_keys`); a
    text-to-image UNet's latents are blended with the init images' where the mask is 0 after every step
    (`InpaintBlend`). An inpainting UNet without a mask (text-to-image, img2img) sees a mask of ones and
    the masked image's latents of a gray image, as AUTOMATIC1111 conditions it there.
    ``masked_noise_scale`` (with a mask; a number): AUTOMATIC1111's Masked content "latent noise" (1) or
    "latent nothing" (0): the init images' latents where the mask is 1 replaced by the seed's own noise
    (without variation seeds) times it before they are noised to ``start`` and blended with, as A1111 does
    (with ``start`` 0 the images start from pure noise, as diffusers' do, and it changes nothing). The mask
    at the latents' size is the blend's (`latent_mask`: nearest), where A1111 resizes its blurred mask
    bicubically and rounds it: a cell along the edge may differ. None (the default, "original"): the init
    images' latents, and no input of the compiled program.
    ``control_images_BHWC`` (float [B or 1, H, W, 3] in [0, 1], the images' size): a ControlNet
    (``controlnet_graphdef``, static, and ``controlnet_state``) steers every UNet call, its residuals
    times ``control_scale``, a number or one per model call run (`ControlledUNet`, `control_scales`), in
    its ``control_mode`` (static: `CONTROL_MODES`);
    several ControlNets: a tuple of each (graphdefs, states, images, scales). None: no input of the
    compiled program.
    """
    if init_images_BHWC is not None and init_latents_BHWC is not None:
        raise ValueError("give init_images_BHWC or init_latents_BHWC (img2img from images or from latents), "
                         "not both")
    if mask_BHW1 is not None and init_images_BHWC is None:
        raise ValueError("mask_BHW1 marks what to repaint of init_images_BHWC (inpainting): give those images")
    if masked_noise_scale is not None and mask_BHW1 is None:
        raise ValueError("masked_noise_scale is what an inpainting mask's part starts from: give mask_BHW1")
    text_encoder, unet, vae = (nnx.merge(g, s) for g, s in zip(graphdefs, state))
    keys = image_keys(seeds_B)
    if latents_BHWC is None:
        latents_BHWC = seed_noise(keys, latent_shape_HWC, variation_seeds_B, variation_strength, seed_resize_from_hw)
    elif variation_seeds_B is not None or seed_resize_from_hw is not None:
        raise ValueError("variation_seeds_B and seed_resize_from_hw shape the seeds' noise: not with latents_BHWC "
                         "given")
    if cond_lengths_BP is not None and cond_phases_BC is None:
        raise ValueError("cond_lengths_BP are the lengths of each image's several texts: they need cond_phases_BC")
    if cond_part_weights_BK is not None and (cond_phases_BC is None or np.ndim(cond_phases_BC) != 3):
        raise ValueError("cond_part_weights_BK weight each image's parts (AND): they need cond_phases_BC of "
                         "[batch, parts, model calls]")

    def encode(ids, weights, phases, lengths=None):
        if phases is None:
            return encode_prompts(text_encoder, ids, clip_skip, weights, restore_mean=restore_mean)
        texts = encode_edited_prompts(text_encoder, ids, phases, clip_skip, weights, restore_mean=restore_mean)
        return texts if lengths is None else texts._replace(
            states_BPSD=extend_by_last_state(texts.states_BPSD, lengths))
    cond = encode(cond_ids_BT, cond_weights_BT, cond_phases_BC, cond_lengths_BP)
    if cond_part_weights_BK is not None:
        cond = Composition(cond, cond_part_weights_BK)
    uncond = encode(uncond_ids_BT, uncond_weights_BT, uncond_phases_BC) if use_guidance else None
    noise = latents_BHWC.astype(F32)
    extra = blend = None
    inpainting_unet = unet.config.in_channels == 2 * latent_shape_HWC[-1] + 1
    if inpainting_unet:
        if mask_BHW1 is None:   # (AUTOMATIC1111's conditioning for an inpainting model: repaint it all)
            scale = 2 ** (len(vae.config.block_out_channels) - 1)
            h, w = latent_shape_HWC[0] * scale, latent_shape_HWC[1] * scale
            extra = inpainting_inputs(vae, jnp.full((1, h, w, 3), 0.5, F32), jnp.ones((1, h, w, 1), F32),
                                      masked_image_keys(keys))
        else:
            extra = inpainting_inputs(vae, init_images_BHWC, mask_BHW1, masked_image_keys(keys))
    if mask_BHW1 is not None:
        if start or not inpainting_unet:   # (the init images' own latents: to start from or to blend with)
            x0 = encode_images(vae, init_images_BHWC, posterior_keys(keys))
            if masked_noise_scale is not None:   # (A1111's latent noise / nothing in the part repainted)
                part = jnp.round(latent_mask(mask_BHW1, latent_shape_HWC[:2]))
                own = (noise if variation_seeds_B is None and seed_resize_from_hw is None
                       else seed_noise(keys, latent_shape_HWC))   # (the seed's own)
                x0 = x0 * (1.0 - part) + own * (part * masked_noise_scale)
        if not inpainting_unet:
            small = latent_mask(mask_BHW1, latent_shape_HWC[:2])
            blend = InpaintBlend(small, x0, noise)
        x = scheduler.add_noise_at(x0, noise, start) if start else noise * scheduler.init_noise_sigma
    elif init_images_BHWC is None and init_latents_BHWC is None:
        if start:
            raise ValueError("start > 0 begins the schedule midway: it needs init_images_BHWC or init_latents_BHWC "
                             "(img2img)")
        x = noise * scheduler.init_noise_sigma
    else:
        if init_latents_BHWC is not None:
            check_nhwc("init_latents_BHWC", init_latents_BHWC, latent_shape_HWC[-1])
            if tuple(init_latents_BHWC.shape[1:]) != tuple(latent_shape_HWC):
                raise ValueError(f"init_latents_BHWC has shape {tuple(init_latents_BHWC.shape)}; expected latents "
                                 f"[B, {', '.join(map(str, latent_shape_HWC))}] (latent_shape_HWC)")
            x0 = init_latents_BHWC.astype(F32)
        else:
            x0 = encode_images(vae, init_images_BHWC, posterior_keys(keys))
        x = scheduler.add_noise_at(x0, noise, start)
    model = unet
    if control_images_BHWC is not None:
        if controlnet_graphdef is None or controlnet_state is None:
            raise ValueError("control_images_BHWC steer the UNet through a ControlNet: give controlnet_graphdef and "
                             "controlnet_state")
        controlnet = (tuple(nnx.merge(g, s) for g, s in zip(controlnet_graphdef, controlnet_state))
                      if isinstance(controlnet_graphdef, tuple) else nnx.merge(controlnet_graphdef, controlnet_state))
        model = ControlledUNet(unet, controlnet, control_images_BHWC, control_scale, control_mode)
    out = denoise(model, scheduler, x, cond, uncond, guidance_scale, step_keys(keys), return_predictions, on_step,
                  start=start, unet_extra_BHWC=extra, blend=blend)
    latents, predictions = out if return_predictions else (out, None)
    return GenerateOutput(decode_latents(vae, latents) if decode else None, predictions,
                          latents if return_latents else None)
