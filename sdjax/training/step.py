"""The fine-tuning step: a pure function of (state, frozen arrays, batch), jitted with shardings.

Parameters are plain pytrees (``nnx.to_pure_dict``) in fp32 ("master weights"); the step casts
them to the compute dtype inside, so gradients and the optimizer stay fp32. Every random draw is
keyed by (seed, step, micro-batch, example index), never by device, so the same global batch
gives the same update on 1 device or on many.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from sdjax import parallel
from sdjax.schedulers import add_noise, get_velocity
from sdjax.training.lora import attach as attach_lora

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Static settings of the step (changing one recompiles)."""
    prediction_type: str = "epsilon"        # or "v_prediction" (from the scheduler config)
    min_snr_gamma: float | None = None      # Min-SNR-gamma loss weighting (5.0 is the paper's choice)
    noise_offset: float = 0.0               # scale of a per-channel constant added to the noise (0: none)
    input_perturbation: float = 0.0         # scale of extra noise in the UNet's input only (0: none)
    caption_dropout: float = 0.0            # probability of training on the empty caption (for guidance)
    train_text_encoder: bool = False
    ema_decay: float | None = None          # EMA of the trained weights; None: no EMA
    compute_dtype: Any = jnp.float32        # bf16: bf16 activations, fp32 master weights
    lora: Any = None                        # a `lora.LoraSpec`: train LoRA of the frozen models, not the models


class TrainState(NamedTuple):
    """What a training run updates and a checkpoint holds (`init_state` makes step 0)."""
    step: jax.Array       # int32: optimizer updates done
    params: dict          # {"unet": ..., ["text_encoder": ...]} fp32 pure dicts; LoRA: {"lora": {name: ...}}
    opt_state: Any
    ema: dict | None      # EMA of params (same structure)
    rng: jax.Array        # uint32 key data of the run's seed


class Frozen(NamedTuple):
    """Arrays the step reads but does not train."""
    vae: dict
    text_encoder: dict | None
    alphas_cumprod: jax.Array      # float32 [num_train_timesteps]
    empty_ids: jax.Array           # int32 [77]: the "" prompt, for caption dropout
    scaling_factor: jax.Array      # the VAE's latent scale (0.18215 for SD v1.5)
    unet: dict | None = None       # LoRA training: the UNet the LoRA changes (else the UNet trains)


class Graphdefs(NamedTuple):
    """The models' NNX graphdefs, built with the compute dtype, that `loss_fn` merges the weights into."""
    unet: Any
    text_encoder: Any
    vae: Any


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """``optax.clip_by_global_norm`` as one scalar factor, ``min(1, max_norm / global_norm)``.

    Same result up to rounding; but optax's ``select(norm < max, g, g / norm * max)`` makes XLA
    write a clipped copy of every gradient while the raw ones are still live (+1 gradient tree
    of scratch memory: SD v1.5 step 6.30 -> 3.45 GiB, BENCHMARKS.md); a product fuses into Adam.
    """
    def update(grads, state, params=None):
        del params
        scale = jnp.minimum(1.0, max_norm / optax.tree.norm(grads))  # norm 0: inf -> 1
        return jax.tree.map(lambda g: g * scale.astype(g.dtype), grads), state
    return optax.GradientTransformation(optax.init_empty_state, update)


POLYNOMIAL_END_LR = 1e-7   # where the polynomial schedule ends (diffusers' get_scheduler default lr_end)
# diffusers' names; constant_with_warmup is constant here (both warm up over warmup_steps)
LR_SCHEDULES = ("constant", "constant_with_warmup", "cosine", "linear", "cosine_with_restarts", "polynomial")


