"""Parity of sdjax.schedulers with the diffusers 0.42 PyTorch schedulers (fp32).

Deterministic schedulers: same timesteps and sigmas, and the same latents after every step of a full
loop driven by a fixed fake model, with the sdjax loop run the way the sampler runs it (``jax.jit`` of a
``lax.scan`` over the loop index).  Stochastic schedulers: the same trajectory when diffusers is fed the
noise sdjax draws, and the same per-step statistics as diffusers' own torch-noise runs over many seeds
(checked to be able to fail).
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import diffusers   # the reference: a test dependency, so a missing one fails rather than skips
import torch

from sdjax import schedulers as S

SD15_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}

DIFFUSERS_CLASSES = {
    "pndm": diffusers.PNDMScheduler,
    "ddim": diffusers.DDIMScheduler,
    "euler": diffusers.EulerDiscreteScheduler,
    "euler_a": diffusers.EulerAncestralDiscreteScheduler,
    "dpmpp_2m": diffusers.DPMSolverMultistepScheduler,
    "dpmpp_2m_sde": diffusers.DPMSolverMultistepScheduler,
    "lms": diffusers.LMSDiscreteScheduler,
    "ddpm": diffusers.DDPMScheduler,
}

# Per-step parity tolerance: max |sdjax - diffusers| <= TOL * max(1, max |diffusers|).  The fake model
# is no denoiser, so some trajectories grow to |x| ~ 50 (and sigma-space ones start at |x| ~ 15-4096).
TOL = 1e-5


def reference_scheduler(name, num_steps, **options):
    if name == "dpmpp_2m_sde":
        options = {**options, "algorithm_type": "sde-dpmsolver++"}
    scheduler = DIFFUSERS_CLASSES[name].from_config(SD15_SCHEDULER_CONFIG, **options)
    scheduler.set_timesteps(num_steps)
    return scheduler


def fake_model_torch(sample, t):
    return 0.3 * torch.tanh(sample) + 0.1 * torch.cos(torch.as_tensor(t).to(torch.float32) / 100.0)


def fake_model_jax(sample, t):
    return 0.3 * jnp.tanh(sample) + 0.1 * jnp.cos(t / 100.0)


def to_nhwc(x_nchw):
    return np.asarray(x_nchw).transpose(0, 2, 3, 1)


def to_nchw(x_nhwc):
    return np.ascontiguousarray(np.asarray(x_nhwc).transpose(0, 3, 1, 2))


def run_diffusers(scheduler, noise_nchw, model=fake_model_torch, step_kwargs=lambda i: {}):
    """diffusers' StableDiffusionPipeline denoising loop; returns the latents after each step, NHWC."""
    latents = torch.from_numpy(noise_nchw) * scheduler.init_noise_sigma
    trajectory = []
    for i, t in enumerate(scheduler.timesteps):
        model_input = scheduler.scale_model_input(latents, t)
        latents = scheduler.step(model(model_input, t), t, latents, **step_kwargs(i)).prev_sample
        trajectory.append(to_nhwc(latents.numpy()))
    return np.stack(trajectory)


def sdjax_loop(scheduler, noise_nhwc, keys=None, model=fake_model_jax):
    """The sampler's loop: a lax.scan over the loop index; returns the latents after each step."""
    latents = noise_nhwc * scheduler.init_noise_sigma

    def body(carry, i):
        latents, state = carry
        model_input = scheduler.scale_model_input(state, latents, i)
        output = model(model_input, scheduler.timestep(i))
        latents, state = scheduler.step(state, output, i, latents, keys)
        return (latents, state), latents

    carry = (latents, scheduler.init_state(latents))
    _, trajectory = jax.lax.scan(body, carry, jnp.arange(scheduler.num_model_calls))
    return trajectory


run_sdjax = jax.jit(sdjax_loop, static_argnames="model")


def relative_step_errors(ours, reference, initial_latents=None):
    """Per step: max abs error over max(1, max |reference|).

    With ``initial_latents`` the scale is instead the largest latents so far (initial ones included):
    float32 rounding at the largest magnitude then sets the error floor for the rest of the trajectory.
    """
    assert ours.shape == reference.shape, (ours.shape, reference.shape)
    axes = tuple(range(1, reference.ndim))
    abs_error = np.abs(np.asarray(ours, np.float64) - reference).max(axis=axes)
    scale = np.abs(reference).max(axis=axes)
    if initial_latents is not None:
        scale = np.maximum.accumulate(np.maximum(scale, np.abs(initial_latents).max()))
    return abs_error / np.maximum(1.0, scale)


@pytest.fixture(scope="module")
def noise_nchw():
    return np.random.default_rng(1234).standard_normal((2, 4, 8, 8)).astype(np.float32)


DETERMINISTIC_CASES = [
    *[(name, steps, {}) for name in ("pndm", "ddim", "euler", "lms", "dpmpp_2m") for steps in (7, 10, 50)],
    *[("dpmpp_2m", steps, {"use_karras_sigmas": True}) for steps in (7, 10, 50)],
    *[(name, 10, {"prediction_type": "v_prediction"}) for name in ("pndm", "ddim", "euler", "lms", "dpmpp_2m")],
    ("ddim", 7, {"timestep_spacing": "trailing"}),
    ("pndm", 7, {"timestep_spacing": "linspace"}),
    ("euler", 7, {"timestep_spacing": "trailing"}),
    ("euler", 7, {"timestep_spacing": "linspace"}),  # fractional timesteps
    ("dpmpp_2m", 7, {"timestep_spacing": "linspace"}),
    ("dpmpp_2m", 7, {"timestep_spacing": "trailing"}),
    ("pndm", 10, {"skip_prk_steps": False}),  # Runge-Kutta warm-up
    ("euler", 10, {"use_karras_sigmas": True}),
    ("euler", 10, {"timestep_type": "continuous"}),   # diffusers acts on it with v_prediction only
    ("lms", 10, {"use_karras_sigmas": True}),
    ("dpmpp_2m", 20, {"final_sigmas_type": "sigma_min"}),
    ("dpmpp_2m", 10, {"solver_type": "heun"}),
    ("ddim", 10, {"clip_sample": True, "set_alpha_to_one": True}),
    ("ddim", 10, {"clip_sample": True, "clip_sample_range": 0.5}),
    ("lms", 61, {"timestep_spacing": "trailing"}),  # 62 model calls: trailing spacing adds one (diffusers too)
    ("dpmpp_2m", 16, {"final_sigmas_type": "sigma_min"}),  # 16 calls: just past lower_order_final's < 15
    ("dpmpp_2m", 3, {"use_karras_sigmas": True, "beta_schedule": "squaredcos_cap_v2"}),  # int64 timesteps
    # A1111's "Exponential" schedule type (its default for DPM++ 2M SDE): unrounded timesteps, truncated
    ("dpmpp_2m", 10, {"use_exponential_sigmas": True}), ("dpmpp_2m", 25, {"use_exponential_sigmas": True}),
    ("euler", 10, {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing",
                   "prediction_type": "v_prediction"}),
]


