"""Pure-JAX diffusion schedulers for Stable Diffusion sampling and training.

Every scheduler is built once on the host from a diffusers ``scheduler_config.json`` dict, the way
``diffusers.<Kind>Scheduler.from_config(config)`` builds it, followed by ``set_timesteps(n)``.  The result
is a frozen dataclass registered as a JAX pytree: its arrays (timesteps, sigmas, alphas_cumprod, per-step
tables) are children and its ints/strings are static aux data, so it can be passed into ``jax.jit`` or
closed over.  Stepping is pure: ``step(state, model_output, i, latents, key) -> (latents, state)`` with a
traced loop index ``i``, fixed-shape state and no Python branching on traced values, which makes the whole
sampling loop one ``lax.scan``::

    sched = make_scheduler("pndm", config, num_inference_steps=50)   # keys_B: one PRNG key per image
    latents = noise * sched.init_noise_sigma
    def body(carry, i):
        latents, state = carry
        model_input = sched.scale_model_input(state, latents, i)
        eps = unet(model_input, sched.timestep(i), text)
        return sched.step(state, eps, i, latents, keys_B), None
    (latents, _), _ = jax.lax.scan(body, (latents, sched.init_state(latents)),
                                   jnp.arange(sched.num_model_calls))

Where diffusers keeps Python-side counters (PNDM's warm-up, DPM-Solver's first-order steps, LMS's growing
order) the per-step behaviour is tabulated on the host and looked up with ``i``.  Scalar coefficients are
computed in float32 with the same formulas diffusers uses, so trajectories agree with the PyTorch
reference to float32 rounding.  Layout is NHWC but nothing here depends on it except the per-image noise,
which treats axis 0 as the batch axis.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "SCHEDULERS",
    "Scheduler",
    "PNDMScheduler",
    "DDIMScheduler",
    "EulerScheduler",
    "EulerAncestralScheduler",
    "DPMSolverMultistepScheduler",
    "LMSScheduler",
    "DDPMScheduler",
    "NoState",
    "PNDMState",
    "DPMSolverState",
    "LMSState",
    "make_scheduler",
    "make_noise_schedule",
    "resolve_scheduler_config",
    "pipeline_scheduler_config",
    "add_noise",
    "get_velocity",
    "step_noise",
]

SCHEDULERS = ("pndm", "ddim", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_sde", "lms", "ddpm")

_DIFFUSERS_CLASS = {
    "pndm": "PNDMScheduler",
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "dpmpp_2m_sde": "DPMSolverMultistepScheduler",   # with algorithm_type="sde-dpmsolver++"
    "lms": "LMSDiscreteScheduler",
    "ddpm": "DDPMScheduler",
}

# ----------------------------------------------------------------------------------------------------------
# Configuration: which keys each diffusers class reads, and its own defaults.
# ----------------------------------------------------------------------------------------------------------

_COMMON_DEFAULTS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "steps_offset": 0,
}

# The constructor arguments of each diffusers class that change the numbers (defaults as in diffusers 0.42).
_CLASS_DEFAULTS = {
    "pndm": {"skip_prk_steps": False, "set_alpha_to_one": False, "timestep_spacing": "leading"},
    "ddim": {
        "clip_sample": True, "set_alpha_to_one": True, "thresholding": False, "clip_sample_range": 1.0,
        "timestep_spacing": "leading", "rescale_betas_zero_snr": False,
    },
    "euler": {
        "interpolation_type": "linear", "use_karras_sigmas": False, "use_exponential_sigmas": False,
        "use_beta_sigmas": False, "sigma_min": None, "sigma_max": None, "timestep_spacing": "linspace",
        "timestep_type": "discrete", "rescale_betas_zero_snr": False, "final_sigmas_type": "zero",
    },
    "euler_a": {"timestep_spacing": "linspace", "rescale_betas_zero_snr": False},
    "dpmpp_2m": {
        "solver_order": 2, "thresholding": False, "algorithm_type": "dpmsolver++", "solver_type": "midpoint",
        "lower_order_final": True, "euler_at_final": False, "use_karras_sigmas": False,
        "use_exponential_sigmas": False, "use_beta_sigmas": False, "use_lu_lambdas": False,
        "use_flow_sigmas": False, "final_sigmas_type": "zero", "lambda_min_clipped": -math.inf,
        "variance_type": None, "timestep_spacing": "linspace", "rescale_betas_zero_snr": False,
        "use_dynamic_shifting": False,
    },
    "lms": {
        "use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
        "timestep_spacing": "linspace",
    },
    "ddpm": {
        "variance_type": "fixed_small", "clip_sample": True, "thresholding": False, "clip_sample_range": 1.0,
        "timestep_spacing": "leading", "rescale_betas_zero_snr": False,
    },
}

# DPM-Solver++(2M) SDE: the same class and settings, its algorithm fixed (not read from a config).
_CLASS_DEFAULTS["dpmpp_2m_sde"] = {k: v for k, v in _CLASS_DEFAULTS["dpmpp_2m"].items() if k != "algorithm_type"}

# Arguments that diffusers passes to ``step`` rather than to the constructor.
_STEP_OPTIONS = {"ddim": {"eta": 0.0}}

# Keys a class does not take but still reads from the config it was built from (diffusers registers
# every config key on the scheduler): DPM-Solver's Karras sigmas end at a config's sigma_min / sigma_max,
# written there for Euler. Options cannot set them (diffusers ignores such keyword arguments).
_CONFIG_ONLY_KEYS = {"dpmpp_2m": {"sigma_min": None, "sigma_max": None},
                     "dpmpp_2m_sde": {"sigma_min": None, "sigma_max": None}}


def option_names(name: str) -> frozenset[str]:
    """The options scheduler ``name`` takes (`resolve_scheduler_config`'s, `make_scheduler`'s)."""
    _check_name(name)
    return frozenset({**_COMMON_DEFAULTS, **_CLASS_DEFAULTS[name], **_STEP_OPTIONS.get(name, {})})


def carried_options(name: str, source: str, options: dict | None) -> dict:
    """The ``options`` given for scheduler ``source`` that scheduler ``name`` takes: all of them where it
    is ``source`` (a Hires fix's second pass with another scheduler keeps the schedule, Karras sigmas,
    where it has them, as AUTOMATIC1111's "Use same scheduler" does)."""
    takes = option_names(name)
    return {k: v for k, v in (options or {}).items() if name == source or k in takes}


def resolve_scheduler_config(name: str, config: dict, **options) -> dict:
    """The settings that ``diffusers.<Kind>Scheduler.from_config(config, **options)`` would use.

    Keys the class does not take are ignored (as diffusers does), keys listed in the config's
    ``_use_default_values`` fall back to this class's defaults, and ``options`` override the config.
    Options that are neither constructor arguments nor step arguments (``eta`` for ddim) raise TypeError.
    """
    _check_name(name)
    _check_config(config)
    settings = {**_COMMON_DEFAULTS, **_CLASS_DEFAULTS[name], **_STEP_OPTIONS.get(name, {})}
    defaulted = set(config.get("_use_default_values", ()))
    for key, value in config.items():
        if key in settings and key not in defaulted and key not in _STEP_OPTIONS.get(name, {}):
            settings[key] = value
    for key, value in options.items():
        if key not in settings:
            raise TypeError(
                f"{name!r} scheduler has no option {key!r}; valid options: {', '.join(sorted(settings))}"
            )
        settings[key] = value
    for key, default in _CONFIG_ONLY_KEYS.get(name, {}).items():
        settings[key] = config.get(key, default)
    _check_setting_types(name, settings)
    return settings


def _check_setting_types(name: str, settings: dict) -> None:
    """Refuse a setting of the wrong kind by name: a word where a number belongs would otherwise be
    compared as text (``lambda_min_clipped='-inf'`` cut the schedule short), and any word is a true
    flag (``use_karras_sigmas='tru'``)."""
    defaults = {**_COMMON_DEFAULTS, **_CLASS_DEFAULTS[name], **_STEP_OPTIONS.get(name, {})}
    numbers = {key for key, value in defaults.items()
               if isinstance(value, (int, float)) and not isinstance(value, bool)} | {"sigma_min", "sigma_max"}
    for key, value in settings.items():
        if isinstance(defaults.get(key), bool) and value is not None and not (
                isinstance(value, (bool, np.bool_)) or (isinstance(value, (int, np.integer)) and value in (0, 1))):
            raise ValueError(f"{name} setting {key}={value!r}: expected true or false")
        if (key in numbers and not (key.startswith("sigma_") and value is None)
                and (isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)))):
            raise ValueError(f"{name} setting {key}={value!r}: expected a number")


# diffusers' StableDiffusionPipeline rewrites two outdated settings of the scheduler it is given (its
# __init__, with a deprecation warning): steps_offset != 1 becomes 1 and clip_sample true becomes false.
_PIPELINE_FIXUPS = (("steps_offset", lambda v: v != 1, 1), ("clip_sample", lambda v: v is True, False))