def make_optimizer(learning_rate: float = 1e-5, *, warmup_steps: int = 0, schedule: str = "constant",
                   total_steps: int | None = None, b1: float = 0.9, b2: float = 0.999, weight_decay: float = 1e-2,
                   max_grad_norm: float | None = 1.0, num_cycles: int = 1,
                   power: float = 1.0) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with linear warmup then a constant (also named constant_with_warmup), cosine, linear (to 0
    at ``total_steps``),
    cosine_with_restarts (``num_cycles`` cosine decays to 0, each restarting at the peak) or
    polynomial (``(1 - progress) ** power`` down to `POLYNOMIAL_END_LR`) learning rate, after
    global-norm clipping: diffusers' schedules of those names."""
    if schedule in ("cosine_with_restarts", "polynomial"):
        if not total_steps:
            raise ValueError(f"the {schedule} schedule needs total_steps (--max-steps)")
        if schedule == "polynomial" and not learning_rate > POLYNOMIAL_END_LR:
            raise ValueError(f"the polynomial schedule ends at {POLYNOMIAL_END_LR}: the learning rate must be above it")
        warmup, decay_steps = max(warmup_steps, 0), max(1, total_steps - warmup_steps)

        def lr(step):
            s = jnp.asarray(step, F32)
            progress = (s - warmup) / decay_steps
            if schedule == "cosine_with_restarts":
                # The place in the cycle, (num_cycles * progress) % 1, from whole numbers: in float32 under
                # jit (XLA divides by multiplying with the reciprocal) a cycle's first step came out a
                # rounding step below the whole number, its rate ~0 instead of the peak.
                into = jnp.asarray(step, jnp.int32) - warmup
                phase = ((into % decay_steps) * num_cycles % decay_steps).astype(F32) / decay_steps
                after = jnp.where(into >= decay_steps, 0.0, learning_rate * 0.5 * (1.0 + jnp.cos(jnp.pi * phase)))
            else:
                remaining = jnp.clip(1.0 - progress, 0.0, 1.0)
                after = (learning_rate - POLYNOMIAL_END_LR) * remaining ** power + POLYNOMIAL_END_LR
            return jnp.where(s < warmup, learning_rate * s / max(1, warmup), after)
    elif schedule in ("constant", "constant_with_warmup"):   # the same here: constant warms up too
        lr = optax.join_schedules([optax.linear_schedule(0.0, learning_rate, warmup_steps),
                                   optax.constant_schedule(learning_rate)], [warmup_steps]) if warmup_steps else (
            optax.constant_schedule(learning_rate))
    elif schedule in ("cosine", "linear"):
        if not total_steps:
            raise ValueError(f"the {schedule} schedule needs total_steps (--max-steps)")
        if schedule == "cosine":
            lr = optax.warmup_cosine_decay_schedule(0.0, learning_rate, max(warmup_steps, 0),
                                                    max(total_steps, warmup_steps + 1))
        else:
            decay = optax.linear_schedule(learning_rate, 0.0, max(total_steps - warmup_steps, 1))
            lr = optax.join_schedules([optax.linear_schedule(0.0, learning_rate, warmup_steps), decay],
                                      [warmup_steps]) if warmup_steps else decay
    else:
        raise ValueError(f"unknown learning-rate schedule {schedule!r}: use one of {', '.join(LR_SCHEDULES)}")
    chain = [clip_by_global_norm(max_grad_norm)] if max_grad_norm else []
    chain.append(optax.adamw(lr, b1=b1, b2=b2, weight_decay=weight_decay))
    return optax.chain(*chain), lr


def init_state(params: dict, optimizer: optax.GradientTransformation, seed: int, *, ema: bool,
               mesh=None) -> TrainState:
    """Step 0 of training ``params`` (``{"unet": ..., ["text_encoder": ...]}`` pure dicts); the EMA, if
    any, starts as a copy of them (of every trained model, so an exported text encoder matches the
    averaged UNet it conditions). The state holds ``params`` themselves, not a copy, and
    :func:`jit_train_step` donates the state: after the first step those arrays are deleted, so pass
    ``jax.tree.map(jnp.copy, params)`` to keep the originals.

    With ``mesh`` (``params`` replicated over it), the state is placed for `jit_train_step`: the
    weights, step and RNG whole on every device (each device's forward and backward pass needs all
    the weights), the optimizer's moments and the EMA split over the devices (ZeRO stage 1: on 8
    devices each holds 1/8 of them, 1.2 of SD v1.5's 9.6 GiB of fp32 AdamW moments and EMA), each
    array along its largest axis that divides evenly, made there directly (never whole on a device).
    """
    rng = jax.random.key_data(jax.random.key(seed))
    copy = lambda tree: jax.tree.map(jnp.array, tree)  # noqa: E731
    if mesh is None:
        return TrainState(step=jnp.int32(0), params=params, opt_state=optimizer.init(params),
                          ema=copy(params) if ema else None, rng=rng)
    return TrainState(step=parallel.replicate(jnp.int32(0), mesh), params=params,
                      opt_state=parallel.make_spread(optimizer.init, params, mesh=mesh),
                      ema=parallel.make_spread(copy, params, mesh=mesh) if ema else None,
                      rng=parallel.replicate(rng, mesh))