def case_id(case):
    name, steps, options = case
    return "-".join([name, str(steps)] + [f"{k}={v}" for k, v in options.items()])


@pytest.mark.parametrize("case", DETERMINISTIC_CASES, ids=case_id)
def test_deterministic_scheduler_matches_diffusers(case, noise_nchw):
    name, steps, options = case
    reference = reference_scheduler(name, steps, **options)
    scheduler = S.make_scheduler(name, SD15_SCHEDULER_CONFIG, steps, **options)
    zero_snr = options.get("rescale_betas_zero_snr", False)
    if zero_snr:
        # The zero-SNR rescale takes ratios of nearly equal square roots, which turns torch's 1-ulp sqrt
        # differences (its AVX-512 float32 sqrt is not correctly rounded) into ~4e-6 relative differences
        # of alphas_cumprod.  Check the schedule at that level, then step both from the same table.
        np.testing.assert_allclose(scheduler.alphas_cumprod, reference.alphas_cumprod.numpy(), rtol=2e-5)
        reference.alphas_cumprod = torch.from_numpy(np.array(scheduler.alphas_cumprod))
        reference.set_timesteps(steps)

    reference_timesteps = reference.timesteps.numpy().astype(np.float64)
    assert scheduler.num_model_calls == len(reference_timesteps)
    if np.all(reference_timesteps == np.round(reference_timesteps)):
        np.testing.assert_array_equal(scheduler.timesteps, reference_timesteps)
    else:  # fractional timesteps (Karras sigmas): float32 rounding of the log-sigma interpolation
        np.testing.assert_allclose(scheduler.timesteps, reference_timesteps, rtol=1e-6)
    np.testing.assert_allclose(scheduler.init_noise_sigma, float(reference.init_noise_sigma), rtol=1e-6)
    if hasattr(scheduler, "sigmas"):
        np.testing.assert_allclose(scheduler.sigmas, reference.sigmas.numpy(), rtol=1e-6, atol=0)

    expected = run_diffusers(reference, noise_nchw)
    ours = np.asarray(run_sdjax(scheduler, jnp.asarray(to_nhwc(noise_nchw))))
    # At zero SNR sigma_max is 4096: the first step cancels latents of ~1e4 down to ~50.
    initial = noise_nchw * scheduler.init_noise_sigma if zero_snr else None
    errors = relative_step_errors(ours, expected, initial)
    assert errors.max() <= TOL, f"worst step {errors.argmax()}: relative error {errors.max():.2e}"


def test_pndm_sd15_timesteps():
    scheduler = S.make_scheduler("pndm", SD15_SCHEDULER_CONFIG, 50)
    assert scheduler.num_model_calls == 51
    expected = [981, 961, 961] + list(range(941, 0, -20))
    np.testing.assert_array_equal(scheduler.timesteps, expected)
    assert scheduler.init_noise_sigma == 1.0


def test_scheduler_closed_over_under_jit(noise_nchw):
    """A scheduler captured as a constant (host arrays) works with a traced loop index too."""
    scheduler = S.make_scheduler("lms", SD15_SCHEDULER_CONFIG, 10)
    latents = jnp.asarray(to_nhwc(noise_nchw)) * scheduler.init_noise_sigma

    @jax.jit
    def loop(latents):
        def body(carry, i):
            latents, state = carry
            output = fake_model_jax(scheduler.scale_model_input(state, latents, i), scheduler.timestep(i))
            return scheduler.step(state, output, i, latents), None
        (latents, _), _ = jax.lax.scan(body, (latents, scheduler.init_state(latents)),
                                       jnp.arange(scheduler.num_model_calls))
        return latents

    expected = run_diffusers(reference_scheduler("lms", 10), noise_nchw)[-1]
    assert relative_step_errors(np.asarray(loop(latents))[None], expected[None]).max() <= TOL


def test_scheduler_is_a_pytree_with_static_settings():
    scheduler = S.make_scheduler("dpmpp_2m", SD15_SCHEDULER_CONFIG, 10)
    leaves, treedef = jax.tree_util.tree_flatten(scheduler)
    assert all(isinstance(leaf, np.ndarray) for leaf in leaves)
    rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
    assert rebuilt.num_model_calls == 10 and rebuilt.solver_type == "midpoint"
    assert scheduler.timesteps.dtype == np.float32 and scheduler.timesteps.shape == (10,)
    state = scheduler.init_state(jnp.zeros((2, 8, 8, 4)))
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(state))


# ----------------------------------------------------------------------------------------------------------
# Stochastic schedulers.
# ----------------------------------------------------------------------------------------------------------

DIFFUSERS_DEFAULTS = {"beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear", "steps_offset": 0,
                      "timestep_spacing": "linspace"}
ZERO_SNR_V = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "prediction_type": "v_prediction"}
STOCHASTIC_CASES = [("euler_a", 10, {}), ("euler_a", 7, {"timestep_spacing": "trailing"}),
                    ("ddpm", 10, {}), ("ddpm", 10, {"variance_type": "fixed_large", "steps_offset": 0}),
                    ("ddim", 10, {"eta": 1.0}), ("ddim", 10, {"eta": 0.5}),
                    # sigma_down and DDIM's direction term are square roots of differences that
                    # round to just below 0 here: NaN under jit unless clamped
                    ("euler_a", 2, DIFFUSERS_DEFAULTS), ("ddim", 3, {"eta": 1.0, **ZERO_SNR_V}),
                    ("dpmpp_2m_sde", 10, {}), ("dpmpp_2m_sde", 20, {"use_karras_sigmas": True}),
                    ("dpmpp_2m_sde", 16, {"use_exponential_sigmas": True, "solver_type": "heun"}),
                    ("dpmpp_2m_sde", 10, {"prediction_type": "v_prediction"})]