def pipeline_scheduler_config(name: str, config: dict) -> tuple[dict, list[str]]:
    """The config the ``name`` scheduler of diffusers' StableDiffusionPipeline is built from, and
    the settings that differ from ``config`` (``"steps_offset=0 -> 1"``).

    The pipeline corrects an outdated ``steps_offset`` (to 1) and ``clip_sample: true`` (to false)
    in the scheduler config it loads. A value the file holds is corrected for every scheduler made
    from it (``Kind.from_config(pipe.scheduler.config)``); a value the file leaves out is corrected
    only for the file's own class (``_class_name``), whose default it was, while other classes keep
    their own defaults, as in diffusers.
    """
    _check_name(name)
    _check_config(config)
    defaulted = set(config.get("_use_default_values", ()))
    own_defaults = ({**_COMMON_DEFAULTS, **_CLASS_DEFAULTS[name]}
                    if config.get("_class_name") == _DIFFUSERS_CLASS[name] else {})
    fixed, changes = dict(config), []
    for key, is_outdated, value in _PIPELINE_FIXUPS:
        if key in config and key not in defaulted:
            current = config[key]
        elif key in own_defaults:
            current = own_defaults[key]
        else:
            continue
        if is_outdated(current):
            fixed[key] = value
            changes.append(f"{key}={current!r} -> {value!r}")
            if key in defaulted:   # now set for this class
                fixed["_use_default_values"] = [k for k in fixed["_use_default_values"] if k != key]
    return fixed, changes


def _check_name(name: str) -> None:
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; valid names: {', '.join(SCHEDULERS)}")


def _check_config(config) -> None:
    """A config that is not a dict (the file's path, a diffusers scheduler) failed inside with an
    AttributeError about ``.get``."""
    if not isinstance(config, Mapping):
        raise TypeError("config must be a scheduler config as a dict (json.loads of a pipeline's "
                        "scheduler/scheduler_config.json, or a diffusers scheduler's .config), got "
                        + (repr(config) if isinstance(config, str) else type(config).__name__))


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise NotImplementedError(message)


# ----------------------------------------------------------------------------------------------------------
# Host-side schedule arithmetic (numpy).  The training noise schedule is reproduced bit for bit: diffusers
# builds it with float32 torch ops whose rounding we emulate.
# ----------------------------------------------------------------------------------------------------------


def _linspace_float32(start: float, end: float, num: int) -> np.ndarray:
    """``torch.linspace(start, end, num, dtype=torch.float32)`` on CPU, bit for bit.

    torch computes the step in float32, fills the first half forwards from ``start`` and the second half
    backwards from ``end``, each value with one fused multiply-add (emulated here exactly in float64).
    """
    start32, end32 = np.float32(start), np.float32(end)
    step32 = np.float32((end32 - start32) / np.float32(num - 1)) if num > 1 else np.float32(0)
    index = np.arange(num, dtype=np.float64)
    forwards = np.float64(start32) + np.float64(step32) * index
    backwards = np.float64(end32) - np.float64(step32) * (num - 1 - index)
    return np.where(index < num // 2, forwards, backwards).astype(np.float32)


def _cumprod_float32(values: np.ndarray) -> np.ndarray:
    # torch's CPU cumprod accumulates float32 in double and rounds each output.
    return np.cumprod(values.astype(np.float64)).astype(np.float32)


def _cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """Betas of the squared-cosine alpha-bar schedule (Nichol & Dhariwal), as diffusers' betas_for_alpha_bar."""
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [
        min(1.0 - alpha_bar((k + 1) / num_train_timesteps) / alpha_bar(k / num_train_timesteps), max_beta)
        for k in range(num_train_timesteps)
    ]
    return np.asarray(betas, dtype=np.float32)


def _rescale_to_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Shift and scale sqrt(alphas_cumprod) so the last timestep has zero SNR (Lin et al. 2023, Alg. 1)."""
    sqrt_alpha_bar = np.sqrt(_cumprod_float32(np.float32(1.0) - betas))
    first, last = sqrt_alpha_bar[0], sqrt_alpha_bar[-1]
    sqrt_alpha_bar = (sqrt_alpha_bar - last) * (first / (first - last))
    alpha_bar = sqrt_alpha_bar**2
    alphas = np.concatenate([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return (np.float32(1.0) - alphas).astype(np.float32)


def _train_betas(settings: dict) -> np.ndarray:
    num = settings["num_train_timesteps"]
    if num != int(num) or num < 1:
        raise ValueError(f"num_train_timesteps={num!r}: expected a whole number >= 1")
    num = int(num)
    schedule = settings["beta_schedule"]
    for key in ("beta_start", "beta_end"):   # (a square root is taken of them: a negative one would be complex)
        if schedule in ("linear", "scaled_linear") and settings["trained_betas"] is None and not 0 <= settings[key] < 1:
            raise ValueError(f"{key}={settings[key]!r}: expected a number in [0, 1)")
    if settings["trained_betas"] is not None:
        betas = np.asarray(settings["trained_betas"], dtype=np.float32)
        if betas.shape != (num,):   # indexing by timestep would silently clamp
            raise ValueError(f"trained_betas has shape {betas.shape}; expected one beta per training timestep "
                             f"({num}, num_train_timesteps)")
    elif schedule == "linear":
        betas = _linspace_float32(settings["beta_start"], settings["beta_end"], num)
    elif schedule == "scaled_linear":
        sqrt_betas = _linspace_float32(settings["beta_start"] ** 0.5, settings["beta_end"] ** 0.5, num)
        betas = sqrt_betas * sqrt_betas
    elif schedule == "squaredcos_cap_v2":
        betas = _cosine_betas(num)
    else:
        raise NotImplementedError(f"beta_schedule {schedule!r} is not supported")
    if settings.get("rescale_betas_zero_snr", False):
        betas = _rescale_to_zero_terminal_snr(betas)
    return betas


def _alphas_cumprod(settings: dict) -> np.ndarray:
    return _cumprod_float32(np.float32(1.0) - _train_betas(settings))


def make_noise_schedule(config: dict) -> np.ndarray:
    """``alphas_cumprod`` (float32 [num_train_timesteps]) of the training forward process q(x_t | x_0).

    This is all a training loop needs (see :func:`add_noise` and :func:`get_velocity`); it equals
    ``diffusers.DDPMScheduler.from_config(config).alphas_cumprod`` bit for bit.
    """
    return _alphas_cumprod(resolve_scheduler_config("ddpm", config))


def _sigma_table(alphas_cumprod: np.ndarray) -> np.ndarray:
    """Noise-to-signal ratio sqrt((1 - abar) / abar) per training timestep, float32 like diffusers."""
    return np.sqrt((np.float32(1.0) - alphas_cumprod) / alphas_cumprod).astype(np.float32)


def _spaced_timesteps(settings: dict, num_steps: int, round_linspace: bool = True) -> np.ndarray:
    """Descending inference timesteps (float64) for ``timestep_spacing`` (table 2 of arXiv:2305.08891).

    The alpha-based schedulers round "linspace" to integers; the sigma-based ones keep fractional
    timesteps (``round_linspace=False``) and interpolate the sigma table there.
    """
    spacing = settings["timestep_spacing"]
    num_train = int(settings["num_train_timesteps"])
    if spacing == "linspace":
        timesteps = np.linspace(0, num_train - 1, num_steps)[::-1]
        return timesteps.round() if round_linspace else timesteps.astype(np.float32).astype(np.float64)
    if spacing == "leading":
        step_ratio = num_train // num_steps
        return (np.arange(num_steps) * step_ratio).round()[::-1] + settings["steps_offset"]
    if spacing == "trailing":
        return np.round(np.arange(num_train, 0, -num_train / num_steps)) - 1
    raise ValueError(f"timestep_spacing {spacing!r} is not one of 'linspace', 'leading', 'trailing'")


def _karras_sigmas(sigma_min: float, sigma_max: float, num_steps: int, rho: float = 7.0) -> np.ndarray:
    """Sigmas evenly spaced in sigma**(1/rho) from sigma_max down to sigma_min (Karras et al. 2022, eq. 5)."""
    ramp = np.linspace(0, 1, num_steps)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def _timesteps_for_sigmas(sigmas: np.ndarray, sigma_table: np.ndarray) -> np.ndarray:
    """Fractional training timesteps whose sigma equals ``sigmas``: linear interpolation in log sigma."""
    log_table = np.log(sigma_table)  # float32, increasing with t
    log_sigma = np.log(np.maximum(np.asarray(sigmas, dtype=np.float64), 1e-10))
    # Index of the last table entry at or below each log sigma, kept one short of the end.
    low = np.clip((log_table[:, None] <= log_sigma[None, :]).sum(axis=0) - 1, 0, len(log_table) - 2)
    low_log, high_log = log_table[low], log_table[low + 1]
    weight = np.clip((low_log - log_sigma) / (low_log - high_log), 0, 1)
    return (1 - weight) * low + weight * (low + 1)


def _lms_coefficients(sigmas: np.ndarray, step: int, order: int) -> np.ndarray:
    """Linear-multistep weights for step ``step``: the integrals over [sigma_step, sigma_step+1] of the
    Lagrange basis polynomials through the ``order`` most recent sigmas.

    The basis polynomials have degree <= 3, so two-point Gauss-Legendre quadrature is exact.
    """
    start, end = float(sigmas[step]), float(sigmas[step + 1])
    half_width, midpoint = (end - start) / 2, (end + start) / 2
    nodes = midpoint + half_width * np.array([-1.0, 1.0]) / math.sqrt(3.0)
    history_sigmas = [float(sigmas[step - k]) for k in range(order)]
    weights = np.zeros(4)
    for j in range(order):
        basis = np.ones_like(nodes)
        for k in range(order):
            if k != j:
                basis *= (nodes - history_sigmas[k]) / (history_sigmas[j] - history_sigmas[k])
        weights[j] = half_width * basis.sum()
    return weights


# ----------------------------------------------------------------------------------------------------------
# Traced helpers.
# ----------------------------------------------------------------------------------------------------------

_F32 = jnp.float32


def _at(table, index):
    """``table[index]`` for a host (numpy) or device table and a possibly traced index."""
    return jnp.asarray(table)[index]


def _expand_to(coefficient, ndim: int):
    """Append singleton axes so a per-image coefficient [B] broadcasts against an [B, ...] tensor."""
    coefficient = jnp.asarray(coefficient)
    return coefficient.reshape(coefficient.shape + (1,) * (ndim - coefficient.ndim))


def image_key_count(keys) -> int | None:
    """How many keys ``keys`` holds as one PRNG key per image (typed [B], or raw uint32 [B, 2]); None
    for anything else (one key for the whole batch, seeds, a list). The one test of it for the step
    noise, the VAE's draws and the sampler."""
    dtype, shape = getattr(keys, "dtype", None), tuple(getattr(keys, "shape", ()))
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return shape[0] if len(shape) == 1 else None
    return shape[0] if dtype == jnp.uint32 and len(shape) == 2 and shape[1] == 2 else None


def step_noise(key, step_index, like) -> jax.Array:
    """Standard normal float32 noise shaped like ``like`` for loop index ``step_index``.

    ``key`` is either one PRNG key for the whole batch or one key per image (shape [B] for typed keys,
    [B, 2] for raw uint32 keys); with per-image keys image b gets
    ``normal(fold_in(key[b], step_index), like.shape[1:])``, so an image's noise does not depend on the
    batch it is sampled in.  Folding in the step index here means callers may pass the same keys at
    every step.
    """
    if key is None:
        raise ValueError("this scheduler is stochastic: step() needs a PRNG key")
    if image_key_count(key) is not None:
        if key.shape[0] != like.shape[0]:
            raise ValueError(f"got {key.shape[0]} per-image keys for a batch of {like.shape[0]}")
        return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, step_index), like.shape[1:], _F32))(key)
    return jax.random.normal(jax.random.fold_in(key, step_index), like.shape, _F32)