def loss_fn(trainable: dict, frozen: Frozen, batch: dict, key, *, graphdefs: Graphdefs, cfg: StepConfig):
    """Mean (optionally Min-SNR weighted) MSE between the UNet's prediction and its target.

    ``batch``: ``pixel_values`` [B, R, R, 3] in [-1, 1] (or the VAE posterior cached ahead:
    ``latent_mean`` and ``latent_std`` [B, h, w, 4]) and ``input_ids`` [B, 77].
    """
    n = batch["input_ids"].shape[0]
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(n))  # one key per example
    k_post, k_t, k_noise, k_drop, k_offset, k_perturb = (jax.vmap(lambda k, j=j: jax.random.fold_in(k, j))(keys)
                                                         for j in range(6))
    cast = lambda tree: jax.tree.map(lambda p: p.astype(cfg.compute_dtype), tree)  # noqa: E731

    if "latent_mean" in batch:  # the posterior cached ahead (fixed images, see Trainer.cache_latents)
        mean, std = batch["latent_mean"], batch["latent_std"]
    else:
        posterior = nnx.merge(graphdefs.vae, cast(frozen.vae)).encode(batch["pixel_values"])
        mean, std = posterior.mean, posterior.std
    eps = jax.vmap(lambda k: jax.random.normal(k, mean.shape[1:], F32))(k_post)
    latents = jax.lax.stop_gradient((mean + std * eps) * frozen.scaling_factor)

    ids = batch["input_ids"]
    if cfg.caption_dropout > 0:
        drop = jax.vmap(lambda k: jax.random.uniform(k, (), F32))(k_drop) < cfg.caption_dropout
        ids = jnp.where(drop[:, None], frozen.empty_ids[None], ids)
    if cfg.lora is not None:   # the frozen models, with LoRA branches on their target Linears below
        unet_params, text_params = frozen.unet, frozen.text_encoder
    else:
        unet_params = trainable["unet"]
        text_params = trainable["text_encoder"] if cfg.train_text_encoder else frozen.text_encoder
    text_encoder = nnx.merge(graphdefs.text_encoder, cast(text_params))
    if cfg.lora is not None:   # (its targets: only with train_text_encoder)
        attach_lora(text_encoder, trainable["lora"], cfg.lora, "text_encoder")
    context = text_encoder(ids).last_hidden_state
    if not cfg.train_text_encoder:
        context = jax.lax.stop_gradient(context)

    num_train = frozen.alphas_cumprod.shape[0]
    # Explicit dtypes: the default ones (and so the bits drawn) change with jax_enable_x64.
    t = jax.vmap(lambda k: jax.random.randint(k, (), 0, num_train, jnp.int32))(k_t)
    noise = jax.vmap(lambda k: jax.random.normal(k, latents.shape[1:], F32))(k_noise)
    if cfg.noise_offset:   # one value per image and channel, the same over the whole image: lets the model
        # learn to change an image's mean brightness (diffusers' --noise_offset; the target is this noise)
        offset = jax.vmap(lambda k: jax.random.normal(k, (1, 1, latents.shape[-1]), F32))(k_offset)
        noise = noise + cfg.noise_offset * offset
    noised_with = noise
    if cfg.input_perturbation:   # Ning et al. 2023 (diffusers' --input_perturbation): the input's noise is
        # perturbed, the target is not, which reduces the exposure bias between training and sampling
        extra = jax.vmap(lambda k: jax.random.normal(k, latents.shape[1:], F32))(k_perturb)
        noised_with = noise + cfg.input_perturbation * extra
    noisy = add_noise(frozen.alphas_cumprod, latents, noised_with, t)
    if cfg.prediction_type == "v_prediction":
        target = get_velocity(frozen.alphas_cumprod, latents, noise, t)
    else:
        target = noise
    unet = nnx.merge(graphdefs.unet, cast(unet_params))
    if cfg.lora is not None:
        attach_lora(unet, trainable["lora"], cfg.lora, "unet")
    pred = unet(noisy, t, context).astype(F32)
    per_example = jnp.mean(jnp.square(pred - target), axis=(1, 2, 3))
    weighted = per_example
    if cfg.min_snr_gamma:
        alpha_bar = frozen.alphas_cumprod[t]
        snr = alpha_bar / (1.0 - alpha_bar)
        clipped = jnp.minimum(snr, cfg.min_snr_gamma)
        # epsilon: min(snr, gamma) / snr written as min(1, gamma / snr), the same numbers, and at zero SNR
        # (a zero-terminal-SNR schedule's last timestep) its limit 1 instead of 0 / 0 = NaN
        weighted = per_example * (clipped / (snr + 1.0) if cfg.prediction_type == "v_prediction"
                                  else jnp.minimum(1.0, cfg.min_snr_gamma / snr))
    return jnp.mean(weighted), jnp.mean(per_example)