@pytest.mark.parametrize("case", STOCHASTIC_CASES, ids=case_id)
def test_stochastic_scheduler_matches_diffusers_given_same_noise(case, noise_nchw, monkeypatch):
    """Feed diffusers exactly the noise sdjax draws: the trajectories must then agree like deterministic ones."""
    name, steps, options = case
    scheduler = S.make_scheduler(name, SD15_SCHEDULER_CONFIG, steps, **options)
    assert scheduler.stochastic
    keys = jax.random.split(jax.random.key(7), noise_nchw.shape[0])  # one key per image
    ours = np.asarray(run_sdjax(scheduler, jnp.asarray(to_nhwc(noise_nchw)), keys))

    # The noise sdjax used at step i (its shape only is taken from `like`).
    like = jnp.zeros(to_nhwc(noise_nchw).shape, jnp.float32)
    step_noises = [torch.from_numpy(to_nchw(S.step_noise(keys, i, like))) for i in range(scheduler.num_model_calls)]
    reference_options = {k: v for k, v in options.items() if k != "eta"}
    reference = reference_scheduler(name, steps, **reference_options)
    if name == "ddim":
        expected = run_diffusers(reference, noise_nchw,
                                 step_kwargs=lambda i: {"eta": options["eta"], "variance_noise": step_noises[i]})
        if np.isnan(expected).any():
            # At zero terminal SNR with eta=1, diffusers' direction term is the square root of
            # 1 - alpha_prev - std**2, zero in exact arithmetic; torch's float32 rounds it below zero
            # on some CPUs (NaN on an AMD EPYC, 0 on an Intel Xeon). The same code in float64 is the
            # reference there.
            reference.alphas_cumprod = reference.alphas_cumprod.double()
            reference.final_alpha_cumprod = reference.final_alpha_cumprod.double()
            expected = run_diffusers(reference, noise_nchw.astype(np.float64), step_kwargs=lambda i: {
                "eta": options["eta"], "variance_noise": step_noises[i].double()})
            assert np.isfinite(expected).all()
    else:
        pending = list(step_noises)
        module = {"euler_a": "scheduling_euler_ancestral_discrete", "ddpm": "scheduling_ddpm",
                  "dpmpp_2m_sde": "scheduling_dpmsolver_multistep"}[name]
        monkeypatch.setattr(f"diffusers.schedulers.{module}.randn_tensor", lambda *a, **k: pending.pop(0))
        expected = run_diffusers(reference, noise_nchw)
        assert len(pending) == int(name == "ddpm" and reference.timesteps[-1] == 0)  # DDPM draws none at t = 0
    errors = relative_step_errors(ours, expected)
    assert errors.max() <= TOL, f"worst step {errors.argmax()}: relative error {errors.max():.2e}"


IMG2IMG_CASES = [("pndm", 10, 3, {}), ("pndm", 10, 1, {}), ("dpmpp_2m", 10, 4, {}),
                 ("dpmpp_2m", 20, 6, {"use_karras_sigmas": True}), ("lms", 10, 4, {}), ("euler", 10, 4, {}),
                 ("ddim", 10, 4, {})]


@pytest.mark.parametrize("case", IMG2IMG_CASES, ids=lambda c: f"{c[0]}-{c[1]}-from{c[2]}-{c[3]}")
def test_img2img_start_matches_diffusers(case, noise_nchw):
    """denoise(start=k) from latents noised to timesteps[k] follows diffusers' loop entered at k
    (set_begin_index, or timesteps[k:] for PNDM and DDIM, whose counters start there): the
    multistep schedulers begin with their first-order / warm-up steps there (before, DPM-Solver and
    PNDM combined outputs they never saw). The scheduler is traced (passed into jit)."""
    from sdjax.sampling import denoise
    name, steps, start, options = case
    sched = S.make_scheduler(name, SD15_SCHEDULER_CONFIG, steps, **options)
    x0 = 0.5 * np.tanh(to_nhwc(noise_nchw))
    noise = np.asarray(jax.random.normal(jax.random.key(3), x0.shape))
    x_start = sched.add_noise_at(x0, noise, start)

    reference = reference_scheduler(name, steps, **options)
    if hasattr(reference, "set_begin_index"):
        reference.set_begin_index(start)
    latents = torch.from_numpy(to_nchw(x_start))
    trajectory = []
    for t in reference.timesteps[start:]:
        model_input = reference.scale_model_input(latents, t)
        latents = reference.step(fake_model_torch(model_input, t), t, latents).prev_sample
        trajectory.append(to_nhwc(latents.numpy()))
    ours, predictions = jax.jit(lambda sched, x: denoise(lambda x, t, text: fake_model_jax(x, t), sched, x,
                                                         jnp.zeros((1, 1, 1)), None, 1.0, return_predictions=True,
                                                         start=start))(sched, x_start)
    assert predictions.shape[0] == sched.num_model_calls - start == len(trajectory)
    errors = relative_step_errors(np.asarray(ours)[None], np.stack(trajectory)[-1:])
    assert errors.max() <= TOL, f"relative error {errors.max():.2e}"
    # every step, through a hand-written loop over starting_at(start) outside jit
    started = sched.starting_at(start)
    x, state = jnp.asarray(x_start), started.init_state(x_start)
    for n, i in enumerate(range(start, sched.num_model_calls)):
        x, state = started.step(state, fake_model_jax(started.scale_model_input(state, x, i), started.timestep(i)),
                                i, x)
        assert relative_step_errors(np.asarray(x)[None], trajectory[n][None]).max() <= TOL, (n, i)