def _alpha_bar_at(alphas_cumprod, timesteps) -> jax.Array:
    """abar at integer training timesteps. Concrete timesteps outside [0, num_train_timesteps) or
    not whole are a ValueError (JAX's gather would clamp or wrap them silently; diffusers raises);
    under ``jit`` they cannot be checked."""
    alphas_cumprod = jnp.asarray(alphas_cumprod, _F32)
    t = jnp.asarray(timesteps)
    if not isinstance(t, jax.core.Tracer):
        host = np.asarray(t, np.float64).reshape(-1)
        bad = host[(host < 0) | (host >= alphas_cumprod.shape[0]) | (host != np.round(host))]
        if bad.size:
            raise ValueError(f"timesteps {bad.tolist()[:8]} are not integer training timesteps in "
                             f"0..{alphas_cumprod.shape[0] - 1}")
    return alphas_cumprod[t.astype(jnp.int32)]


def add_noise(alphas_cumprod, original, noise, timesteps) -> jax.Array:
    """Forward process sample x_t = sqrt(abar_t) * x_0 + sqrt(1 - abar_t) * noise.

    ``timesteps`` is a scalar or one integer training timestep per image ([B]); float32 arithmetic as in
    diffusers' ``DDPMScheduler.add_noise``.
    """
    alpha_bar = _alpha_bar_at(alphas_cumprod, timesteps)
    original = jnp.asarray(original, _F32)
    ndim = original.ndim
    return (_expand_to(jnp.sqrt(alpha_bar), ndim) * original
            + _expand_to(jnp.sqrt(1.0 - alpha_bar), ndim) * jnp.asarray(noise, _F32))


def get_velocity(alphas_cumprod, sample, noise, timesteps) -> jax.Array:
    """v-prediction target v = sqrt(abar_t) * noise - sqrt(1 - abar_t) * x_0 (Salimans & Ho 2022)."""
    alpha_bar = _alpha_bar_at(alphas_cumprod, timesteps)
    sample = jnp.asarray(sample, _F32)
    ndim = sample.ndim
    return (_expand_to(jnp.sqrt(alpha_bar), ndim) * jnp.asarray(noise, _F32)
            - _expand_to(jnp.sqrt(1.0 - alpha_bar), ndim) * sample)


def _schedule_index(schedule_timesteps, timesteps):
    """Position of each timestep in the inference schedule, as diffusers' ``index_for_timestep``: the
    second occurrence when a timestep appears twice.

    A timestep that is not in the schedule is a ValueError when both are concrete (as diffusers, which
    fails on it too); under ``jit`` it cannot be checked and takes the last position.
    """
    schedule = jnp.asarray(schedule_timesteps, _F32)
    query = jnp.asarray(timesteps, _F32).reshape(-1)
    if not isinstance(schedule, jax.core.Tracer) and not isinstance(query, jax.core.Tracer):
        missing = np.setdiff1d(np.asarray(query), np.asarray(schedule))
        if missing.size:
            raise ValueError(
                f"timesteps {missing.tolist()[:8]} are not in this scheduler's inference schedule "
                f"({schedule.shape[0]} entries); add_noise on a sigma scheduler takes timesteps from "
                "scheduler.timesteps (for img2img, add_noise_at(x0, noise, start) noises by loop index)")
    matches = schedule[None, :] == query[:, None]  # [B, N]
    count = matches.sum(axis=1)
    wanted_rank = jnp.minimum(count, 2)
    rank = jnp.cumsum(matches, axis=1)
    index = jnp.argmax(matches & (rank == wanted_rank[:, None]), axis=1)
    index = jnp.where(count == 0, schedule.shape[0] - 1, index)
    return index.reshape(jnp.shape(timesteps))


# ----------------------------------------------------------------------------------------------------------
# Scheduler states (scan carries): fixed shapes, float32.
# ----------------------------------------------------------------------------------------------------------


class NoState(NamedTuple):
    """State of schedulers that remember nothing between steps."""


class PNDMState(NamedTuple):
    model_output_history: jax.Array  # [3, *latents.shape], most recent first
    stashed_sample: jax.Array        # sample a multi-evaluation step started from
    accumulated_output: jax.Array    # running Runge-Kutta combination of model outputs


class DPMSolverState(NamedTuple):
    previous_x0: jax.Array  # data prediction of the previous step


class LMSState(NamedTuple):
    derivative_history: jax.Array  # [3, *latents.shape], most recent first


def _push(history, newest):
    """Shift ``newest`` into a most-recent-first history buffer, dropping the oldest entry."""
    return jnp.concatenate([newest[None], history[:-1]], axis=0)


def _static(**kwargs):
    return dataclasses.field(metadata={"static": True}, **kwargs)


