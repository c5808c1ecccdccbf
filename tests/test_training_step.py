"""The train step's arithmetic against independent recomputations (sdjax.training.step).

test_training.py compares sdjax with itself (8 devices == 1, resumed == uninterrupted); this module
checks the numbers of one step against values derived here: gradient accumulation applies the
mean of the micro-batches' gradients; the EMA is diffusers' ``EMAModel`` of the updated weights;
the logged learning rate is the one the update used, and the schedules are their closed forms;
caption dropout conditions on the empty prompt; Min-SNR-gamma weights are ``min(snr, gamma) / snr``
(epsilon) or ``min(snr, gamma) / (snr + 1)`` (v-prediction), as diffusers' train_text_to_image.py
computes them.

Cost: the models are stand-ins, NNX modules merged from pure dicts as the step does with sdjax's (a
per-pixel linear "UNet" that sees the latents, the timestep and the text, and an embedding-table
"text encoder"), so a train step compiles in about a second; the step's logic does not depend on
the model. Batches are cached VAE posteriors (``latent_mean`` / ``latent_std``): no VAE runs.
Called outside ``jax.jit`` the stand-ins record their inputs and outputs (``RECORDED``): that is how
the tests see the timesteps, noisy latents and text conditioning ``loss_fn`` drew.
"""
from __future__ import annotations

import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from sdjax import parallel
from sdjax.training import step as S

D = 8                      # width of the stand-in text embeddings
VOCAB = 32
EMPTY_IDS = np.array([0] + [1] * 76, np.int32)   # the stand-in vocabulary's "" prompt: <bos> <eos> ...
LATENT = (4, 4, 4)         # h, w, channels


def _alphas_cumprod() -> np.ndarray:
    """SD v1.5's training schedule (scaled_linear betas 0.00085..0.012 over 1000 steps), from its definition."""
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas).astype(np.float32)


ALPHAS_CUMPROD = _alphas_cumprod()
RECORDED: list[dict] = []


def _record(**arrays):
    if not any(isinstance(a, jax.core.Tracer) for a in arrays.values()):
        RECORDED.append({k: np.asarray(v) for k, v in arrays.items()})


class StandInUNet(nnx.Module):
    """eps(x, t, text) = x @ mix + mean_tokens(text) @ text_proj + t / 1000 * time + bias, per pixel."""

    def __init__(self, rngs: nnx.Rngs):
        c = LATENT[-1]
        self.mix = nnx.Param(0.5 * jax.random.normal(rngs.params(), (c, c)))
        self.text_proj = nnx.Param(0.5 * jax.random.normal(rngs.params(), (D, c)))
        self.time = nnx.Param(jax.random.normal(rngs.params(), (c,)))
        self.bias = nnx.Param(0.1 * jax.random.normal(rngs.params(), (c,)))

    def __call__(self, x_BHWC, t_B, context_BLD):
        cond_BC = jnp.mean(context_BLD, axis=1) @ self.text_proj[...]
        pred = (x_BHWC @ self.mix[...] + cond_BC[:, None, None, :]
                + (t_B.astype(jnp.float32) / 1000.0)[:, None, None, None] * self.time[...] + self.bias[...])
        _record(x=x_BHWC, t=t_B, context=context_BLD, pred=pred)
        return pred