@pytest.mark.parametrize("name", ["pndm", "ddim", "euler", "dpmpp_2m", "lms"])
def test_img2img_start_and_noise_follow_diffusers_img2img_pipeline(name):
    """img2img_start(steps, strength) is the index diffusers' StableDiffusionImg2ImgPipeline starts
    at (its get_timesteps, run on the reference scheduler), and add_noise_at(k) noises as that
    pipeline does (by index: Karras sigmas repeat timesteps, where a lookup by value picks the
    wrong one)."""
    from types import SimpleNamespace
    from diffusers import StableDiffusionImg2ImgPipeline
    from sdjax.sampling import img2img_start
    for steps, strength in ((50, 0.8), (50, 0.75), (25, 0.3), (10, 1.0), (7, 0.5), (50, 0.02)):
        reference = reference_scheduler(name, steps)
        remaining, _ = StableDiffusionImg2ImgPipeline.get_timesteps(SimpleNamespace(scheduler=reference), steps,
                                                                   strength, "cpu")
        assert img2img_start(steps, strength) == len(reference.timesteps) - len(remaining), (steps, strength)
    with pytest.raises(ValueError, match="strength 0.01 with 50 steps denoises no step"):
        img2img_start(50, 0.01)
    assert img2img_start(50, np.float32(0.75)) == img2img_start(50, 0.75) == 13   # numpy scalars too
    from sdjax.sampling import DEFAULT_STRENGTH
    assert img2img_start(50) == img2img_start(50, None) == img2img_start(50, DEFAULT_STRENGTH)   # the default
    options = {"use_karras_sigmas": True} if name in ("euler", "dpmpp_2m", "lms") else {}
    steps = 50
    sched = S.make_scheduler(name, SD15_SCHEDULER_CONFIG, steps, **options)
    x0 = np.full((1, 2, 2, 4), 0.5, np.float32)
    noise = np.ones_like(x0)
    for k in (0, 10, sched.num_model_calls - 3, sched.num_model_calls - 2):
        reference = reference_scheduler(name, steps, **options)
        if hasattr(reference, "set_begin_index"):
            reference.set_begin_index(k)
        want = reference.add_noise(torch.from_numpy(to_nchw(x0)), torch.from_numpy(to_nchw(noise)),
                                   reference.timesteps[k:k + 1]).numpy()
        np.testing.assert_allclose(to_nchw(sched.add_noise_at(x0, noise, k)), want, rtol=1e-6, atol=1e-6,
                                   err_msg=str(k))


def test_starting_at_checks_the_index():
    sched = S.make_scheduler("pndm", SD15_SCHEDULER_CONFIG, 10)
    assert sched.starting_at(0) is sched
    for bad in (-1, 11, 2.0, True):
        with pytest.raises(ValueError, match=r"start .* must be an integer in 0\.\.10"):
            sched.starting_at(bad)
    prk = S.make_scheduler("pndm", {**SD15_SCHEDULER_CONFIG, "skip_prk_steps": False}, 10)
    with pytest.raises(NotImplementedError, match="Runge-Kutta steps .* cannot start midway"):
        prk.starting_at(3)


def test_step_noise_is_per_image_and_per_step():
    keys = jax.random.split(jax.random.key(0), 4)
    like = jnp.zeros((4, 2, 2, 3))
    batch = S.step_noise(keys, 3, like)
    alone = S.step_noise(keys[2:3], 3, like[:1])
    np.testing.assert_array_equal(batch[2:3], alone)  # an image's noise does not depend on its batch
    assert not np.allclose(batch, S.step_noise(keys, 4, like))  # fresh noise at every step
    assert not np.allclose(batch[0], batch[1])
    raw_keys = jax.random.key_data(keys)  # raw uint32 [B, 2] keys work the same way
    np.testing.assert_array_equal(S.step_noise(raw_keys, 3, like), batch)
    assert S.step_noise(jax.random.key(1), 0, like).shape == like.shape  # one key for the whole batch
    with pytest.raises(ValueError, match="stochastic"):
        S.step_noise(None, 0, like)


NUM_SEEDS = 20000  # images of one scalar each


def gaussian_data_model(alphas_cumprod, library):
    """The exact noise predictor for data x0 ~ N(0, 1): eps = sqrt(1 - abar_t) * x_t on the VP latents
    (the model input).  Keeps every sampler's latents of order 1."""
    if library == "torch":
        table = torch.from_numpy(alphas_cumprod)
        return lambda x, t: (1 - table[int(t)]) ** 0.5 * x
    table = jnp.asarray(alphas_cumprod)
    return lambda x, t: jnp.sqrt(1 - table[jnp.round(t).astype(jnp.int32)]) * x


def per_step_moments(trajectory):
    flat = np.asarray(trajectory, np.float64).reshape(trajectory.shape[0], -1)
    return flat.mean(axis=1), flat.std(axis=1)


def moments_agree(ours, reference, num_samples, z=5.0):
    """True when per-step means and standard deviations agree within z standard errors."""
    mean_a, std_a = ours
    mean_b, std_b = reference
    std = np.maximum(std_a, std_b)
    mean_ok = np.abs(mean_a - mean_b) <= z * std * np.sqrt(2.0 / num_samples)
    std_ok = np.abs(std_a - std_b) <= z * std * np.sqrt(1.0 / num_samples)  # se(std) ~ std / sqrt(2n)
    return bool(np.all(mean_ok) and np.all(std_ok))


@pytest.fixture(scope="module")
def scalar_noise():
    return np.random.default_rng(99).standard_normal((NUM_SEEDS, 1, 1, 1)).astype(np.float32)


STATISTICAL_CASES = [("euler_a", 30, {}), ("ddpm", 30, {}), ("ddim", 20, {"eta": 1.0})]