# ----------------------------------------------------------------------------------------------------------
# Schedulers.
# ----------------------------------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Scheduler:
    """Base class: a precomputed sampling schedule plus a pure step function.

    Array fields are pytree children (host numpy arrays; they become tracers when the scheduler is passed
    into ``jax.jit``); ``num_model_calls``, ``init_noise_sigma`` and the string/bool settings are static.
    """

    timesteps: Any        # float32 [num_model_calls]: UNet timestep at loop index i (fractional for some)
    alphas_cumprod: Any   # float32 [num_train_timesteps]
    num_model_calls: int = _static()
    init_noise_sigma: float = _static()
    prediction_type: str = _static()

    name = "scheduler"
    stochastic = False

    def __repr__(self) -> str:   # every scheduler's (repr=False): the generated one prints every table
        return (f"{type(self).__name__}(num_model_calls={self.num_model_calls}, "
                f"prediction_type={self.prediction_type!r}, init_noise_sigma={self.init_noise_sigma:.6g})")

    def _loop_index(self, i):
        """``i``, checked when it is concrete: an integer in 0..num_model_calls - 1. JAX's indexing
        would clamp any other (a timestep passed where the loop index goes, one step too many),
        silently giving another step's update or NaN."""
        if isinstance(i, jax.core.Tracer):
            return i
        value = np.asarray(i)
        n = self.num_model_calls
        if value.ndim != 0 or value.dtype.kind not in "iu":
            raise TypeError(f"{type(self).__name__}: loop index {i!r} must be an integer in 0..{n - 1}, the "
                            "position in the schedule (not the timestep, which is sched.timestep(i))")
        if not 0 <= int(value) < n:
            raise IndexError(f"{type(self).__name__}: loop index {int(value)} is outside 0..{n - 1} "
                             f"(num_model_calls={n}); the methods take the position in the schedule, not the "
                             "timestep (sched.timestep(i))")
        return i

    def timestep(self, i) -> jax.Array:
        """The (float32) timestep to give the UNet at loop index ``i``; works with a traced ``i``."""
        i = self._loop_index(i)
        return _at(self.timesteps, i)

    def alpha_bar(self, i) -> jax.Array:
        """abar of the variance-preserving sample the UNet sees at loop index ``i``."""
        i = self._loop_index(i)
        t = jnp.clip(jnp.round(self.timestep(i)), 0, self.alphas_cumprod.shape[0] - 1).astype(jnp.int32)
        return jnp.asarray(self.alphas_cumprod, _F32)[t]

    def init_state(self, latents) -> Any:
        """The scan carry before the first step (zeros shaped after ``latents``)."""
        return NoState()

    def starting_at(self, start: int) -> "Scheduler":
        """This schedule entered at loop index ``start`` with a fresh `init_state`, as diffusers
        runs it for img2img (``set_begin_index(start)``, or ``timesteps[start:]`` for PNDM): the
        multistep schedulers then begin with their first-order / warm-up steps there instead of
        combining outputs they never saw. Loop ``i`` over ``start..num_model_calls - 1`` from
        ``add_noise_at(x0, noise, start)``; `sdjax.sampling.denoise` takes ``start=``."""
        self._start_index(start)
        return self

    def _start_index(self, start) -> int:
        if isinstance(start, bool) or not isinstance(start, (int, np.integer)) \
                or not 0 <= start < self.num_model_calls:
            raise ValueError(f"{type(self).__name__}: start {start!r} must be an integer in "
                             f"0..{self.num_model_calls - 1} (a loop index of the schedule)")
        return int(start)

    def scale_model_input(self, state, latents, i) -> jax.Array:
        """The UNet input at loop index ``i`` (identity unless the scheduler works in sigma space)."""
        self._loop_index(i)
        return latents

    def step(self, state, model_output, i, latents, key=None) -> tuple[jax.Array, Any]:
        """Advance ``latents`` past loop index ``i`` (0..num_model_calls - 1: the position in the
        schedule, not the timestep as in diffusers' ``step``) given the model output there.

        ``key``: PRNG key(s) for the stochastic schedulers (see :func:`step_noise`); ignored otherwise.
        Returns ``(next_latents, next_state)``, both float32.
        """
        raise NotImplementedError

    def add_noise(self, original, noise, timesteps) -> jax.Array:
        """Noise clean latents to ``timesteps`` as this diffusers scheduler's ``add_noise`` (img2img)."""
        return add_noise(self.alphas_cumprod, original, noise, timesteps)

    def add_noise_at(self, original, noise, i) -> jax.Array:
        """Noise clean latents to loop index ``i`` of this schedule: img2img's start, as diffusers'
        img2img pipeline does it (by index, where the scheduler has a begin index: a timestep that
        the schedule repeats, as Karras sigmas can, is then the right one of the two)."""
        i = self._loop_index(i)
        return add_noise(self.alphas_cumprod, original, noise, jnp.round(_at(self.timesteps, i)).astype(jnp.int32))

    def get_velocity(self, sample, noise, timesteps) -> jax.Array:
        """v-prediction target at integer training ``timesteps`` (see module-level :func:`get_velocity`).

        Always indexed by training timestep; diffusers' Euler-family ``get_velocity`` indexes
        alphas_cumprod by position in the inference schedule instead, which is not reproduced.
        """
        return get_velocity(self.alphas_cumprod, sample, noise, timesteps)

    def _noise(self, key, i, like):
        return step_noise(key, i, like)


def _sqrt_nonnegative(x):
    """The square root of a difference that is >= 0 in exact arithmetic but can round to just below
    0 (sigma_down when sigma_next**2 / sigma**2 is under float32's epsilon; DDIM's direction term
    with eta = 1 at zero terminal SNR): 0 there, where x ** 0.5 would give NaN for the whole image."""
    return jnp.sqrt(jnp.maximum(x, 0.0))