class StandInTextEncoder(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.table = nnx.Param(jax.random.normal(rngs.params(), (VOCAB, D)))

    def __call__(self, ids_BL):
        return types.SimpleNamespace(last_hidden_state=self.table[...][ids_BL])   # [B, 77, D]


@pytest.fixture(scope="module")
def models():
    unet, text_encoder = StandInUNet(nnx.Rngs(0)), StandInTextEncoder(nnx.Rngs(1))
    pure = lambda m: nnx.to_pure_dict(nnx.state(m, nnx.Param))  # noqa: E731  (as Trainer.create)
    frozen = S.Frozen(vae={}, text_encoder=pure(text_encoder), alphas_cumprod=jnp.asarray(ALPHAS_CUMPROD),
                      empty_ids=jnp.asarray(EMPTY_IDS), scaling_factor=jnp.float32(0.18215))
    return types.SimpleNamespace(graphdefs=S.Graphdefs(nnx.split(unet)[0], nnx.split(text_encoder)[0], None),
                                 frozen=frozen, params={"unet": pure(unet)},
                                 table=np.asarray(text_encoder.table[...]))


def make_batch(accumulation: int, batch_size: int, seed: int) -> dict:
    """A step's batch, [accumulation, B, ...], of cached posteriors and caption ids."""
    rng = np.random.default_rng(seed)
    shape = (accumulation, batch_size, *LATENT)
    return {"latent_mean": rng.normal(size=shape).astype(np.float32),
            "latent_std": rng.uniform(0.05, 0.5, size=shape).astype(np.float32),
            "input_ids": rng.integers(2, VOCAB, size=(accumulation, batch_size, 77)).astype(np.int32)}


def micro(batch: dict, index: int) -> dict:
    return {k: v[index] for k, v in batch.items()}


def flat(tree) -> dict[str, np.ndarray]:
    """{path: float64 copy} (copies: the jitted step donates the state it is given)."""
    return {jax.tree_util.keystr(path): np.array(leaf, np.float64)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def assert_trees_close(got: dict, want: dict, *, rtol: float, atol: float):
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=rtol, atol=atol, err_msg=k)


def fresh_params(models) -> dict:
    """A copy of the initial parameters to start a state from (the jitted step donates its state)."""
    return jax.tree.map(jnp.array, models.params)


def jit_step(models, cfg, optimizer, lr_schedule):
    return S.jit_train_step(parallel.data_mesh(jax.devices()[:1]), graphdefs=models.graphdefs, cfg=cfg,
                            optimizer=optimizer, lr_schedule=lr_schedule)


def grads_of(models, cfg, params, batch, key):
    """(loss, loss_unweighted), flat UNet gradients of the library's loss on one micro-batch (eager)."""
    (loss, raw), grads = jax.value_and_grad(S.loss_fn, has_aux=True)(
        params, models.frozen, batch, key, graphdefs=models.graphdefs, cfg=cfg)
    return (float(loss), float(raw)), flat(grads["unet"])


# ----------------------------------------------------------------------------- the draws
def test_the_unet_sees_the_forward_process_of_the_scaled_posterior_sample(models):
    """Recomputed here: example i of a micro-batch with key k draws from k_i = fold_in(k, i): the
    posterior sample's eps with fold_in(k_i, 0), the timestep t, uniform in [0, 1000), with
    fold_in(k_i, 1), the noise with fold_in(k_i, 2); the UNet sees
    sqrt(abar_t) * scaling_factor * (mean + std * eps) + sqrt(1 - abar_t) * noise at t."""
    batch = micro(make_batch(1, 4, seed=4), 0)
    key = jax.random.key(7)
    RECORDED.clear()
    S.loss_fn(models.params, models.frozen, batch, key, graphdefs=models.graphdefs, cfg=S.StepConfig())
    seen = RECORDED[-1]
    for i in range(4):
        k = jax.random.fold_in(key, i)
        eps, noise = (np.asarray(jax.random.normal(jax.random.fold_in(k, j), LATENT), np.float64) for j in (0, 2))
        t = int(jax.random.randint(jax.random.fold_in(k, 1), (), 0, 1000))
        latents = (batch["latent_mean"][i] + batch["latent_std"][i] * eps) * 0.18215
        abar = float(ALPHAS_CUMPROD[t])
        assert int(seen["t"][i]) == t
        np.testing.assert_allclose(seen["x"][i], abar ** 0.5 * latents + (1 - abar) ** 0.5 * noise, rtol=1e-5, atol=1e-6)


def test_the_draws_do_not_depend_on_jax_enable_x64(models):
    """The same key draws the same timesteps, noise and caption dropout with jax_enable_x64 on
    (research code often turns it on): the default dtypes of randint/uniform, and so their bits,
    change with it."""
    batch = micro(make_batch(1, 8, seed=6), 0)
    cfg = S.StepConfig(caption_dropout=0.5)
    seen = []
    for x64 in (False, True):
        jax.config.update("jax_enable_x64", x64)
        try:
            RECORDED.clear()
            loss, _ = S.loss_fn(models.params, models.frozen, batch, jax.random.key(11), graphdefs=models.graphdefs,
                                cfg=cfg)
            seen.append((float(loss), RECORDED[-1]))
        finally:
            jax.config.update("jax_enable_x64", False)
    (loss32, call32), (loss64, call64) = seen
    np.testing.assert_array_equal(call64["t"], call32["t"])
    np.testing.assert_array_equal(call64["context"], call32["context"])
    np.testing.assert_array_equal(call64["x"], call32["x"])
    assert loss64 == pytest.approx(loss32, rel=1e-6)


def test_each_update_and_micro_batch_draws_with_its_own_key():
    """micro_batch_key(state, a) = fold_in(fold_in(key(seed), step), a): other micro-batches and
    other updates draw other timesteps and noise."""
    def key_of(step, index):
        state = types.SimpleNamespace(rng=jax.random.key_data(jax.random.key(3)), step=jnp.int32(step))
        return np.asarray(jax.random.key_data(S.micro_batch_key(state, index)))
    for step, index in ((5, 0), (5, 1), (6, 0)):
        want = jax.random.fold_in(jax.random.fold_in(jax.random.key(3), step), index)
        np.testing.assert_array_equal(key_of(step, index), jax.random.key_data(want))
    assert len({key_of(*c).tobytes() for c in ((5, 0), (5, 1), (6, 0))}) == 3


# ----------------------------------------------------------------------------- gradient accumulation
@pytest.mark.parametrize("path", ["unrolled", "scan"])
def test_accumulation_applies_the_mean_of_the_micro_batch_gradients(models, path, monkeypatch):
    """One update from [2, B] equals SGD on the mean of the two micro-batches' gradients, each taken
    with ``loss_fn`` on its own micro-batch and key (``micro_batch_key``); the logged losses are the
    micro-batches' mean. ``scan`` traces the ``lax.scan`` branch the accelerators take (the CPU
    unrolls the loop)."""
    lr = 0.1
    cfg = S.StepConfig(min_snr_gamma=5.0)        # the weighted loss differs from the unweighted one
    state = S.init_state(fresh_params(models), optax.sgd(lr), seed=7, ema=False)
    batch = make_batch(2, 3, seed=0)
    per_micro = [grads_of(models, cfg, models.params, micro(batch, i), S.micro_batch_key(state, i)) for i in (0, 1)]
    (losses0, g0), (losses1, g1) = per_micro
    assert max(np.abs(g0[k] - g1[k]).max() for k in g0) > 0.1 * max(np.abs(g0[k]).max() for k in g0)  # tell apart
    mean_grads = {k: (g0[k] + g1[k]) / 2 for k in g0}
    p0 = flat(models.params["unet"])

    step_fn = jit_step(models, cfg, optax.sgd(lr), optax.constant_schedule(lr))
    if path == "scan":
        monkeypatch.setattr(jax, "default_backend", lambda: "gpu")   # while tracing only
    traced = step_fn.trace(state, models.frozen, batch)
    monkeypatch.undo()
    assert (" scan[" in str(traced.jaxpr)) == (path == "scan")
    new_state, metrics = traced.lower().compile()(state, models.frozen, batch)

    assert_trees_close(flat(new_state.params["unet"]), {k: p0[k] - lr * mean_grads[k] for k in p0},
                       rtol=1e-5, atol=1e-6)
    assert float(metrics["loss"]) == pytest.approx((losses0[0] + losses1[0]) / 2, rel=1e-5)
    assert float(metrics["loss_unweighted"]) == pytest.approx((losses0[1] + losses1[1]) / 2, rel=1e-5)
    assert float(metrics["grad_norm"]) == pytest.approx(
        math.sqrt(sum(float(np.sum(g ** 2)) for g in mean_grads.values())), rel=1e-5)
    assert int(new_state.step) == 1


def test_a_batch_of_host_arrays_is_split_over_the_devices(models):
    """jit_train_step on 8 devices: a batch passed as NumPy arrays is split over the data axis as a
    placed one is (each device computes its columns: the same FLOPs per device, not 8x), with the
    same update."""
    mesh = parallel.data_mesh(jax.devices()[:8])
    optimizer, lr_schedule = S.make_optimizer(1e-2)
    step_fn = S.jit_train_step(mesh, graphdefs=models.graphdefs, cfg=S.StepConfig(), optimizer=optimizer,
                               lr_schedule=lr_schedule)
    frozen = parallel.replicate(models.frozen, mesh)
    batch = make_batch(1, 8, seed=12)
    placed = {k: parallel.shard_batch(v, mesh, axis=1) for k, v in batch.items()}
    fresh = lambda: S.init_state(parallel.replicate(fresh_params(models), mesh), optimizer, seed=4,  # noqa: E731
                                 ema=False, mesh=mesh)
    flops = {}
    for name, given in (("host", batch), ("placed", placed)):
        flops[name] = step_fn.lower(fresh(), frozen, given).compile().cost_analysis()["flops"]
    assert flops["host"] == pytest.approx(flops["placed"], rel=0.05), flops
    from_host, _ = step_fn(fresh(), frozen, batch)
    from_placed, _ = step_fn(fresh(), frozen, placed)
    assert_trees_close(flat(from_host.params), flat(from_placed.params), rtol=1e-6, atol=1e-7)
    # 4 examples on 8 devices cannot be split evenly: left to XLA, as before (no compile error)
    uneven, _ = step_fn(fresh(), frozen, make_batch(1, 4, seed=12))
    assert all(np.isfinite(v).all() for v in flat(uneven.params).values())


# ----------------------------------------------------------------------------- EMA
def test_ema_is_diffusers_emamodel_of_the_updated_weights(models):
    """The EMA starts as a copy of the initial UNet weights (``EMAModel(parameters)`` clones them) and
    after each update moves towards the *updated* weights with diffusers' warm-up decay
    (``EMAModel.get_decay``, defaults ``update_after_step=0``, ``use_ema_warmup=False``,
    ``min_decay=0``): 0 at the first update, then ``min(ema_decay, (1 + n) / (10 + n))`` after n
    updates. Checked against a NumPy recomputation and against diffusers' ``EMAModel`` itself; the
    decay 0.2 makes the second update use the warm-up value 2/11 and the third the cap 0.2."""
    import torch
    from diffusers.training_utils import EMAModel

    ema_decay = 0.2
    optimizer, lr_schedule = S.make_optimizer(1e-2)
    step_fn = jit_step(models, S.StepConfig(ema_decay=ema_decay), optimizer, lr_schedule)
    state = S.init_state(fresh_params(models), optimizer, seed=1, ema=True)
    weights = [flat(state.params["unet"])]
    assert_trees_close(flat(state.ema["unet"]), weights[0], rtol=0, atol=0)
    for n in range(3):
        state, _ = step_fn(state, models.frozen, make_batch(1, 2, seed=n))
        weights.append(flat(state.params["unet"]))
    got = flat(state.ema["unet"])

    ema = weights[0]
    for n, updated in enumerate(weights[1:]):          # n: updates done before this one
        decay = 0.0 if n == 0 else min(ema_decay, (1 + n) / (10 + n))
        ema = {k: decay * ema[k] + (1 - decay) * updated[k] for k in ema}
    assert_trees_close(got, ema, rtol=1e-6, atol=1e-7)

    names = sorted(weights[0])
    torch_params = [torch.nn.Parameter(torch.from_numpy(weights[0][k].copy())) for k in names]
    reference = EMAModel(torch_params, decay=ema_decay)
    for updated in weights[1:]:
        with torch.no_grad():
            for p, k in zip(torch_params, names):
                p.copy_(torch.from_numpy(updated[k]))
        reference.step(torch_params)
    assert_trees_close(got, {k: s.numpy() for k, s in zip(names, reference.shadow_params)}, rtol=1e-6, atol=1e-7)
    assert max(np.abs(got[k] - weights[-1][k]).max() for k in got) > 1e-4   # not simply the last weights


def test_trained_text_encoder_follows_its_gradient_and_has_an_ema(models):
    """With ``train_text_encoder`` the text encoder's weights take SGD updates of the loss's own
    gradient, checked by central differences of ``loss_fn`` (exact here: the stand-in's loss is
    quadratic in the embedding table); rows of tokens the batch does not use stay bit for bit; and the
    EMA averages the text encoder as it does the UNet, so an export pairs averaged weights with
    averaged weights."""
    lr, ema_decay = 0.5, 0.2
    cfg = S.StepConfig(train_text_encoder=True, ema_decay=ema_decay)
    frozen = models.frozen._replace(text_encoder=None)   # as Trainer.create passes it when training it
    params = jax.tree.map(jnp.array, {"unet": models.params["unet"], "text_encoder": models.frozen.text_encoder})
    step_fn = S.jit_train_step(parallel.data_mesh(jax.devices()[:1]), graphdefs=models.graphdefs, cfg=cfg,
                               optimizer=optax.sgd(lr), lr_schedule=optax.constant_schedule(lr))
    state = S.init_state(params, optax.sgd(lr), seed=3, ema=True)
    assert set(state.ema) == {"unet", "text_encoder"}

    batch = make_batch(1, 2, seed=30)
    batch["input_ids"][..., :40] = 5 + np.arange(2)[:, None]    # tokens 5 and 6 used, 2..4 not
    batch["input_ids"][..., 40:] = 7
    used, unused = [5, 6, 7], [2, 3, 4]
    table = np.array(state.params["text_encoder"]["table"], np.float64)
    key = S.micro_batch_key(state, 0)

    def loss_at(new_table):
        trial = {"unet": state.params["unet"], "text_encoder": {"table": jnp.asarray(new_table, jnp.float32)}}
        return float(S.loss_fn(trial, frozen, micro(batch, 0), key, graphdefs=models.graphdefs, cfg=cfg)[0])

    probes = [(row, col) for row in used + unused[:1] for col in (0, D - 1)]
    expected_grad = {}
    for row, col in probes:
        up, down = table.copy(), table.copy()
        up[row, col] += 1.0
        down[row, col] -= 1.0
        expected_grad[row, col] = (loss_at(up) - loss_at(down)) / 2.0

    tables = [table]
    for n in range(2):
        state, _ = step_fn(state, frozen, batch if n == 0 else make_batch(1, 2, seed=31))
        tables.append(np.array(state.params["text_encoder"]["table"], np.float64))
    after_first = tables[1]
    for (row, col), grad in expected_grad.items():
        assert after_first[row, col] == pytest.approx(table[row, col] - lr * grad, rel=1e-4, abs=1e-6), (row, col)
    assert all(abs(expected_grad[row, 0]) > 1e-4 for row in used)      # the probes see real gradients
    np.testing.assert_array_equal(after_first[unused], table[unused])

    # EMA: decay 0 at the first update, then min(ema_decay, 2 / 11) = 2 / 11 at the second.
    decay = min(ema_decay, 2 / 11)
    expected_ema = decay * tables[1] + (1 - decay) * tables[2]
    np.testing.assert_allclose(np.asarray(state.ema["text_encoder"]["table"]), expected_ema, rtol=1e-6, atol=1e-7)
    assert np.abs(tables[2] - expected_ema).max() > 1e-4                # not simply the last weights


# ----------------------------------------------------------------------------- learning rate
def test_schedules_are_the_closed_forms():
    """Linear warmup from 0 over W updates, then constant, cosine or linear to 0 at total_steps T:
    lr(s) = peak * s / W for s < W, then peak, peak * (1 + cos(pi * (s - W) / (T - W))) / 2 or
    peak * (T - s) / (T - W); the same factors as diffusers' get_constant_schedule_with_warmup /
    get_cosine_schedule_with_warmup / get_linear_schedule_with_warmup."""
    import torch
    from diffusers.optimization import (get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup,
                                        get_cosine_with_hard_restarts_schedule_with_warmup,
                                        get_linear_schedule_with_warmup, get_polynomial_decay_schedule_with_warmup)

    peak, warmup, total = 1e-3, 4, 20
    steps = [0, 1, 2, 3, 4, 5, 8, 9, 10, 12, 19, 20]

    def constant(s):
        return peak * s / warmup if s < warmup else peak

    def cosine(s):
        return peak * s / warmup if s < warmup else peak * (1 + math.cos(math.pi * (s - warmup) / (total - warmup))) / 2

    def linear(s):
        return peak * s / warmup if s < warmup else peak * (total - s) / (total - warmup)

    def restarts(s, cycles=3):   # each cycle a cosine from the peak to 0
        progress = (s - warmup) / (total - warmup)
        return peak * s / warmup if s < warmup else (
            0.0 if progress >= 1 else peak * (1 + math.cos(math.pi * ((cycles * progress) % 1))) / 2)

    def polynomial(s, power=2.0, end=1e-7):
        return peak * s / warmup if s < warmup else (peak - end) * ((total - s) / (total - warmup)) ** power + end

    schedules = {"constant": (S.make_optimizer(peak, warmup_steps=warmup)[1], constant),
                 "constant_with_warmup": (S.make_optimizer(peak, warmup_steps=warmup, schedule="constant_with_warmup")[1],
                                          constant),
                 "linear": (S.make_optimizer(peak, warmup_steps=warmup, schedule="linear", total_steps=total)[1],
                            linear),
                 "linear, no warmup": (S.make_optimizer(peak, schedule="linear", total_steps=total)[1],
                                       lambda s: peak * (total - s) / total),
                 "cosine": (S.make_optimizer(peak, warmup_steps=warmup, schedule="cosine", total_steps=total)[1],
                            cosine),
                 "no warmup": (S.make_optimizer(peak)[1], lambda s: peak),
                 "cosine_with_restarts": (S.make_optimizer(peak, warmup_steps=warmup, schedule="cosine_with_restarts",
                                                           total_steps=total, num_cycles=3)[1], restarts),
                 "polynomial": (S.make_optimizer(peak, warmup_steps=warmup, schedule="polynomial", total_steps=total,
                                                 power=2.0)[1], polynomial)}
    for name, (schedule, closed_form) in schedules.items():
        for s in steps:
            assert float(schedule(s)) == pytest.approx(closed_form(s), rel=1e-6, abs=1e-6 * peak), (name, s)  # fp32
    assert cosine(12) == pytest.approx(peak / 2) and cosine(20) == pytest.approx(0.0, abs=1e-15)
    assert restarts(9) < 0.05 * peak and restarts(10) > 0.9 * peak              # the second cycle starts between
    assert polynomial(12) == pytest.approx((peak - 1e-7) / 4 + 1e-7)               # half way, squared

    sgd = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    diffusers_factors = {"constant": get_constant_schedule_with_warmup(sgd, warmup).lr_lambdas[0],
                         "constant_with_warmup": get_constant_schedule_with_warmup(sgd, warmup).lr_lambdas[0],
                         "cosine": get_cosine_schedule_with_warmup(sgd, warmup, total).lr_lambdas[0],
                         "linear": get_linear_schedule_with_warmup(sgd, warmup, total).lr_lambdas[0],
                         "cosine_with_restarts": get_cosine_with_hard_restarts_schedule_with_warmup(
                             sgd, warmup, total, num_cycles=3).lr_lambdas[0],
                         "polynomial": get_polynomial_decay_schedule_with_warmup(
                             sgd, warmup, total, power=2.0).lr_lambdas[0]}
    for name, factor in diffusers_factors.items():
        for s in steps:
            assert schedules[name][1](s) == pytest.approx(peak * factor(s), rel=1e-12, abs=1e-15), (name, s)


@pytest.mark.parametrize("total,warmup,cycles", [(282, 0, 2), (219, 1, 2), (128, 5, 3)])
def test_cosine_with_restarts_starts_each_cycle_at_the_peak_under_jit(total, warmup, cycles):
    """The train step evaluates the schedule under jit, where (num_cycles * progress) % 1 in float32
    came out a rounding step below 1 at the first step of a cycle: that update's rate was ~0 instead
    of the peak (found comparing every step of many schedules, jitted, with diffusers' formula).
    Cycle k starts at step warmup + k * (total - warmup) / cycles, a whole step for these; every step
    equals diffusers' get_cosine_with_hard_restarts_schedule_with_warmup (computed here)."""
    def restarts(s):
        if s < warmup:
            return s / max(1, warmup)
        progress = (s - warmup) / max(1, total - warmup)
        return 0.0 if progress >= 1 else 0.5 * (1 + math.cos(math.pi * ((cycles * progress) % 1)))
    _, schedule = S.make_optimizer(1.0, warmup_steps=warmup, schedule="cosine_with_restarts", total_steps=total,
                                   num_cycles=cycles)
    rates = np.asarray(jax.jit(schedule)(jnp.arange(total + 1, dtype=jnp.int32)))
    starts = [warmup + k * (total - warmup) // cycles for k in range(1, cycles)]
    assert all(k * (total - warmup) % cycles == 0 for k in range(1, cycles))   # whole steps
    np.testing.assert_allclose(rates[starts], 1.0, rtol=1e-6)
    np.testing.assert_allclose(rates, [restarts(s) for s in range(total + 1)], atol=1e-6)


def test_logged_lr_is_the_rate_the_update_used(models):
    """Three updates with a 2-update warmup: the logged lr is peak * min(1, n / 2) after n updates
    (0, peak / 2, peak), and each update is AdamW (optax's conventions, recomputed in NumPy after
    global-norm clipping to 1) at that rate; the first one, at rate 0, leaves the weights as they were."""
    peak, warmup, b1, b2, eps, weight_decay = 1e-2, 2, 0.9, 0.999, 1e-8, 0.1
    optimizer, lr_schedule = S.make_optimizer(peak, warmup_steps=warmup, b1=b1, b2=b2, weight_decay=weight_decay,
                                              max_grad_norm=1.0)
    cfg = S.StepConfig()
    step_fn = jit_step(models, cfg, optimizer, lr_schedule)
    state = S.init_state(fresh_params(models), optimizer, seed=2, ema=False)
    m = v = None
    for n in range(3):
        batch = make_batch(1, 2, seed=10 + n)
        weights = flat(state.params["unet"])
        _, g = grads_of(models, cfg, state.params, micro(batch, 0), S.micro_batch_key(state, 0))
        norm = math.sqrt(sum(float(np.sum(x ** 2)) for x in g.values()))
        g = {k: x * min(1.0, 1.0 / norm) for k, x in g.items()}
        m = {k: (b1 * m[k] if m else 0) + (1 - b1) * g[k] for k in g}
        v = {k: (b2 * v[k] if v else 0) + (1 - b2) * g[k] ** 2 for k in g}
        direction = {k: (m[k] / (1 - b1 ** (n + 1))) / (np.sqrt(v[k] / (1 - b2 ** (n + 1))) + eps)
                     + weight_decay * weights[k] for k in g}
        lr = peak * min(1.0, n / warmup)

        state, metrics = step_fn(state, models.frozen, batch)
        assert float(metrics["lr"]) == pytest.approx(lr, rel=1e-6, abs=1e-12), n
        assert_trees_close(flat(state.params["unet"]), {k: weights[k] - lr * direction[k] for k in weights},
                           rtol=1e-5, atol=1e-6 * peak)
        if n == 0:
            assert_trees_close(flat(state.params["unet"]), weights, rtol=0, atol=0)


# ----------------------------------------------------------------------------- caption dropout
@pytest.mark.parametrize("caption_dropout, dropped", [(0.0, "none"), (1e-6, "none"), (0.5, "some"), (1.0, "all")])
def test_caption_dropout_conditions_on_the_empty_prompt(models, caption_dropout, dropped):
    """Each example's text conditioning (what the UNet receives) is the text encoder's output for
    either its caption or, dropped, the "" prompt (``Frozen.empty_ids``); dropout 1 drops every
    caption, 0 and 1e-6 none (on 32 examples), 0.5 some."""
    batch = micro(make_batch(1, 32, seed=5), 0)
    RECORDED.clear()
    S.loss_fn(models.params, models.frozen, batch, jax.random.key(3), graphdefs=models.graphdefs,
              cfg=S.StepConfig(caption_dropout=caption_dropout))
    (call,) = RECORDED
    context = call["context"]                                    # [B, 77, D]
    is_caption = np.array([np.array_equal(c, models.table[ids]) for c, ids in zip(context, batch["input_ids"])])
    is_empty = np.array([np.array_equal(c, models.table[EMPTY_IDS]) for c in context])
    assert np.all(is_caption != is_empty), "each conditioning is the caption's or the empty prompt's"
    n_dropped = f"{is_empty.sum()} of {len(is_empty)} captions dropped at caption_dropout={caption_dropout}"
    if dropped == "none":
        assert not is_empty.any(), n_dropped
    elif dropped == "all":
        assert is_empty.all(), n_dropped
    else:
        assert 0.25 <= is_empty.mean() <= 0.75, n_dropped


# ----------------------------------------------------------------------------- Min-SNR-gamma
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_gamma_weights(models, prediction_type):
    """The loss is mean_i(w(t_i) * mse_i) with snr = abar / (1 - abar) and w = min(snr, gamma) / snr
    (epsilon) or min(snr, gamma) / (snr + 1) (v-prediction), diffusers' train_text_to_image.py
    (Hang et al. 2023); ``loss_unweighted`` is mean_i(mse_i). With zero latents x_t =
    sqrt(1 - abar) * noise, so the test recovers each example's noise and target from the
    UNet's input and t, and its mse from the UNet's output."""
    gamma = 5.0
    batch = micro(make_batch(1, 32, seed=6), 0)
    batch["latent_mean"] = np.zeros_like(batch["latent_mean"])
    batch["latent_std"] = np.zeros_like(batch["latent_std"])
    results = {}
    for min_snr_gamma in (gamma, None):
        RECORDED.clear()
        results[min_snr_gamma] = [float(x) for x in S.loss_fn(
            models.params, models.frozen, batch, jax.random.key(4), graphdefs=models.graphdefs,
            cfg=S.StepConfig(prediction_type=prediction_type, min_snr_gamma=min_snr_gamma))]
    (call,) = RECORDED
    abar = ALPHAS_CUMPROD.astype(np.float64)[call["t"]][:, None, None, None]
    noise = call["x"] / np.sqrt(1.0 - abar)
    target = noise if prediction_type == "epsilon" else np.sqrt(abar) * noise   # v = sqrt(abar) eps - sqrt(1-abar) x0
    mse = np.mean((call["pred"].astype(np.float64) - target) ** 2, axis=(1, 2, 3))
    snr = abar[:, 0, 0, 0] / (1.0 - abar[:, 0, 0, 0])
    assert (snr > gamma).sum() >= 4 and (snr < gamma).sum() >= 4, snr    # both sides of the clip
    weight = np.minimum(snr, gamma) / (snr if prediction_type == "epsilon" else snr + 1.0)

    loss, loss_unweighted = results[gamma]
    assert loss_unweighted == pytest.approx(mse.mean(), rel=1e-5)
    assert loss == pytest.approx(np.mean(weight * mse), rel=1e-5)
    assert results[None] == pytest.approx([mse.mean(), mse.mean()], rel=1e-5)   # no gamma: unweighted


def noise_seen_by_the_unet(models, **step_config) -> dict:
    """One loss at zero latents, where the UNet's input is x_t = sqrt(1 - abar) * noise: the loss,
    the noise in that input (float64), the UNet's prediction and the timesteps drawn."""
    batch = micro(make_batch(1, 32, seed=6), 0)
    batch["latent_mean"] = np.zeros_like(batch["latent_mean"])
    batch["latent_std"] = np.zeros_like(batch["latent_std"])
    RECORDED.clear()
    loss, _ = S.loss_fn(models.params, models.frozen, batch, jax.random.key(4), graphdefs=models.graphdefs,
                        cfg=S.StepConfig(**step_config))
    (call,) = RECORDED
    abar = ALPHAS_CUMPROD.astype(np.float64)[call["t"]][:, None, None, None]
    return dict(loss=float(loss), noise=call["x"] / np.sqrt(1.0 - abar), pred=call["pred"].astype(np.float64),
                t=np.asarray(call["t"]))


def test_noise_offset_adds_a_constant_per_image_and_channel(models):
    """diffusers' --noise_offset: noise + offset * N(0, 1) drawn per image and channel, the same over
    the image; the epsilon target is that noise."""
    plain, offset = noise_seen_by_the_unet(models), noise_seen_by_the_unet(models, noise_offset=0.1)
    added = offset["noise"] - plain["noise"]                              # [B, h, w, C]
    np.testing.assert_allclose(added, np.broadcast_to(added[:, :1, :1, :], added.shape), atol=1e-5)
    draws = added[:, 0, 0, :] / 0.1                                       # B x C standard normal draws
    assert draws.size >= 32 and 0.5 < draws.std() < 1.5 and abs(draws.mean()) < 0.5, draws
    assert offset["loss"] == pytest.approx(np.mean((offset["pred"] - offset["noise"]) ** 2), rel=1e-5)


def test_input_perturbation_noises_the_input_but_not_the_target(models):
    """diffusers' --input_perturbation: the UNet's input is made with noise + p * N(0, 1), its target
    is the noise alone; the same key draws the same noise and timesteps with and without it."""
    plain, perturbed = noise_seen_by_the_unet(models), noise_seen_by_the_unet(models, input_perturbation=0.1)
    np.testing.assert_array_equal(plain["t"], perturbed["t"])
    draws = (perturbed["noise"] - plain["noise"]) / 0.1                   # standard normal, element by element
    assert draws.size >= 1000 and 0.9 < draws.std() < 1.1 and abs(draws.mean()) < 0.1, (draws.mean(), draws.std())
    assert abs(np.corrcoef(draws.ravel(), plain["noise"].ravel())[0, 1]) < 0.1   # drawn apart from the noise
    assert perturbed["loss"] == pytest.approx(np.mean((perturbed["pred"] - plain["noise"]) ** 2), rel=1e-5)


def test_min_snr_gamma_at_zero_snr_is_finite(models):
    """At zero SNR (the last timestep of a zero-terminal-SNR schedule) the epsilon weight
    min(snr, gamma) / snr is 0 / 0: its limit 1 is used (it was NaN: a diverged run, for 63% of
    1000 steps at batch 1). v-prediction's min(snr, gamma) / (snr + 1) is 0 there."""
    batch = micro(make_batch(1, 32, seed=6), 0)
    frozen = models.frozen._replace(alphas_cumprod=jnp.zeros_like(models.frozen.alphas_cumprod))
    for prediction_type, expected in (("epsilon", 1.0), ("v_prediction", 0.0)):
        loss, unweighted = (float(x) for x in S.loss_fn(
            models.params, frozen, batch, jax.random.key(4), graphdefs=models.graphdefs,
            cfg=S.StepConfig(prediction_type=prediction_type, min_snr_gamma=5.0)))
        assert np.isfinite(unweighted) and loss == pytest.approx(expected * unweighted, rel=1e-6)


# ----------------------------------------------------------------------------- LoRA
class LinearUNet(nnx.Module):
    """A stand-in UNet whose pixel mix is an ``nnx.Linear`` (a LoRA target): proj(x) + text + time."""

    def __init__(self, rngs: nnx.Rngs):
        c = LATENT[-1]
        self.proj = nnx.Linear(c, c, use_bias=False, rngs=rngs)
        self.text_proj = nnx.Param(0.5 * jax.random.normal(rngs.params(), (D, c)))
        self.time = nnx.Param(jax.random.normal(rngs.params(), (c,)))

    def __call__(self, x_BHWC, t_B, context_BLD):
        cond_BC = jnp.mean(context_BLD, axis=1) @ self.text_proj[...]
        return (self.proj(x_BHWC) + cond_BC[:, None, None, :]
                + (t_B.astype(jnp.float32) / 1000.0)[:, None, None, None] * self.time[...])


class LinearTextEncoder(nnx.Module):
    """A stand-in text encoder: an embedding table, then an ``nnx.Linear`` (a LoRA target)."""

    def __init__(self, rngs: nnx.Rngs):
        self.table = nnx.Param(jax.random.normal(rngs.params(), (VOCAB, D)))
        self.proj = nnx.Linear(D, D, use_bias=False, rngs=rngs)

    def __call__(self, ids_BL):
        return types.SimpleNamespace(last_hidden_state=self.proj(self.table[...][ids_BL]))


def test_lora_trains_the_low_rank_change_of_a_frozen_linear(models):
    """LoRA of the stand-ins' Linears (the UNet's and the text encoder's): the loss is the models'
    loss at the merged kernels ``W + alpha / rank * down @ up`` (`lora.merged`; at step 0's ``up = 0``
    the frozen models' loss), and the gradients are the chain rule of the kernels' own gradients at
    those weights, ``scale * dW @ up.T`` and ``scale * down.T @ dW``, derived here from the whole
    models' gradient; nothing else gets one. Checks the train step's LoRA branches (`lora.attach`)
    against the merge that sampling and the export use."""
    from flax.traverse_util import flatten_dict
    from sdjax.training import lora
    rank, alpha = 2, 3.0
    unet, text_encoder = LinearUNet(nnx.Rngs(5)), LinearTextEncoder(nnx.Rngs(6))
    pure = lambda m: nnx.to_pure_dict(nnx.state(m, nnx.Param))  # noqa: E731
    base = {"unet": pure(unet), "text_encoder": pure(text_encoder)}
    spec = lora.lora_spec(base, rank=rank, alpha=alpha, modules={"unet": ("proj",), "text_encoder": ("proj",)})
    assert [(name, part, path) for name, part, path in spec.targets] == [
        ("lora_unet_proj", "unet", ("proj", "kernel")), ("lora_te_proj", "text_encoder", ("proj", "kernel"))]
    graphdefs = S.Graphdefs(nnx.split(unet)[0], nnx.split(text_encoder)[0], None)
    frozen = models.frozen._replace(unet=base["unet"], text_encoder=base["text_encoder"])
    cfg = S.StepConfig(lora=spec, train_text_encoder=True)
    batch, key = micro(make_batch(1, 3, seed=40), 0), jax.random.key(41)

    def full_loss(params):   # the whole models trained, at the given weights
        return S.loss_fn(params, frozen._replace(text_encoder=None), batch, key, graphdefs=graphdefs,
                         cfg=S.StepConfig(train_text_encoder=True))[0]

    def lora_loss(lora_params):
        return S.loss_fn({"lora": lora_params}, frozen, batch, key, graphdefs=graphdefs, cfg=cfg)[0]

    start = lora.init_lora(spec, base, jax.random.key(0))
    assert all(not np.any(pair["up"]) for pair in start.values())
    assert float(lora_loss(start)) == pytest.approx(float(full_loss(base)), rel=1e-6)

    rng = np.random.default_rng(42)
    trained = {name: {"down": jnp.asarray(rng.normal(size=pair["down"].shape), jnp.float32),
                      "up": jnp.asarray(rng.normal(size=pair["up"].shape), jnp.float32) * 0.3}
               for name, pair in start.items()}
    loss, grads = jax.value_and_grad(lora_loss)(trained)
    merged = {part: lora.merged(base[part], trained, spec, part) for part in ("unet", "text_encoder")}
    want_loss, full_grads = jax.value_and_grad(full_loss)(merged)
    assert float(loss) == pytest.approx(float(want_loss), rel=1e-5)
    assert abs(float(loss) - float(full_loss(base))) > 1e-3          # the LoRA changes the loss
    scale = alpha / rank
    for name, part, path in spec.targets:
        kernel_grad = np.asarray(flatten_dict(full_grads[part])[path], np.float64)
        down, up = (np.asarray(trained[name][k], np.float64) for k in ("down", "up"))
        np.testing.assert_allclose(grads[name]["down"], scale * kernel_grad @ up.T, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(grads[name]["up"], scale * down.T @ kernel_grad, rtol=1e-4, atol=1e-6)
        assert np.abs(kernel_grad).max() > 1e-3