@pytest.mark.parametrize("case", STATISTICAL_CASES, ids=case_id)
def test_stochastic_scheduler_statistics_match_diffusers(case, scalar_noise, monkeypatch):
    """Per-step mean/std over many seeds: sdjax (JAX PRNG, one key per image) vs diffusers (torch noise).

    The same check must reject noise 10% too strong or too weak and noise repeated across steps, so a
    pass is evidence and not a blunt tolerance."""
    name, steps, options = case
    reference_options = {k: v for k, v in options.items() if k != "eta"}
    reference = reference_scheduler(name, steps, **reference_options)
    generator = torch.Generator().manual_seed(0)
    step_kwargs = {"generator": generator, **({"eta": options["eta"]} if "eta" in options else {})}
    torch_model = gaussian_data_model(reference.alphas_cumprod.numpy(), "torch")
    expected = run_diffusers(reference, scalar_noise, model=torch_model, step_kwargs=lambda i: step_kwargs)

    scheduler = S.make_scheduler(name, SD15_SCHEDULER_CONFIG, steps, **options)
    jax_model = gaussian_data_model(np.asarray(scheduler.alphas_cumprod), "jax")
    keys = jax.random.split(jax.random.key(2024), NUM_SEEDS)
    latents = jnp.asarray(to_nhwc(scalar_noise))

    def sample(noise_fn):
        monkeypatch.setattr(S, "step_noise", noise_fn)
        fresh_jit = jax.jit(lambda *args: sdjax_loop(*args, model=jax_model))  # new function: retraced
        return np.asarray(fresh_jit(scheduler, latents, keys))

    genuine_noise = S.step_noise
    reference_moments = per_step_moments(expected)
    ours = sample(genuine_noise)
    assert np.all(np.isfinite(ours))
    assert moments_agree(per_step_moments(ours), reference_moments, NUM_SEEDS), (
        per_step_moments(ours), reference_moments)
    # With this model the data is N(0, 1), so the samples end with roughly unit variance.
    assert abs(per_step_moments(ours)[1][-1] - 1.0) < 0.2

    broken = {
        "noise x1.1": lambda key, i, like: 1.1 * genuine_noise(key, i, like),
        "noise x0.9": lambda key, i, like: 0.9 * genuine_noise(key, i, like),
        "same noise every step": lambda key, i, like: genuine_noise(key, 0, like),
    }
    for label, noise_fn in broken.items():
        assert not moments_agree(per_step_moments(sample(noise_fn)), reference_moments, NUM_SEEDS), label


# ----------------------------------------------------------------------------------------------------------
# Forward process, configuration, errors.
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "linear", "squaredcos_cap_v2"])
def test_noise_schedule_matches_diffusers_bitwise(beta_schedule):
    config = {**SD15_SCHEDULER_CONFIG, "beta_schedule": beta_schedule}
    expected = diffusers.DDPMScheduler.from_config(config).alphas_cumprod.numpy()
    ours = S.make_noise_schedule(config)
    assert ours.dtype == np.float32 and ours.shape == (1000,)
    np.testing.assert_array_equal(ours, expected)


def test_add_noise_and_velocity_match_diffusers():
    rng = np.random.default_rng(5)
    x0 = rng.standard_normal((6, 4, 8, 8)).astype(np.float32)
    noise = rng.standard_normal((6, 4, 8, 8)).astype(np.float32)
    timesteps = np.array([0, 1, 250, 500, 981, 999])
    reference = diffusers.DDPMScheduler.from_config(SD15_SCHEDULER_CONFIG)
    alphas_cumprod = S.make_noise_schedule(SD15_SCHEDULER_CONFIG)
    args = (torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(timesteps))

    noisy = S.add_noise(alphas_cumprod, to_nhwc(x0), to_nhwc(noise), jnp.asarray(timesteps))
    np.testing.assert_allclose(noisy, to_nhwc(reference.add_noise(*args).numpy()), atol=1e-6, rtol=0)
    velocity = S.get_velocity(alphas_cumprod, to_nhwc(x0), to_nhwc(noise), jnp.asarray(timesteps))
    np.testing.assert_allclose(velocity, to_nhwc(reference.get_velocity(*args).numpy()), atol=1e-6, rtol=0)
    same_t = S.add_noise(alphas_cumprod, to_nhwc(x0), to_nhwc(noise), 500)  # one timestep for all
    assert same_t.shape == noisy.shape
    np.testing.assert_allclose(same_t[3], noisy[3], atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", S.SCHEDULERS)
def test_scheduler_add_noise_matches_diffusers(name):
    """img2img noising with timesteps taken from the inference schedule."""
    options = {"use_karras_sigmas": True} if name == "dpmpp_2m" else {}
    steps = 50
    reference = reference_scheduler(name, steps, **options)
    scheduler = S.make_scheduler(name, SD15_SCHEDULER_CONFIG, steps, **options)
    # The ends, a middle step, and every step whose timestep comes twice (PNDM's second one; dpmpp_2m
    # Karras' repeated t=1): diffusers then takes the second occurrence's sigma.
    t_all = reference.timesteps.numpy()
    repeated = [i for i, t in enumerate(t_all) if (t_all == t).sum() > 1]
    assert name not in ("pndm", "dpmpp_2m") or repeated
    picks = np.array([0, 7, scheduler.num_model_calls - 1, *repeated])
    timesteps = reference.timesteps[torch.from_numpy(picks)]
    rng = np.random.default_rng(11)
    x0 = rng.standard_normal((len(picks), 4, 4, 4)).astype(np.float32)
    noise = rng.standard_normal((len(picks), 4, 4, 4)).astype(np.float32)
    expected = reference.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), timesteps).numpy()
    ours = scheduler.add_noise(to_nhwc(x0), to_nhwc(noise), jnp.asarray(scheduler.timesteps[picks]))
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(np.asarray(ours) / scale, to_nhwc(expected) / scale, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["euler", "lms", "dpmpp_2m"])
def test_sigma_add_noise_refuses_timesteps_outside_the_schedule(name):
    """diffusers fails on a timestep its sigma schedulers do not hold; sdjax used to take the last sigma."""
    scheduler = S.make_scheduler(name, SD15_SCHEDULER_CONFIG, 10)
    x0 = jnp.zeros((2, 4, 4, 4))
    inside = jnp.asarray(scheduler.timesteps[:2])
    scheduler.add_noise(x0, x0, inside)  # timesteps from the schedule are fine
    with pytest.raises(ValueError, match=r"\[500\.0\] are not in this scheduler's inference schedule"):
        scheduler.add_noise(x0, x0, jnp.asarray([float(inside[0]), 500.0]))
    # Under jit the timesteps are traced and cannot be checked; the documented fallback is the last sigma.
    traced = jax.jit(scheduler.add_noise)(x0, jnp.ones_like(x0), jnp.asarray([500.0, 500.0]))
    assert np.isfinite(np.asarray(traced)).all()