def alpha_prediction_to_x0_and_eps(prediction_type, model_output, sample, alpha_bar):
    """(x0, eps) from the model output of an alpha-parameterised (DDPM/DDIM) scheduler."""
    sqrt_alpha, sqrt_one_minus_alpha = alpha_bar**0.5, (1 - alpha_bar) ** 0.5
    if prediction_type == "epsilon":
        return (sample - sqrt_one_minus_alpha * model_output) / sqrt_alpha, model_output
    if prediction_type == "v_prediction":
        return (sqrt_alpha * sample - sqrt_one_minus_alpha * model_output,
                sqrt_alpha * model_output + sqrt_one_minus_alpha * sample)
    if prediction_type == "sample":
        return model_output, (sample - sqrt_alpha * model_output) / sqrt_one_minus_alpha
    raise ValueError(f"unsupported prediction_type {prediction_type!r}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class PNDMScheduler(Scheduler):
    """PNDM (Liu et al. 2022) as diffusers' PNDMScheduler: PLMS steps, optionally after Runge-Kutta ones.

    diffusers' step depends on a counter; here each loop index has a row of tables: which training
    timesteps the alphas come from, how model outputs are combined (current one, three remembered ones
    and a Runge-Kutta accumulator), and whether the step starts from the stashed sample.
    """

    alpha_timestep: Any          # int32 [N]: timestep whose abar the step starts from
    prev_alpha_timestep: Any     # int32 [N]: timestep it steps to (< 0: final_alpha_cumprod)
    final_alpha_cumprod: Any     # float32 scalar
    current_weight: Any          # float32 [N]
    history_weights: Any         # float32 [N, 3]
    accumulated_weight: Any      # float32 [N]
    accumulator_keep: Any        # float32 [N]
    accumulator_add: Any         # float32 [N]
    push_history: Any            # bool [N]: remember this model output
    stash_sample: Any            # bool [N]: remember this sample
    use_stashed_sample: Any      # bool [N]: step from the remembered sample instead

    step_ratio: int = _static(default=0)             # num_train_timesteps // steps
    runge_kutta: bool = _static(default=False)        # Runge-Kutta warm-up (skip_prk_steps false)

    name = "pndm"

    def init_state(self, latents):
        zeros = jnp.zeros(jnp.shape(latents), _F32)
        return PNDMState(jnp.zeros((3,) + zeros.shape, _F32), zeros, zeros)

    def starting_at(self, start: int) -> "PNDMScheduler":
        """See `Scheduler.starting_at`: the PLMS warm-up (a step, then a re-step with the average of
        two outputs, then Adams-Bashforth of growing order) begins at ``start``, as diffusers'
        counter does when its loop begins there."""
        start = self._start_index(start)
        if start == 0:
            return self
        if self.runge_kutta:
            raise NotImplementedError("PNDM with Runge-Kutta steps (skip_prk_steps=False) cannot start midway")
        tables = _plms_rows(self.timesteps[start:], self.step_ratio)
        return dataclasses.replace(self, **{name: _replace_from(getattr(self, name), start, rows)
                                            for name, rows in tables.items()})

    def step(self, state, model_output, i, latents, key=None):
        i = self._loop_index(i)
        model_output = jnp.asarray(model_output, _F32)
        latents = jnp.asarray(latents, _F32)
        sample = jnp.where(_at(self.use_stashed_sample, i), state.stashed_sample, latents)
        history_weights = _at(self.history_weights, i)
        combined = (_at(self.current_weight, i) * model_output
                    + jnp.tensordot(history_weights, state.model_output_history, axes=1)
                    + _at(self.accumulated_weight, i) * state.accumulated_output)

        prev_t = _at(self.prev_alpha_timestep, i)
        alpha_bar = _at(self.alphas_cumprod, _at(self.alpha_timestep, i))
        alpha_bar_prev = jnp.where(prev_t >= 0, _at(self.alphas_cumprod, jnp.maximum(prev_t, 0)),
                                   self.final_alpha_cumprod)
        beta_bar, beta_bar_prev = 1 - alpha_bar, 1 - alpha_bar_prev
        if self.prediction_type == "v_prediction":
            combined = alpha_bar**0.5 * combined + beta_bar**0.5 * sample
        elif self.prediction_type != "epsilon":
            raise ValueError(f"PNDM supports epsilon and v_prediction, not {self.prediction_type!r}")
        # PNDM paper eq. (9): the transfer from x_t to x_(t - delta) given the noise estimate.
        sample_coeff = (alpha_bar_prev / alpha_bar) ** 0.5
        denominator = alpha_bar * beta_bar_prev**0.5 + (alpha_bar * beta_bar * alpha_bar_prev) ** 0.5
        next_latents = sample_coeff * sample - (alpha_bar_prev - alpha_bar) * combined / denominator

        new_state = PNDMState(
            model_output_history=jnp.where(_at(self.push_history, i),
                                           _push(state.model_output_history, model_output),
                                           state.model_output_history),
            stashed_sample=jnp.where(_at(self.stash_sample, i), latents, state.stashed_sample),
            accumulated_output=(_at(self.accumulator_keep, i) * state.accumulated_output
                                + _at(self.accumulator_add, i) * model_output),
        )
        return next_latents, new_state


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class DDIMScheduler(Scheduler):
    """DDIM (Song et al. 2021) as diffusers' DDIMScheduler, with ``eta`` (0 = deterministic)."""

    alpha_timestep: Any        # int32 [N]
    prev_alpha_timestep: Any   # int32 [N]: t - num_train // N (< 0: final_alpha_cumprod)
    final_alpha_cumprod: Any   # float32 scalar
    eta: float = _static()
    clip_sample_range: float | None = _static()  # clamp predicted x0 to +-range; None = no clipping

    name = "ddim"

    @property
    def stochastic(self) -> bool:  # type: ignore[override]
        return self.eta > 0

    def step(self, state, model_output, i, latents, key=None):
        i = self._loop_index(i)
        model_output = jnp.asarray(model_output, _F32)
        sample = jnp.asarray(latents, _F32)
        prev_t = _at(self.prev_alpha_timestep, i)
        alpha_bar = _at(self.alphas_cumprod, _at(self.alpha_timestep, i))
        alpha_bar_prev = jnp.where(prev_t >= 0, _at(self.alphas_cumprod, jnp.maximum(prev_t, 0)),
                                   self.final_alpha_cumprod)
        x0, eps = alpha_prediction_to_x0_and_eps(self.prediction_type, model_output, sample, alpha_bar)
        if self.clip_sample_range is not None:
            x0 = jnp.clip(x0, -self.clip_sample_range, self.clip_sample_range)
        # DDIM eq. (16): sigma_t^2 = eta^2 * (1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev).
        variance = (1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev)
        std_dev = self.eta * _sqrt_nonnegative(variance)
        direction = _sqrt_nonnegative(1 - alpha_bar_prev - std_dev**2) * eps
        next_latents = alpha_bar_prev**0.5 * x0 + direction
        if self.stochastic:
            next_latents = next_latents + std_dev * self._noise(key, i, sample)
        return next_latents, state


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class _SigmaScheduler(Scheduler):
    """Schedulers that work on x / sqrt(abar) with noise level sigma (Karras et al. 2022 "VE" form)."""

    sigmas: Any  # float32 [N + 1]: sigma at each loop index, then the final sigma (0 by default)

    def scale_model_input(self, state, latents, i):
        i = self._loop_index(i)
        sigma = _at(self.sigmas, i)
        return jnp.asarray(latents, _F32) / (sigma**2 + 1) ** 0.5

    def alpha_bar(self, i):
        i = self._loop_index(i)
        # From sigma itself: the timesteps are fractional (interpolated) for most of these schedules.
        return 1 / (_at(self.sigmas, i) ** 2 + 1)

    def add_noise(self, original, noise, timesteps):
        """x0 + sigma(t) * noise, with t looked up in this schedule (a t not in it is a ValueError)."""
        return self._noised(original, noise, _at(self.sigmas, _schedule_index(self.timesteps, timesteps)))

    def add_noise_at(self, original, noise, i):
        return self._noised(original, noise, _at(self.sigmas, self._loop_index(i)))

    def _noised(self, original, noise, sigma):
        original = jnp.asarray(original, _F32)
        return original + jnp.asarray(noise, _F32) * _expand_to(sigma, original.ndim)

    def _x0(self, model_output, sample, sigma):
        """Denoised estimate from the model output at noise level sigma."""
        if self.prediction_type == "epsilon":
            return sample - sigma * model_output
        if self.prediction_type == "v_prediction":
            return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + sample / (sigma**2 + 1)
        if self.prediction_type == "sample":
            return model_output
        raise ValueError(f"unsupported prediction_type {self.prediction_type!r}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class EulerScheduler(_SigmaScheduler):
    """Euler's method on the probability-flow ODE, as diffusers' EulerDiscreteScheduler (s_churn = 0)."""

    name = "euler"

    def step(self, state, model_output, i, latents, key=None):
        i = self._loop_index(i)
        model_output = jnp.asarray(model_output, _F32)
        sample = jnp.asarray(latents, _F32)
        sigma, sigma_next = _at(self.sigmas, i), _at(self.sigmas, i + 1)
        derivative = (sample - self._x0(model_output, sample, sigma)) / sigma
        return sample + derivative * (sigma_next - sigma), state


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class EulerAncestralScheduler(_SigmaScheduler):
    """Ancestral Euler sampling, as diffusers' EulerAncestralDiscreteScheduler: an Euler step down to
    sigma_down, then fresh noise of std sigma_up so the marginal noise level is sigma_next."""

    name = "euler_a"
    stochastic = True

    def step(self, state, model_output, i, latents, key=None):
        i = self._loop_index(i)
        model_output = jnp.asarray(model_output, _F32)
        sample = jnp.asarray(latents, _F32)
        sigma, sigma_next = _at(self.sigmas, i), _at(self.sigmas, i + 1)
        sigma_up = _sqrt_nonnegative(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
        sigma_down = _sqrt_nonnegative(sigma_next**2 - sigma_up**2)
        derivative = (sample - self._x0(model_output, sample, sigma)) / sigma
        next_latents = sample + derivative * (sigma_down - sigma)
        return next_latents + self._noise(key, i, sample) * sigma_up, state


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class LMSScheduler(_SigmaScheduler):
    """Linear multistep (order 4), as diffusers' LMSDiscreteScheduler; the integration weights are
    computed on the host for every step, the order growing 1, 2, 3, 4 over the first steps."""

    lms_weights: Any  # float32 [N, 4]: weights of the current and three previous derivatives

    name = "lms"

    def init_state(self, latents):
        return LMSState(jnp.zeros((3,) + jnp.shape(latents), _F32))

    def step(self, state, model_output, i, latents, key=None):
        i = self._loop_index(i)
        model_output = jnp.asarray(model_output, _F32)
        sample = jnp.asarray(latents, _F32)
        sigma = _at(self.sigmas, i)
        derivative = (sample - self._x0(model_output, sample, sigma)) / sigma
        weights = _at(self.lms_weights, i)
        update = weights[0] * derivative + jnp.tensordot(weights[1:], state.derivative_history, axes=1)
        return sample + update, LMSState(_push(state.derivative_history, derivative))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class DPMSolverMultistepScheduler(_SigmaScheduler):
    """DPM-Solver++(2M) (Lu et al. 2022), as diffusers' DPMSolverMultistepScheduler with
    algorithm_type="dpmsolver++": a first-order step first (and last, per lower_order_final /
    final_sigmas_type), second-order multistep updates in between."""

    first_order: Any  # bool [N]
    solver_type: str = _static()  # "midpoint" or "heun"

    name = "dpmpp_2m"

    def scale_model_input(self, state, latents, i):
        i = self._loop_index(i)
        return latents  # DPM-Solver works on the variance-preserving latents directly

    def init_state(self, latents):
        return DPMSolverState(jnp.zeros(jnp.shape(latents), _F32))

    def starting_at(self, start: int) -> "DPMSolverMultistepScheduler":
        """See `Scheduler.starting_at`: the step at ``start`` is first order (diffusers counts the
        steps it has taken, so its first one is)."""
        start = self._start_index(start)
        return dataclasses.replace(self, first_order=_replace_from(self.first_order, start, np.array([True])))

    @staticmethod
    def _alpha_sigma(sigma):
        """(alpha_t, sigma_t) of the variance-preserving process with noise-to-signal ratio sigma."""
        alpha = 1 / (sigma**2 + 1) ** 0.5
        return alpha, sigma * alpha

    def _data_prediction(self, model_output, sample, alpha, sigma):
        """The model's x0 (DPM-Solver++ works with data predictions)."""
        if self.prediction_type == "epsilon":
            return (sample - sigma * model_output) / alpha
        if self.prediction_type == "v_prediction":
            return alpha * sample - sigma * model_output
        if self.prediction_type == "sample":
            return model_output
        raise ValueError(f"unsupported prediction_type {self.prediction_type!r}")

    def _noised(self, original, noise, sigma):
        """alpha_t * x0 + sigma_t * noise (DPM-Solver's variance-preserving latents)."""
        alpha, sigma = self._alpha_sigma(sigma)
        original = jnp.asarray(original, _F32)
        return (_expand_to(alpha, original.ndim) * original
                + _expand_to(sigma, original.ndim) * jnp.asarray(noise, _F32))

    def _terms(self, model_output, i, latents):
        """A step's loop index, sample, data prediction x0, alpha_t, sigma_t, sigma_s0, and its half-log-SNR
        step h with the step before's, h_0 (both solvers' update is made of them)."""
        i = self._loop_index(i)
        model_output = jnp.asarray(model_output, _F32)
        sample = jnp.asarray(latents, _F32)
        alpha_s0, sigma_s0 = self._alpha_sigma(_at(self.sigmas, i))
        alpha_t, sigma_t = self._alpha_sigma(_at(self.sigmas, i + 1))
        alpha_s1, sigma_s1 = self._alpha_sigma(_at(self.sigmas, jnp.maximum(i - 1, 0)))
        x0 = self._data_prediction(model_output, sample, alpha_s0, sigma_s0)

        # Half-log-SNR lambda = log(alpha) - log(sigma); at the final sigma 0 it is +inf, h is inf and
        # exp(-h) is 0, which makes the first-order step return x0 exactly.
        lambda_t = jnp.log(alpha_t) - jnp.log(sigma_t)
        lambda_s0 = jnp.log(alpha_s0) - jnp.log(sigma_s0)
        lambda_s1 = jnp.log(alpha_s1) - jnp.log(sigma_s1)
        return i, sample, x0, alpha_t, sigma_t, sigma_s0, lambda_t - lambda_s0, lambda_s0 - lambda_s1

    def step(self, state, model_output, i, latents, key=None):
        i, sample, x0, alpha_t, sigma_t, sigma_s0, h, h_0 = self._terms(model_output, i, latents)
        x0_coeff = -alpha_t * (jnp.exp(-h) - 1.0)
        if self.solver_type == "midpoint":
            d1_coeff = 0.5 * x0_coeff
        else:  # heun
            d1_coeff = alpha_t * ((jnp.exp(-h) - 1.0) / h + 1.0)
        # Second-order correction D1 = (x0 - previous_x0) / r0 with r0 = h_0 / h; its coefficient is
        # selected away on first-order steps (where it may be inf or nan).
        difference_coeff = jnp.where(_at(self.first_order, i), 0.0, d1_coeff * (h / h_0))
        difference = jnp.where(_at(self.first_order, i), 0.0, x0 - state.previous_x0)
        next_latents = (sigma_t / sigma_s0) * sample + x0_coeff * x0 + difference_coeff * difference
        return next_latents, DPMSolverState(x0)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class DPMSolverSDEScheduler(DPMSolverMultistepScheduler):
    """DPM-Solver++(2M) SDE (Lu et al. 2022, its stochastic form), as diffusers' DPMSolverMultistepScheduler
    with algorithm_type="sde-dpmsolver++" and k-diffusion's ``sample_dpmpp_2m_sde`` (AUTOMATIC1111's
    "DPM++ 2M SDE", eta 1): each step shrinks the sample by exp(-h) more than the ODE step and adds
    fresh noise of std sigma_t * sqrt(1 - exp(-2h)) (h: the step in half-log-SNR), keyed per image."""

    name = "dpmpp_2m_sde"
    stochastic = True

    def step(self, state, model_output, i, latents, key=None):
        # (h is inf at the final sigma 0: exp(-h) = 0 and the step returns x0, with no noise)
        i, sample, x0, alpha_t, sigma_t, sigma_s0, h, h_0 = self._terms(model_output, i, latents)
        x0_coeff = alpha_t * (1.0 - jnp.exp(-2.0 * h))
        if self.solver_type == "midpoint":
            d1_coeff = 0.5 * x0_coeff
        else:  # heun
            d1_coeff = alpha_t * ((1.0 - jnp.exp(-2.0 * h)) / (-2.0 * h) + 1.0)
        first = _at(self.first_order, i)
        difference_coeff = jnp.where(first, 0.0, d1_coeff * (h / h_0))
        difference = jnp.where(first, 0.0, x0 - state.previous_x0)
        noise_std = sigma_t * _sqrt_nonnegative(1.0 - jnp.exp(-2.0 * h))
        next_latents = ((sigma_t / sigma_s0 * jnp.exp(-h)) * sample + x0_coeff * x0 + difference_coeff * difference
                        + noise_std * self._noise(key, i, sample))
        return next_latents, DPMSolverState(x0)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class DDPMScheduler(Scheduler):
    """Ancestral DDPM sampling (Ho et al. 2020), as diffusers' DDPMScheduler."""

    prev_alpha_timestep: Any   # int32 [N]: next timestep of the schedule (-1 after the last: abar = 1)
    variance_type: str = _static()
    clip_sample_range: float | None = _static()

    name = "ddpm"
    stochastic = True

    def step(self, state, model_output, i, latents, key=None):
        i = self._loop_index(i)
        model_output = jnp.asarray(model_output, _F32)
        sample = jnp.asarray(latents, _F32)
        t = _at(self.timesteps, i).astype(jnp.int32)
        prev_t = _at(self.prev_alpha_timestep, i)
        alpha_bar = _at(self.alphas_cumprod, t)
        alpha_bar_prev = jnp.where(prev_t >= 0, _at(self.alphas_cumprod, jnp.maximum(prev_t, 0)), 1.0)
        beta_bar, beta_bar_prev = 1 - alpha_bar, 1 - alpha_bar_prev
        current_alpha = alpha_bar / alpha_bar_prev
        current_beta = 1 - current_alpha

        x0, _ = alpha_prediction_to_x0_and_eps(self.prediction_type, model_output, sample, alpha_bar)
        if self.clip_sample_range is not None:
            x0 = jnp.clip(x0, -self.clip_sample_range, self.clip_sample_range)
        # Posterior mean of q(x_prev | x_t, x0), DDPM eq. (7).
        x0_coeff = alpha_bar_prev**0.5 * current_beta / beta_bar
        sample_coeff = current_alpha**0.5 * beta_bar_prev / beta_bar
        mean = x0_coeff * x0 + sample_coeff * sample

        posterior_variance = jnp.maximum(beta_bar_prev / beta_bar * current_beta, 1e-20)
        if self.variance_type == "fixed_large":
            std_dev = current_beta**0.5
        else:  # fixed_small and fixed_small_log give the same standard deviation
            std_dev = posterior_variance**0.5
        std_dev = jnp.where(t > 0, std_dev, 0.0)
        return mean + std_dev * self._noise(key, i, sample), state


# ----------------------------------------------------------------------------------------------------------
# Builders: host-side schedule construction for each kind, mirroring diffusers' set_timesteps.
# ----------------------------------------------------------------------------------------------------------


def _f32(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float32)


def _i32(values) -> np.ndarray:
    return np.asarray(values, dtype=np.int32)


def _common_fields(settings: dict, timesteps, alphas_cumprod, init_noise_sigma: float) -> dict:
    return dict(
        timesteps=_f32(timesteps),
        alphas_cumprod=_f32(alphas_cumprod),
        num_model_calls=int(len(timesteps)),
        init_noise_sigma=float(init_noise_sigma),
        prediction_type=str(settings["prediction_type"]),
    )


def _final_alpha_cumprod(settings: dict, alphas_cumprod: np.ndarray) -> np.ndarray:
    return np.float32(1.0) if settings["set_alpha_to_one"] else np.float32(alphas_cumprod[0])


def _clip_range(settings: dict) -> float | None:
    _require(not settings["thresholding"], "thresholding=True (dynamic thresholding) is not supported")
    return float(settings["clip_sample_range"]) if settings["clip_sample"] else None


# PLMS weights on (current, previous, ...) model outputs, by how many outputs are available (Adams-Bashforth).
_ADAMS_BASHFORTH = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


def _build_pndm(settings: dict, num_steps: int) -> PNDMScheduler:
    alphas_cumprod = _alphas_cumprod(settings)
    num_train = int(settings["num_train_timesteps"])
    ascending = _spaced_timesteps(settings, num_steps)[::-1].astype(np.int64)
    step_ratio = num_train // num_steps

    rows = []  # per model call: (timestep fed, alpha t, prev t, weights..., flags)

    def row(timestep, alpha_t, prev_t, current=0.0, history=(0.0, 0.0, 0.0), accumulated=0.0,
            keep=0.0, add=0.0, push=False, stash=False, use_stash=False):
        rows.append((timestep, alpha_t, prev_t, current, history, accumulated, keep, add, push, stash, use_stash))

    if settings["skip_prk_steps"]:
        # Pseudo linear multistep from the start: the second-to-last timestep is evaluated twice.
        plms = np.concatenate([ascending[:-1], ascending[-2:-1], ascending[-1:]])[::-1]
        return PNDMScheduler(**_common_fields(settings, plms, alphas_cumprod, 1.0),
                             final_alpha_cumprod=_final_alpha_cumprod(settings, alphas_cumprod),
                             **_plms_rows(plms, step_ratio), step_ratio=step_ratio)
    else:
        # Runge-Kutta warm-up: 3 steps of 4 model calls each over the last 4 timesteps, then 4th-order PLMS.
        order = 4
        if num_steps < order:
            raise ValueError(f"PNDM with Runge-Kutta steps (skip_prk_steps=False) needs >= {order} steps")
        half_ratio = step_ratio // 2
        prk = np.repeat(ascending[-order:], 2) + np.tile(np.array([0, half_ratio]), order)
        prk_timesteps = np.repeat(prk[:-1], 2)[1:-1][::-1]
        rk_weights = (1 / 6, 1 / 3, 1 / 3, 1 / 6)
        for counter, t in enumerate(prk_timesteps):
            t = int(t)
            phase = counter % 4
            prev_t = t - (0 if counter % 2 else half_ratio)
            alpha_t = int(prk_timesteps[counter // 4 * 4])
            if phase == 3:  # final RK stage: the weighted mean of the four outputs
                row(t, alpha_t, prev_t, current=rk_weights[3], accumulated=1.0, use_stash=True)
            else:
                row(t, alpha_t, prev_t, current=1.0, keep=1.0, add=rk_weights[phase],
                    push=(phase == 0), stash=(phase == 0), use_stash=(phase != 0))
        weights = _ADAMS_BASHFORTH[4]
        for t in ascending[:-3][::-1]:
            t = int(t)
            row(t, t, t - step_ratio, current=weights[0], history=tuple(weights[1:]), push=True)

    columns = list(zip(*rows))
    return PNDMScheduler(
        **_common_fields(settings, columns[0], alphas_cumprod, 1.0),
        alpha_timestep=_i32(columns[1]),
        prev_alpha_timestep=_i32(columns[2]),
        final_alpha_cumprod=_final_alpha_cumprod(settings, alphas_cumprod),
        current_weight=_f32(columns[3]),
        history_weights=_f32(columns[4]).reshape(-1, 3),
        accumulated_weight=_f32(columns[5]),
        accumulator_keep=_f32(columns[6]),
        accumulator_add=_f32(columns[7]),
        push_history=np.asarray(columns[8], dtype=bool),
        stash_sample=np.asarray(columns[9], dtype=bool),
        use_stashed_sample=np.asarray(columns[10], dtype=bool),
        step_ratio=step_ratio,
        runge_kutta=True,
    )


def _replace_from(table, start: int, rows):
    """``table`` with its rows from ``start`` on replaced by ``rows`` (as many as given); numpy stays
    numpy, and a traced table (a scheduler passed into ``jit``) is updated as one."""
    if isinstance(table, jax.Array) or isinstance(rows, jax.Array):
        return jnp.asarray(table).at[start:start + len(rows)].set(rows)
    table = np.array(table)
    table[start:start + len(rows)] = rows
    return table


def _plms_rows(timesteps, step_ratio: int) -> dict[str, Any]:
    """PNDMScheduler's tables for pseudo linear multistep steps at ``timesteps`` (the model calls
    from the one where diffusers' counter is 0): call 0 steps with its output alone and stashes its
    sample; call 1 re-steps from that sample with the average of the first two outputs (a Heun-like
    start; its output is not remembered); then Adams-Bashforth of order 2, 3 and 4. The weights
    depend on the position alone; the timesteps may be traced (a scheduler passed into ``jit``)."""
    xp = jnp if isinstance(timesteps, jax.Array) else np
    t = xp.asarray(timesteps).astype(xp.int32)
    counter = np.arange(t.shape[0])
    second = counter == 1
    rows = []
    for c in counter:
        if c == 1:
            rows.append((0.5, (0.5, 0.0, 0.0)))
            continue
        weights = _ADAMS_BASHFORTH[min((c if c == 0 else c - 1) + 1, 4)]
        rows.append((weights[0], tuple(weights[1:]) + (0.0,) * (4 - len(weights))))
    current, history = zip(*rows)
    zeros = _f32(np.zeros(len(rows)))
    return dict(alpha_timestep=t + step_ratio * _i32(second), prev_alpha_timestep=t - step_ratio * _i32(~second),
                current_weight=_f32(current), history_weights=_f32(history).reshape(-1, 3),
                accumulated_weight=zeros, accumulator_keep=zeros, accumulator_add=zeros,
                push_history=~second, stash_sample=counter == 0, use_stashed_sample=second)


def _build_ddim(settings: dict, num_steps: int) -> DDIMScheduler:
    alphas_cumprod = _alphas_cumprod(settings)
    timesteps = _spaced_timesteps(settings, num_steps).astype(np.int64)
    # diffusers steps back by num_train // N whatever the spacing.
    prev = timesteps - int(settings["num_train_timesteps"]) // num_steps
    return DDIMScheduler(
        **_common_fields(settings, timesteps, alphas_cumprod, 1.0),
        alpha_timestep=_i32(timesteps),
        prev_alpha_timestep=_i32(prev),
        final_alpha_cumprod=_final_alpha_cumprod(settings, alphas_cumprod),
        eta=float(settings["eta"]),
        clip_sample_range=_clip_range(settings),
    )


def _build_ddpm(settings: dict, num_steps: int) -> DDPMScheduler:
    if settings["variance_type"] is None:   # e.g. from a DPM-Solver config; diffusers then takes fixed_small's path
        settings = {**settings, "variance_type": "fixed_small"}
    _require(settings["variance_type"] in ("fixed_small", "fixed_small_log", "fixed_large"),
             f"DDPM variance_type {settings['variance_type']!r} is not supported")
    alphas_cumprod = _alphas_cumprod(settings)
    timesteps = _spaced_timesteps(settings, num_steps).astype(np.int64)
    prev = np.concatenate([timesteps[1:], [-1]])
    return DDPMScheduler(
        **_common_fields(settings, timesteps, alphas_cumprod, 1.0),
        prev_alpha_timestep=_i32(prev),
        variance_type=str(settings["variance_type"]),
        clip_sample_range=_clip_range(settings),
    )


def _sigma_alphas_cumprod(settings: dict) -> np.ndarray:
    alphas_cumprod = _alphas_cumprod(settings)
    if settings.get("rescale_betas_zero_snr", False):
        # Zero terminal SNR would make the largest sigma infinite; diffusers nudges it to a tiny value.
        alphas_cumprod = alphas_cumprod.copy()
        alphas_cumprod[-1] = np.float32(2.0**-24)
    return alphas_cumprod


def _sigma_init_noise(settings: dict, sigmas: np.ndarray) -> float:
    sigma_max = np.float32(sigmas.max())
    if settings["timestep_spacing"] in ("linspace", "trailing"):
        return float(sigma_max)
    return float(np.sqrt(sigma_max * sigma_max + np.float32(1.0), dtype=np.float32))


def _interpolated_sigmas(sigma_table: np.ndarray, timesteps: np.ndarray) -> np.ndarray:
    return np.interp(timesteps, np.arange(len(sigma_table)), sigma_table)


def _build_euler_family(name: str, settings: dict, num_steps: int) -> _SigmaScheduler:
    if name == "euler":
        _require(settings["interpolation_type"] == "linear", "Euler interpolation_type must be 'linear'")
        _require(settings["timestep_type"] == "discrete" or settings["prediction_type"] != "v_prediction",
                 "Euler timestep_type='continuous' with v_prediction is not supported")   # diffusers: only then
    for flag in ("use_exponential_sigmas", "use_beta_sigmas"):
        _require(not settings.get(flag, False), f"{flag} is not supported")
    alphas_cumprod = (_sigma_alphas_cumprod(settings) if name != "lms" else _alphas_cumprod(settings))
    sigma_table = _sigma_table(alphas_cumprod)
    timesteps = _spaced_timesteps(settings, num_steps, round_linspace=False)
    sigmas = _interpolated_sigmas(sigma_table, timesteps)
    if settings.get("use_karras_sigmas", False):
        # Euler may pin the ends with sigma_min/sigma_max; LMS always uses the interpolated ends.
        sigma_min = settings.get("sigma_min")
        sigma_max = settings.get("sigma_max")
        sigma_min = float(sigmas[-1]) if sigma_min is None else float(sigma_min)
        sigma_max = float(sigmas[0]) if sigma_max is None else float(sigma_max)
        sigmas = _karras_sigmas(sigma_min, sigma_max, num_steps)
        timesteps = _timesteps_for_sigmas(sigmas, sigma_table)
    final_sigma = 0.0
    if settings.get("final_sigmas_type", "zero") == "sigma_min":
        final_sigma = float(sigma_table[0])
    elif settings.get("final_sigmas_type", "zero") != "zero":
        raise ValueError(f"final_sigmas_type {settings['final_sigmas_type']!r} is not 'zero' or 'sigma_min'")
    sigmas = _f32(np.concatenate([sigmas, [final_sigma]]))
    fields = dict(
        **_common_fields(settings, _f32(timesteps), alphas_cumprod, _sigma_init_noise(settings, sigmas)),
        sigmas=sigmas,
    )
    if name == "euler":
        return EulerScheduler(**fields)
    if name == "euler_a":
        return EulerAncestralScheduler(**fields)
    # One row per model call: "trailing" spacing can give num_steps + 1 of them (diffusers too).
    weights = np.stack([_lms_coefficients(sigmas, step, min(step + 1, 4)) for step in range(len(timesteps))])
    return LMSScheduler(**fields, lms_weights=_f32(weights))


def _build_dpm_solver(settings: dict, num_steps: int, sde: bool = False) -> DPMSolverMultistepScheduler:
    if sde:   # (its schedule is the ODE solver's)
        settings = {**settings, "algorithm_type": "dpmsolver++"}
    if settings["algorithm_type"] == "deis" and settings["final_sigmas_type"] == "zero":   # as diffusers
        raise ValueError("dpmpp_2m from a config with algorithm_type='deis' needs final_sigmas_type='sigma_min' "
                         "(as in diffusers)")
    # diffusers' own substitutions, for configs written for DEIS / UniPC
    renamed = {"algorithm_type": {"deis": "dpmsolver++"}, "solver_type": dict.fromkeys(("logrho", "bh1", "bh2"),
                                                                                      "midpoint")}
    settings = {**settings, **{key: names.get(settings[key], settings[key]) for key, names in renamed.items()}}
    if settings["algorithm_type"] == "sde-dpmsolver++":   # (a config written for it: diffusers' SDE sampler)
        raise NotImplementedError("dpmpp_2m is algorithm_type='dpmsolver++'; algorithm_type='sde-dpmsolver++' is "
                                  "the dpmpp_2m_sde scheduler")
    _require(settings["algorithm_type"] == "dpmsolver++", "only algorithm_type='dpmsolver++' is supported")
    _require(settings["solver_order"] in (1, 2), "only solver_order 1 or 2 is supported")
    _require(settings["solver_type"] in ("midpoint", "heun"), "solver_type must be 'midpoint' or 'heun'")
    _require(not settings["thresholding"], "thresholding=True (dynamic thresholding) is not supported")
    _require(settings["variance_type"] not in ("learned", "learned_range"),
             f"variance_type={settings['variance_type']!r} (learned variance outputs) is not supported")
    for flag in ("use_beta_sigmas", "use_lu_lambdas", "use_flow_sigmas", "use_dynamic_shifting"):
        _require(not settings[flag], f"{flag} is not supported")
    if settings["use_karras_sigmas"] and settings["use_exponential_sigmas"]:   # (diffusers: the same error)
        raise ValueError("use_karras_sigmas and use_exponential_sigmas: only one of them can be used")

    alphas_cumprod = _sigma_alphas_cumprod(settings)
    sigma_table = _sigma_table(alphas_cumprod)
    num_train = int(settings["num_train_timesteps"])

    # Timesteps whose half-log-SNR falls below lambda_min_clipped are never used.
    log_snr = np.log(np.sqrt(alphas_cumprod)) - np.log(np.sqrt(np.float32(1.0) - alphas_cumprod))
    clipped = int(np.searchsorted(log_snr[::-1], settings["lambda_min_clipped"]))
    last_timestep = num_train - clipped
    spacing = settings["timestep_spacing"]
    # DPM-Solver spaces N + 1 points and drops the one at 0 for "linspace" and "leading".
    if spacing == "linspace":
        timesteps = np.linspace(0, last_timestep - 1, num_steps + 1).round()[::-1][:-1]
    elif spacing == "leading":
        step_ratio = last_timestep // (num_steps + 1)
        timesteps = (np.arange(num_steps + 1) * step_ratio).round()[::-1][:-1] + settings["steps_offset"]
    elif spacing == "trailing":
        timesteps = np.arange(last_timestep, 0, -num_train / num_steps).round() - 1
    else:
        raise ValueError(f"timestep_spacing {spacing!r} is not one of 'linspace', 'leading', 'trailing'")
    timesteps = timesteps.astype(np.int64)

    if settings["use_karras_sigmas"] or settings["use_exponential_sigmas"]:
        # between the config's sigma_min / sigma_max where it has them
        ends = [float(table_end if settings[key] is None else settings[key])
                for key, table_end in (("sigma_min", sigma_table[0]), ("sigma_max", sigma_table[-1]))]
        if settings["use_karras_sigmas"]:
            sigmas = _karras_sigmas(*ends, num_steps)
        else:   # evenly spaced in log sigma (A1111's "Exponential" schedule type)
            sigmas = np.exp(np.linspace(math.log(ends[1]), math.log(ends[0]), num_steps))
        timesteps = _timesteps_for_sigmas(sigmas, sigma_table)
        if settings["beta_schedule"] != "squaredcos_cap_v2" and settings["use_karras_sigmas"]:
            timesteps = timesteps.round()   # (diffusers rounds the Karras ones only)
        timesteps = timesteps.astype(np.int64)  # diffusers stores them as int64: the unrounded ones truncate
    else:
        sigmas = _interpolated_sigmas(sigma_table, timesteps)

    if settings["final_sigmas_type"] == "sigma_min":
        final_sigma = float(sigma_table[0])
    elif settings["final_sigmas_type"] == "zero":
        final_sigma = 0.0
    else:
        raise ValueError(f"final_sigmas_type {settings['final_sigmas_type']!r} is not 'zero' or 'sigma_min'")
    sigmas = _f32(np.concatenate([sigmas, [final_sigma]]))

    num_calls = len(timesteps)
    lower_order_final_step = (settings["euler_at_final"]
                              or (settings["lower_order_final"] and num_calls < 15)
                              or settings["final_sigmas_type"] == "zero")
    first_order = np.array([
        settings["solver_order"] == 1 or i == 0 or (i == num_calls - 1 and lower_order_final_step)
        for i in range(num_calls)
    ])
    return (DPMSolverSDEScheduler if sde else DPMSolverMultistepScheduler)(
        **_common_fields(settings, timesteps, alphas_cumprod, 1.0),
        sigmas=sigmas,
        first_order=first_order,
        solver_type=str(settings["solver_type"]),
    )


def make_scheduler(name: str, config: dict, num_inference_steps: int, **options) -> Scheduler:
    """Build the ``name`` scheduler from a diffusers ``scheduler_config.json`` dict.

    Equivalent to ``diffusers.<Kind>Scheduler.from_config(config, **options)`` followed by
    ``set_timesteps(num_inference_steps)``.  ``name`` is one of :data:`SCHEDULERS`:

    - ``"pndm"``: PNDMScheduler (PLMS when ``skip_prk_steps``; 50 steps -> 51 model calls),
    - ``"ddim"``: DDIMScheduler; option ``eta`` (default 0, > 0 makes it stochastic),
    - ``"euler"``: EulerDiscreteScheduler, ``"euler_a"``: EulerAncestralDiscreteScheduler,
    - ``"dpmpp_2m"``: DPMSolverMultistepScheduler (dpmsolver++, order 2); options ``use_karras_sigmas``,
      ``use_exponential_sigmas``; ``"dpmpp_2m_sde"``: the same with algorithm_type="sde-dpmsolver++"
      (stochastic: A1111's "DPM++ 2M SDE"),
    - ``"lms"``: LMSDiscreteScheduler (order 4), ``"ddpm"``: DDPMScheduler.

    ``options`` override config keys the class reads (``prediction_type``, ``timestep_spacing``,
    ``use_karras_sigmas``, ...).  Settings diffusers supports but sdjax does not raise NotImplementedError.
    """
    _check_name(name)
    if (isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer))
            or num_inference_steps < 1):
        raise ValueError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}")
    settings = resolve_scheduler_config(name, config, **options)
    if settings["prediction_type"] not in ("epsilon", "v_prediction", "sample"):
        raise ValueError(f"unsupported prediction_type {settings['prediction_type']!r}")
    offset = settings["steps_offset"]
    if isinstance(offset, bool) or not isinstance(offset, (int, np.integer)):   # diffusers: a numpy casting error
        raise ValueError(f"steps_offset must be an integer, got {offset!r}")
    eta = settings.get("eta", 0.0)
    if isinstance(eta, bool) or not isinstance(eta, (int, float, np.number)) or not 0.0 <= eta <= 1.0:
        # above 1 the DDIM variance is negative: diffusers gives NaN images
        raise ValueError(f"ddim eta must be a number in [0, 1] (0: deterministic, 1: DDPM's noise), got {eta!r}")
    num_steps = int(num_inference_steps)
    num_train = int(settings["num_train_timesteps"])
    if num_steps > num_train:
        raise ValueError(f"num_inference_steps={num_steps} is more than the model's {num_train} training timesteps")
    scheduler = _build(name, settings, num_steps)
    _check_schedule(name, settings, num_steps, scheduler)
    return scheduler


def _check_schedule(name: str, settings: dict, num_steps: int, scheduler: Scheduler) -> None:
    """Refuse schedules the solver cannot take, which diffusers runs into NaN or an IndexError."""
    num_train = int(settings["num_train_timesteps"])
    top = float(np.max(scheduler.timesteps))
    if top > num_train - 1:  # diffusers fails later with an IndexError, or silently clamps
        raise ValueError(f"{name} with {num_steps} steps (timestep_spacing={settings.get('timestep_spacing')!r}, "
                         f"steps_offset={settings.get('steps_offset')}) reaches timestep {top:g}, past the last "
                         f"training timestep {num_train - 1}: use fewer steps")
    if name in ("pndm", "ddim", "ddpm") and float(np.min(scheduler.timesteps)) < 0:
        # "trailing" at 61, 103, 121, ... steps: a rounding quirk that diffusers shares; there the last step
        # reads the noise level of timestep 999 (the sigma schedulers clamp it to timestep 0's)
        near = [n for k in range(1, 6) for n in (num_steps - k, num_steps + k)
                if 1 <= n <= num_train and float(np.min(_build(name, settings, n).timesteps)) >= 0]
        raise ValueError(f"{name} with {num_steps} steps (timestep_spacing={settings.get('timestep_spacing')!r}) "
                         "reaches timestep -1, before the first training timestep 0"
                         + (f": use {near[0]} steps" if near else ""))
    if num_steps > 1 and np.unique(scheduler.timesteps).size == 1:
        raise ValueError(f"{name} with {num_steps} steps (timestep_spacing={settings.get('timestep_spacing')!r}) "
                         f"gives every step the same timestep {top:g}: use fewer steps")
    if name in ("dpmpp_2m", "dpmpp_2m_sde"):   # a step of zero log-SNR change divides by zero (NaN, as in diffusers)
        sigmas = np.asarray(scheduler.sigmas)[:-1]
        repeated = sigmas[1:][sigmas[1:] == sigmas[:-1]]
        if repeated.size:
            raise ValueError(f"{name} with {num_steps} steps (timestep_spacing={settings.get('timestep_spacing')!r}"
                             f", lambda_min_clipped={settings.get('lambda_min_clipped')}) repeats a noise level "
                             f"(sigma {float(repeated[0]):g}), where the solver divides by zero: use fewer steps")
    if name in ("ddim", "ddpm") and settings["prediction_type"] == "epsilon" and not settings["clip_sample"]:
        alphas = np.asarray(scheduler.alphas_cumprod)[np.asarray(scheduler.timesteps).astype(np.int64)]
        if np.any(alphas == 0):   # zero terminal SNR: x0 = (x - sqrt(1 - abar) eps) / sqrt(abar) divides by zero
            # (clip_sample clips the infinite x0 back to [-1, 1], as diffusers does)
            raise ValueError(f"{name} at zero terminal SNR (rescale_betas_zero_snr) with prediction_type='epsilon': "
                             "at the last training timestep the image cannot be recovered from predicted noise; "
                             "zero-SNR schedules are for v_prediction models")


def _build(name: str, settings: dict, num_steps: int) -> Scheduler:
    if name == "pndm":
        _require(settings["prediction_type"] != "sample", "PNDM does not support prediction_type='sample'")
        return _build_pndm(settings, num_steps)
    if name == "ddim":
        return _build_ddim(settings, num_steps)
    if name == "ddpm":
        return _build_ddpm(settings, num_steps)
    if name in ("dpmpp_2m", "dpmpp_2m_sde"):
        return _build_dpm_solver(settings, num_steps, sde=name == "dpmpp_2m_sde")
    if name == "euler_a":
        _require(settings["prediction_type"] != "sample", "euler_a does not support prediction_type='sample'")
    return _build_euler_family(name, settings, num_steps)