def micro_batch_key(state: TrainState, index) -> jax.Array:
    """The key of micro-batch ``index`` of the update ``state.step`` (``loss_fn``'s ``key``)."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step), index)


def train_step(state: TrainState, frozen: Frozen, batch: dict, *, graphdefs: Graphdefs, cfg: StepConfig,
               optimizer: optax.GradientTransformation, lr_schedule) -> tuple[TrainState, dict]:
    """One optimizer update from ``batch`` whose arrays are [accumulation, B, ...]: gradients of
    the micro-batches are averaged (a ``lax.scan``; unrolled on the CPU), then clipped and applied;
    EMA follows."""
    trainable = state.params
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def micro(carry, inputs):
        grads_sum, loss_sum, raw_sum = carry
        index, micro_batch = inputs
        (loss, raw), grads = grad_fn(trainable, frozen, micro_batch, micro_batch_key(state, index),
                                     graphdefs=graphdefs, cfg=cfg)
        return (jax.tree.map(jnp.add, grads_sum, grads), loss_sum + loss, raw_sum + raw), None

    accumulation = jax.tree.leaves(batch)[0].shape[0]
    carry = (jax.tree.map(jnp.zeros_like, trainable), F32(0), F32(0))
    if accumulation == 1 or jax.default_backend() == "cpu":
        # Unrolled: inside a loop XLA:CPU leaves the convolutions' kernel gradients in a layout its
        # fast path does not take, ~26x slower (BENCHMARKS.md, "Fine-tuning on the CPU").
        for index in range(accumulation):
            carry, _ = micro(carry, (index, jax.tree.map(lambda a: a[index], batch)))
    else:
        carry, _ = jax.lax.scan(micro, carry, (jnp.arange(accumulation), batch))
    grads, loss, raw = carry
    grads = jax.tree.map(lambda g: g / accumulation, grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, trainable)
    params = optax.apply_updates(trainable, updates)
    ema = state.ema
    if cfg.ema_decay is not None:
        # Warm-up decay as diffusers' EMAModel.get_decay: 0 at the first update (the EMA becomes the
        # updated weights), then min(ema_decay, (1 + n) / (10 + n)) after n updates, so early
        # averages do not stick to the initial weights.
        step = state.step.astype(F32)
        decay = jnp.where(state.step == 0, 0.0, jnp.minimum(cfg.ema_decay, (1.0 + step) / (10.0 + step)))
        ema = jax.tree.map(lambda e, p: e + (1.0 - decay) * (p - e), ema, params)
    metrics = {"loss": loss / accumulation, "loss_unweighted": raw / accumulation,
               "grad_norm": optax.tree.norm(grads), "lr": lr_schedule(state.step)}
    return TrainState(state.step + 1, params, opt_state, ema, state.rng), metrics


def _constrain_placement(state: TrainState, mesh) -> TrainState:
    """Inside the traced step: the output state placed as `init_state` places it on ``mesh``."""
    def put(tree, sharding_of):
        return jax.tree.map(lambda a: jax.lax.with_sharding_constraint(a, sharding_of(a)), tree)
    whole = lambda a: parallel.replicated(mesh)  # noqa: E731
    split = lambda a: parallel.spread_sharding(a.shape, mesh)  # noqa: E731
    return TrainState(put(state.step, whole), put(state.params, whole), put(state.opt_state, split),
                      put(state.ema, split), put(state.rng, whole))


def jit_train_step(mesh, *, graphdefs: Graphdefs, cfg: StepConfig, optimizer, lr_schedule):
    """``train_step`` compiled for ``mesh``: the batch split over the data axis (axis 1, after the
    accumulation axis; place it so with ``parallel.shard_batch(array, mesh, axis=1)``, as
    ``Trainer.next_batch`` does, else the step splits it), frozen arrays replicated, the state
    placed as ``init_state(..., mesh=mesh)`` places it (pass a state placed so), the old state's
    buffers donated."""
    import functools
    fn = functools.partial(train_step, graphdefs=graphdefs, cfg=cfg, optimizer=optimizer, lr_schedule=lr_schedule)
    rep = parallel.replicated(mesh)

    def placed_step(state, frozen, batch):
        # Each device takes its columns of the batch (a no-op for one placed so; a batch of host
        # arrays would otherwise be whole on every device, each computing all of it). A batch that
        # does not divide over the devices is left to XLA (an uneven split cannot be constrained).
        split = parallel.batch_sharding(mesh, axis=1)
        batch = jax.tree.map(lambda a: jax.lax.with_sharding_constraint(a, split)
                             if a.shape[1] % parallel.data_size(mesh) == 0 else a, batch)
        state, metrics = fn(state, frozen, batch)
        return _constrain_placement(state, mesh), jax.tree.map(
            lambda a: jax.lax.with_sharding_constraint(a, rep), metrics)
    # The state's input shardings are the arrays' own (init_state's); the outputs keep them, so a
    # step's donated buffers are reused by the next.
    return jax.jit(placed_step, donate_argnums=(0,))