def test_add_noise_refuses_timesteps_outside_the_training_schedule():
    """JAX's gather clamps an index past the end and wraps a negative one, so t=1000, 5000 and -1
    all used to give abar[999] silently (diffusers raises IndexError): concrete timesteps outside
    0..999, or not whole, are errors for add_noise, get_velocity and the alpha schedulers' add_noise."""
    abar = S.make_noise_schedule(SD15_SCHEDULER_CONFIG)
    x0 = jnp.zeros((1, 4, 4, 4))
    ddim = S.make_scheduler("ddim", SD15_SCHEDULER_CONFIG, 10)
    for fn in (lambda t: S.add_noise(abar, x0, x0, t), lambda t: S.get_velocity(abar, x0, x0, t),
               lambda t: ddim.add_noise(x0, x0, t)):
        fn(jnp.asarray([0, 999]))
        fn(jnp.asarray(ddim.timesteps[:1]))   # float32 timesteps that are whole numbers
        for t in (1000, 5000, -1, 2.5):
            with pytest.raises(ValueError, match=re.escape(f"timesteps [{float(t)}] are not integer training "
                                                           "timesteps in 0..999")):
                fn(jnp.asarray([t]))
    assert np.isfinite(np.asarray(jax.jit(lambda t: S.add_noise(abar, x0, x0, t))(jnp.asarray([1000])))).all()


@pytest.mark.parametrize("name", S.SCHEDULERS)
def test_a_concrete_loop_index_outside_the_schedule_is_an_error(name):
    """JAX's indexing clamps: without the check, i = num_model_calls or a timestep (801) passed as the
    index silently gave the last step's update (or NaN for euler / dpmpp_2m)."""
    scheduler = S.make_scheduler(name, SD15_SCHEDULER_CONFIG, 5)
    n = scheduler.num_model_calls
    x = jnp.ones((1, 4, 4, 4))
    state, keys = scheduler.init_state(x), jax.random.key_data(jax.random.split(jax.random.key(0), 1))
    scheduler.step(state, x, n - 1, scheduler.scale_model_input(state, x, n - 1), keys)   # the last one is fine
    calls = {"step": lambda i: scheduler.step(state, x, i, x, keys), "timestep": scheduler.timestep,
             "alpha_bar": scheduler.alpha_bar, "scale_model_input": lambda i: scheduler.scale_model_input(state, x, i)}
    for what, call in calls.items():
        for bad in (n, -1, int(scheduler.timestep(0))):
            with pytest.raises(IndexError, match=rf"loop index {bad} is outside 0..{n - 1} .*not the timestep"):
                call(bad)
        with pytest.raises(TypeError, match="must be an integer"):
            call(scheduler.timestep(0))      # a float timestep
    # Traced indices are not checked (and not needed: the sampler's scan gives 0..n-1).
    assert jax.jit(scheduler.timestep)(jnp.int32(0)) == scheduler.timestep(0)


def test_scheduler_repr_is_short():
    """Every scheduler prints its kind and step count, not its tables (it printed ~20,000 characters)."""
    for name in S.SCHEDULERS:
        text = repr(S.make_scheduler(name, SD15_SCHEDULER_CONFIG, 50))
        assert len(text) < 200 and "num_model_calls=" in text and "array" not in text, (name, text)


def test_config_resolution_follows_diffusers():
    # Each class keeps its own defaults for keys the config lacks, and ignores keys it does not take.
    euler = S.resolve_scheduler_config("euler", {"beta_schedule": "scaled_linear", "skip_prk_steps": True})
    assert euler["timestep_spacing"] == "linspace" and "skip_prk_steps" not in euler
    ddim = S.resolve_scheduler_config("ddim", {"_use_default_values": ["clip_sample"], "clip_sample": False})
    assert ddim["clip_sample"] is True  # listed as defaulted: the DDIM default wins, as in diffusers
    assert S.resolve_scheduler_config("ddim", SD15_SCHEDULER_CONFIG, eta=0.5)["eta"] == 0.5
    assert not S.make_scheduler("ddim", SD15_SCHEDULER_CONFIG, 10).stochastic
    assert S.make_scheduler("ddim", SD15_SCHEDULER_CONFIG, 10, eta=0.5).stochastic


def assert_same_schedule(scheduler, reference, noise_nchw):
    """Same timesteps as the diffusers scheduler and, for a deterministic one, the same trajectory."""
    np.testing.assert_array_equal(scheduler.timesteps, reference.timesteps.numpy().astype(np.float64))
    if not scheduler.stochastic:
        errors = relative_step_errors(np.asarray(run_sdjax(scheduler, jnp.asarray(to_nhwc(noise_nchw)))),
                                      run_diffusers(reference, noise_nchw))
        assert errors.max() <= TOL


OUTDATED_CONFIGS = {   # scheduler configs that diffusers' StableDiffusionPipeline corrects (or not)
    "ddim-offset0-clip": {**SD15_SCHEDULER_CONFIG, "_class_name": "DDIMScheduler", "steps_offset": 0,
                          "clip_sample": True},
    "ddim-without-offset-clip": {k: v for k, v in {**SD15_SCHEDULER_CONFIG, "_class_name": "DDIMScheduler"}.items()
                                 if k not in ("steps_offset", "clip_sample")},
    "pndm-without-offset": {k: v for k, v in SD15_SCHEDULER_CONFIG.items() if k != "steps_offset"},
    "sd15": SD15_SCHEDULER_CONFIG,
}


@pytest.mark.parametrize("config_name", OUTDATED_CONFIGS)
@pytest.mark.parametrize("name", ["pndm", "ddim", "euler", "dpmpp_2m", "ddpm"])
def test_outdated_scheduler_configs_are_corrected_as_diffusers_pipeline_does(name, config_name, noise_nchw):
    """StableDiffusionPipeline rewrites steps_offset != 1 to 1 and clip_sample true to false: a value
    the file holds for every scheduler swapped in with ``from_config(pipe.scheduler.config)``, a
    value it leaves out for the file's own class only. sdjax's schedulers match the pipeline's: same
    timesteps and settings, and (deterministic ones) the same trajectory."""
    import warnings
    from diffusers import StableDiffusionPipeline
    config = OUTDATED_CONFIGS[config_name]
    own = next(k for k, cls in DIFFUSERS_CLASSES.items() if cls.__name__ == config["_class_name"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # diffusers' deprecation messages
        pipe = StableDiffusionPipeline(vae=None, text_encoder=None, tokenizer=None, unet=None,
                                       scheduler=DIFFUSERS_CLASSES[own].from_config(config), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
        reference = (pipe.scheduler if name == own else DIFFUSERS_CLASSES[name].from_config(pipe.scheduler.config))
    reference.set_timesteps(10)
    fixed, changes = S.pipeline_scheduler_config(name, config)
    # held outdated values: corrected for every class; left-out ones: for the file's own class only
    assert bool(changes) == (config_name == "ddim-offset0-clip" or (config_name != "sd15" and name == own))
    settings = S.resolve_scheduler_config(name, fixed)
    for key in ("steps_offset", "clip_sample"):
        if key in settings:   # the settings this class takes
            assert settings[key] == reference.config[key], key
    scheduler = S.make_scheduler(name, fixed, 10)
    assert_same_schedule(scheduler, reference, noise_nchw)


@pytest.mark.parametrize("name,config_changes", [
    ("ddpm", {"_class_name": "DPMSolverMultistepScheduler"}),             # variance_type None: fixed_small's path
    ("dpmpp_2m", {"_class_name": "DDPMScheduler", "variance_type": "fixed_small"}),   # ignored by DPM-Solver
    ("dpmpp_2m", {"_class_name": "UniPCMultistepScheduler", "solver_type": "bh2"}),   # diffusers: midpoint
    ("dpmpp_2m", {"algorithm_type": "deis", "solver_type": "logrho", "final_sigmas_type": "sigma_min"}),  # ++
    # Euler's Karras ends, which DPM-Solver reads from the config too (LMS does not)
    ("dpmpp_2m", {"_class_name": "EulerDiscreteScheduler", "sigma_min": 0.1, "sigma_max": 10.0,
                  "use_karras_sigmas": True}),
])
def test_settings_of_other_schedulers_configs_are_taken_as_diffusers_takes_them(name, config_changes, noise_nchw):
    """A model whose scheduler_config.json was written for another scheduler still samples with
    every sdjax scheduler diffusers builds from it."""
    config = {**SD15_SCHEDULER_CONFIG, "variance_type": None, **config_changes}
    reference = DIFFUSERS_CLASSES[name].from_config(config)
    reference.set_timesteps(10)
    scheduler = S.make_scheduler(name, config, 10)
    assert_same_schedule(scheduler, reference, noise_nchw)
    if config.get("algorithm_type") == "deis":   # diffusers refuses it with the default final_sigmas_type
        config = {**config, "final_sigmas_type": "zero"}
        with pytest.raises(ValueError, match="final_sigmas_type"):
            DIFFUSERS_CLASSES[name].from_config(config)
        with pytest.raises(ValueError, match="needs final_sigmas_type='sigma_min'"):
            S.make_scheduler(name, config, 10)


def test_unknown_names_and_options_are_errors():
    with pytest.raises(ValueError) as excinfo:
        S.make_scheduler("bogus", SD15_SCHEDULER_CONFIG, 10)
    for name in S.SCHEDULERS:
        assert name in str(excinfo.value)
    assert S.SCHEDULERS == ("pndm", "ddim", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_sde", "lms", "ddpm")
    with pytest.raises(TypeError, match="eta"):
        S.make_scheduler("euler", SD15_SCHEDULER_CONFIG, 10, eta=1.0)
    # algorithm_type sde-dpmsolver++ (an option, or a model config written for diffusers' SDE sampler): named
    for config, option in (({**SD15_SCHEDULER_CONFIG, "algorithm_type": "sde-dpmsolver++"}, {}),
                           (SD15_SCHEDULER_CONFIG, {"algorithm_type": "sde-dpmsolver++"})):
        with pytest.raises(NotImplementedError, match="algorithm_type='sde-dpmsolver\\+\\+' is the dpmpp_2m_sde"):
            S.make_scheduler("dpmpp_2m", config, 10, **option)
    # each refusal names the setting, as the user wrote it
    for name, option, expected in (("dpmpp_2m", {"variance_type": "learned_range"}, "variance_type='learned_range'"),
                                   ("dpmpp_2m", {"thresholding": True}, "thresholding=True"),
                                   ("ddim", {"thresholding": True}, "thresholding=True"),
                                   ("ddpm", {"variance_type": "learned"}, "variance_type 'learned'")):
        with pytest.raises(NotImplementedError, match=re.escape(expected)):
            S.make_scheduler(name, SD15_SCHEDULER_CONFIG, 10, **option)
    for steps in (0, 2.7, True):
        with pytest.raises(ValueError, match="num_inference_steps must be an integer >= 1"):
            S.make_scheduler("euler", SD15_SCHEDULER_CONFIG, steps)
    with pytest.raises(ValueError, match=r"trained_betas has shape \(500,\); expected one beta per training "
                                         r"timestep \(1000, num_train_timesteps\)"):
        S.make_scheduler("ddim", {**SD15_SCHEDULER_CONFIG, "trained_betas": [1e-3] * 500}, 10)
    # the config file's path, or a diffusers scheduler, in place of the config: an AttributeError about .get
    for config, got in (("model/scheduler/scheduler_config.json", "'model/scheduler/scheduler_config.json'"),
                        (diffusers.EulerDiscreteScheduler(), "EulerDiscreteScheduler"), (None, "NoneType")):
        for make in (lambda: S.make_scheduler("euler", config, 10), lambda: S.make_noise_schedule(config),
                     lambda: S.pipeline_scheduler_config("euler", config)):
            with pytest.raises(TypeError, match=r"config must be a scheduler config as a dict \(json.loads of a "
                                                rf"pipeline's .*got {got}$"):
                make()


@pytest.mark.parametrize("name,option,value,message", [
    ("dpmpp_2m", "lambda_min_clipped", "-inf", "expected a number"),   # compared as text: cut the schedule short
    ("dpmpp_2m", "use_karras_sigmas", "tru", "expected true or false"),   # any word is a true flag
    ("euler", "use_karras_sigmas", 2, "expected true or false"),   # 0 and 1 are taken
    ("ddim", "clip_sample_range", "2", "expected a number"),
])
def test_settings_of_the_wrong_kind_are_named(name, option, value, message):
    """diffusers fails on these somewhere inside (a TypeError), or runs with a wrong schedule."""
    with pytest.raises(ValueError, match=re.escape(f"{name} setting {option}={value!r}: {message}")):
        S.make_scheduler(name, SD15_SCHEDULER_CONFIG, 10, **{option: value})
    with pytest.raises(ValueError, match=re.escape(f"{option}={value!r}")):   # the same from the config
        S.make_scheduler(name, {**SD15_SCHEDULER_CONFIG, option: value}, 10)


def test_a_trailing_schedule_that_rounds_to_timestep_minus_one_is_refused():
    """np.arange(1000, 0, -1000 / 61) has a 62nd element just above 0: diffusers' last step is at
    timestep -1, where DDIM reads the noise level of timestep 999 (the sigma schedulers clamp it to
    timestep 0's, and run as diffusers does: test_deterministic_scheduler_matches_diffusers)."""
    reference = reference_scheduler("ddim", 61, timestep_spacing="trailing")
    assert int(reference.timesteps[-1]) == -1
    with pytest.raises(ValueError, match=r"ddim with 61 steps \(timestep_spacing='trailing'\) reaches timestep -1, "
                                         r"before the first training timestep 0: use 60 steps"):
        S.make_scheduler("ddim", SD15_SCHEDULER_CONFIG, 61, timestep_spacing="trailing")
    assert S.make_scheduler("ddim", SD15_SCHEDULER_CONFIG, 60, timestep_spacing="trailing").timesteps[-1] >= 0


@pytest.mark.parametrize("name,steps,message", [
    ("ddim", 1001, "more than the model's 1000 training timesteps"),
    ("ddim", 1000, "reaches timestep 1000, past the last training timestep 999"),  # SD's steps_offset=1
    ("pndm", 1000, "reaches timestep 1000"),
    ("dpmpp_2m", 1000, "every step the same timestep 1"),  # leading: 1000 // 1001 = 0 apart
])
def test_too_many_steps_are_errors(name, steps, message):
    """diffusers fails on these with an IndexError at some step, or clamps or returns NaN."""
    with pytest.raises(ValueError, match=message):
        S.make_scheduler(name, SD15_SCHEDULER_CONFIG, steps)
    assert S.make_scheduler(name, SD15_SCHEDULER_CONFIG, 999 if name != "dpmpp_2m" else 500).num_model_calls


def _diffusers_is_finite(name: str, steps: int, step_kw: dict, **options) -> bool:
    """Whether diffusers' scheduler, stepped with a smooth stand-in model, keeps the latents finite."""
    reference = reference_scheduler(name, steps, **options)
    sample = torch.ones(1, 4, 2, 2) * reference.init_noise_sigma
    with np.errstate(all="ignore"):
        for t in reference.timesteps:
            eps = 0.3 * torch.tanh(reference.scale_model_input(sample, t))
            sample = reference.step(eps, t, sample, **step_kw).prev_sample
            if not torch.isfinite(sample).all():
                return False
    return True


@pytest.mark.parametrize("name,steps,options,message", [
    # linspace over 1000 timesteps in 1000 steps gives t=500 twice: a step of zero log-SNR change
    ("dpmpp_2m", 1000, {"timestep_spacing": "linspace"}, "repeats a noise level"),
    ("ddim", 10, {"eta": 1.5}, "ddim eta must be a number in [0, 1]"),
    ("ddim", 10, {"timestep_spacing": "trailing", "rescale_betas_zero_snr": True},
     "zero-SNR schedules are for v_prediction models"),
    ("ddpm", 10, {"timestep_spacing": "trailing", "rescale_betas_zero_snr": True},
     "zero-SNR schedules are for v_prediction models"),
])
def test_schedules_that_diffusers_runs_into_nan_are_errors(name, steps, options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        S.make_scheduler(name, SD15_SCHEDULER_CONFIG, steps, **options)
    step_kw = {"eta": options.pop("eta")} if "eta" in options else {}
    assert not _diffusers_is_finite(name, steps, step_kw, **options)


def test_schedules_next_to_the_refused_ones_still_run():
    """The same settings one notch inside the limits are accepted and agree with diffusers."""
    assert S.make_scheduler("dpmpp_2m", SD15_SCHEDULER_CONFIG, 999, timestep_spacing="linspace").num_model_calls
    for eta in (0, 1.0):
        assert S.make_scheduler("ddim", SD15_SCHEDULER_CONFIG, 10, eta=eta).eta == eta
    zero_snr = dict(timestep_spacing="trailing", rescale_betas_zero_snr=True, prediction_type="v_prediction")
    assert S.make_scheduler("ddim", SD15_SCHEDULER_CONFIG, 10, **zero_snr).num_model_calls == 10
    assert _diffusers_is_finite("ddim", 10, {}, **zero_snr)
    with pytest.raises(ValueError, match="steps_offset must be an integer, got 1.5"):
        S.make_scheduler("ddim", {**SD15_SCHEDULER_CONFIG, "steps_offset": 1.5}, 10)
    with pytest.raises(Exception):   # diffusers: numpy's UFuncTypeError adding 1.5 to int64 timesteps
        reference_scheduler("ddim", 10, steps_offset=1.5)


@pytest.mark.parametrize("name,steps,options", [
    ("ddim", 10, {}), ("ddim", 10, {"prediction_type": "v_prediction"}),
    ("euler", 10, {"timestep_spacing": "leading"}),
    # linspace over 999 in 6 gaps: timesteps 832.5, 666, 499.5, ...
    ("euler", 7, {"timestep_spacing": "linspace"}), ("lms", 7, {"timestep_spacing": "linspace"}),
])
def test_predicted_clean_matches_diffusers_pred_original_sample(name, steps, options, noise_nchw):
    """The intermediate-image view's x_0 estimate is diffusers' own ``pred_original_sample``."""
    from sdjax.sampling import predicted_clean
    reference = reference_scheduler(name, steps, **options)
    scheduler = S.make_scheduler(name, SD15_SCHEDULER_CONFIG, steps, **options)
    state = scheduler.init_state(jnp.asarray(to_nhwc(noise_nchw)))
    sample = torch.from_numpy(noise_nchw) * 3.0
    eps = torch.from_numpy(noise_nchw[::-1].copy())
    for i in (0, steps // 2, steps - 1):
        t = reference.timesteps[i]
        if name in ("euler", "lms"):
            reference._step_index = i
            reference.is_scale_input_called = True   # the sample is x_t as is (lms warns when not called)
        expected = reference.step(eps, t, sample).pred_original_sample.numpy()
        model_input = scheduler.scale_model_input(state, jnp.asarray(to_nhwc(sample.numpy())), i)
        ours = predicted_clean(scheduler, model_input, jnp.asarray(to_nhwc(eps.numpy())), i)
        np.testing.assert_allclose(np.asarray(ours), to_nhwc(expected), rtol=1e-5, atol=1e-5)
