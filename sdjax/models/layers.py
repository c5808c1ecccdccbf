"""Building blocks shared by the UNet and the VAE (NHWC everywhere).

Module and attribute names mirror diffusers' PyTorch modules (``resnets``, ``to_q``,
``to_out[0]``...) so that `sdjax.weights` can map checkpoints with generic rules.
"""
from __future__ import annotations

import math
import os
import warnings

import jax
import jax.numpy as jnp
from flax import nnx


class Pretrained:
    """``from_pretrained`` / ``save_pretrained`` for the three models (the work is in `sdjax.weights`)."""

    @classmethod
    def from_pretrained(cls, path_or_repo_id, *, subfolder: str | None = None, revision: str | None = None,
                        dtype=jnp.float32, format: str | None = None, variant: str | None = None):
        """Load from a diffusers/transformers model folder or Hub repo id, in any supported layout
        (safetensors, Flax msgpack, PyTorch .bin), cast to ``dtype``. ``format='flax'`` prefers msgpack."""
        from sdjax import weights
        return weights.from_pretrained(cls, path_or_repo_id, subfolder=subfolder, revision=revision,
                                       dtype=dtype, format=format, variant=variant)

    def save_pretrained(self, directory, *, format: str = "both", dtype=None):
        """Write config.json and weights ('pytorch' safetensors, 'flax' msgpack, or 'both')."""
        from sdjax import weights
        return weights.save_pretrained(self, directory, format=format, dtype=dtype)


# SDJAX_ATTENTION, read once at import (set it before importing sdjax):
#   "auto" (default): the blocked CPU kernel below on the CPU when the score tensor is large, else XLA's;
#   "xla": always jax.nn.dot_product_attention's XLA implementation;
#   "cudnn": cuDNN's fused flash attention on NVIDIA GPUs for bf16/fp16 (opt-in until measured on a GPU);
#   "blocked": always the blocked kernel (tests, benchmarks; on a GPU/TPU, sampling batches whose scores
#   would not fit beside XLA's kernel).
ATTENTION_IMPLEMENTATION = os.environ.get("SDJAX_ATTENTION", "auto")
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn", "blocked")


def attention_setting_problem() -> str | None:
    """Why ``SDJAX_ATTENTION`` is not a setting sdjax knows, or None (sample.py and train.py check
    it with their other settings, before any model loads)."""
    if ATTENTION_IMPLEMENTATION not in ATTENTION_IMPLEMENTATIONS:
        return f"SDJAX_ATTENTION={ATTENTION_IMPLEMENTATION!r}: expected auto, xla, cudnn or blocked"
    return None
# Score bytes per blocked-kernel iteration. The CPU is memory-bound on the [B, N, T, S] scores (the
# softmax streams them three times); a block this size stays in cache. Of 2-16 MiB, 8 MiB was the fastest
# at 1024 tokens and within 5% at 4096 on a 2-core EPYC (BENCHMARKS.md, "Sampling on the CPU").
BLOCK_SCORE_BYTES = 8 * 2 ** 20
# On a GPU/TPU (SDJAX_ATTENTION=blocked) the point is memory, not cache: blocks this size are still
# matmuls that fill the device, and a few of them replace a score tensor of tens of GiB (at 512 px, 1 GiB
# per image with guidance for each 4096-token layer). Not yet timed on a GPU.
ACCELERATOR_BLOCK_SCORE_BYTES = 2 ** 30


def attention(q_BTNH, k_BSNH, v_BSNH, *, is_causal: bool = False, upcast: bool = False):
    """Multi-head scaled dot-product attention; the one attention op of sdjax.

    Inputs are [batch, length, heads, head_dim]; the scale is 1/sqrt(head_dim) and the softmax is
    fp32, as ``jax.nn.dot_product_attention`` does. ``upcast`` computes in fp32 (diffusers'
    ``upcast_attention`` / ``upcast_softmax``) and casts back. `ATTENTION_IMPLEMENTATION` picks the
    kernel: on the CPU, score tensors over `BLOCK_SCORE_BYTES` go through `blocked_attention`
    (3-4x faster at 1024+ tokens); with ``"cudnn"``, shapes and dtypes cuDNN accepts use its fused
    kernel and the rest fall back to XLA's.
    """
    if problem := attention_setting_problem():
        raise ValueError(problem)
    dtype = q_BTNH.dtype
    # XLA:CPU has no fp16 x fp16 -> fp32 dot (jax.nn.dot_product_attention's, blocked_attention's):
    # fp16 attention there runs in fp32.
    upcast = upcast or (dtype == jnp.float16 and jax.default_backend() == "cpu")
    if upcast and dtype != jnp.float32:
        q_BTNH, k_BSNH, v_BSNH = (a.astype(jnp.float32) for a in (q_BTNH, k_BSNH, v_BSNH))
    if ATTENTION_IMPLEMENTATION == "cudnn" and q_BTNH.dtype in (jnp.bfloat16, jnp.float16):
        # JAX checks cuDNN's shape/dtype/version limits while tracing, and those errors fall back here; an
        # error cuDNN itself raises later, when XLA compiles the program, is not caught (unset SDJAX_ATTENTION).
        try:
            out = jax.nn.dot_product_attention(q_BTNH, k_BSNH, v_BSNH, is_causal=is_causal, implementation="cudnn")
            return out.astype(dtype)
        except (ValueError, NotImplementedError, RuntimeError, TypeError) as e:
            _warn_cudnn_refused(q_BTNH, k_BSNH, e)
    (B, T, N, _), S = q_BTNH.shape, k_BSNH.shape[1]
    large = B * N * T * S * 4 > BLOCK_SCORE_BYTES
    if not is_causal and (ATTENTION_IMPLEMENTATION == "blocked"
                          or (ATTENTION_IMPLEMENTATION == "auto" and large and jax.default_backend() == "cpu")):
        return blocked_attention(q_BTNH, k_BSNH, v_BSNH).astype(dtype)
    out = jax.nn.dot_product_attention(q_BTNH, k_BSNH, v_BSNH, is_causal=is_causal)
    return out.astype(dtype)


_CUDNN_REFUSALS: set[tuple] = set()


def _warn_cudnn_refused(q_BTNH, k_BSNH, error: Exception) -> None:
    """Once per shape: SDJAX_ATTENTION=cudnn asked for the fused kernel, and this attention runs XLA's."""
    key = (q_BTNH.shape, k_BSNH.shape, str(q_BTNH.dtype))
    if key not in _CUDNN_REFUSALS:
        _CUDNN_REFUSALS.add(key)
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        warnings.warn(f"SDJAX_ATTENTION=cudnn: cuDNN's fused attention refused q {q_BTNH.shape} / k "
                      f"{k_BSNH.shape} {q_BTNH.dtype} ({reason}); that attention runs XLA's kernel", stacklevel=3)


def blocked_attention(q_BTNH, k_BSNH, v_BSNH, *, block_bytes: int | None = None):
    """Attention one head and one block of queries at a time (``lax.map``), so that each block's
    fp32 scores [B, Tq, S] fit in ``block_bytes`` (default: `BLOCK_SCORE_BYTES` on the CPU, to stay in
    cache; `ACCELERATOR_BLOCK_SCORE_BYTES` elsewhere, to bound memory). Same math as XLA's kernel; the
    batch axis stays whole, so a batch sharded over devices stays sharded."""
    (B, T, _, H), S = q_BTNH.shape, k_BSNH.shape[1]
    if block_bytes is None:
        block_bytes = BLOCK_SCORE_BYTES if jax.default_backend() == "cpu" else ACCELERATOR_BLOCK_SCORE_BYTES
    # The largest divisor of T (of 16 or more queries) whose scores fit, else the smallest such one: T
    # need not halve evenly (600 x 800 px: 7500 tokens, where halving stopped at blocks of 1875).
    divisors = sorted({d for i in range(1, math.isqrt(T) + 1) if T % i == 0 for d in (i, T // i)
                       if d >= min(16, T)})
    block = max((d for d in divisors if B * d * S * 4 <= block_bytes), default=divisors[0])
    scale = 1.0 / math.sqrt(H)
    precision = {"bfloat16": jax.lax.DotAlgorithmPreset.BF16_BF16_F32,
                 "float16": jax.lax.DotAlgorithmPreset.F16_F16_F32}.get(jnp.dtype(q_BTNH.dtype).name)

    def one_head(qkv):
        q_BTH, k_BSH, v_BSH = qkv

        def one_block(q_BtH):
            logits = jnp.einsum("bth,bsh->bts", q_BtH, k_BSH, precision=precision,
                                preferred_element_type=jnp.float32) * scale
            probs = jax.nn.softmax(logits, axis=-1).astype(v_BSH.dtype)
            return jnp.einsum("bts,bsh->bth", probs, v_BSH)

        if block == T:
            return one_block(q_BTH)
        out_KBtH = jax.lax.map(one_block, q_BTH.reshape(B, T // block, block, H).transpose(1, 0, 2, 3))
        return out_KBtH.transpose(1, 0, 2, 3).reshape(B, T, H)

    out_NBTH = jax.lax.map(one_head, tuple(a.transpose(2, 0, 1, 3) for a in (q_BTNH, k_BSNH, v_BSNH)))
    return out_NBTH.transpose(1, 2, 0, 3)


def check_config_ints(model: str, config, *names: str, per_block: bool = False) -> None:
    """Each config field in ``names`` is a positive int (``per_block``: a non-empty tuple of them;
    a list becomes a tuple); a ValueError names the field otherwise (a config.json with a string or
    a float there)."""
    for name in names:
        value = getattr(config, name)
        if per_block and isinstance(value, list):
            value = tuple(value)
            object.__setattr__(config, name, value)  # frozen dataclass: the configs are hashed
        values = value if per_block and isinstance(value, tuple) else (value,)
        if (per_block and not isinstance(value, tuple)) or not values or not all(
                isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
            raise ValueError(f"{model} config {name}={value!r}: expected "
                             + ("a list of positive integers" if per_block else "a positive integer"))


def check_config_floats(model: str, config, *names: str, positive: bool = False) -> None:
    """Each config field in ``names`` is a finite real number (``positive``: above 0); a ValueError
    names the field otherwise (a string or null in config.json would fail later, inside a trace)."""
    for name in names:
        value = getattr(config, name)
        if (not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)
                or (positive and value <= 0)):
            raise ValueError(f"{model} config {name}={value!r}: expected a "
                             + ("positive number" if positive else "number"))


def check_config_flags(model: str, config, *names: str) -> None:
    """Each config field in ``names`` is true or false (0 / 1 become them); a ValueError names the
    field otherwise (the string "false" would read as true)."""
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, bool):
            if type(value) is not int or value not in (0, 1):
                raise ValueError(f"{model} config {name}={value!r}: expected true or false")
            object.__setattr__(config, name, bool(value))  # frozen dataclass


def check_nhwc(name: str, x, channels: int) -> None:
    """A ValueError naming ``name`` unless ``x`` is [B, H, W, channels]: XLA's own error for an NCHW
    array (the PyTorch layout, the usual mistake) names a convolution deep inside the model."""
    shape = tuple(x.shape)
    if len(shape) == 4 and shape[-1] == channels:
        return
    hint = ("; it looks like NCHW: sdjax takes NHWC, x.transpose(0, 2, 3, 1)"
            if len(shape) == 4 and shape[1] == channels else "")
    raise ValueError(f"{name} has shape {shape}; expected [batch, height, width, {channels}] (NHWC){hint}")


def conv(in_ch, out_ch, kernel_size=3, *, stride=1, padding=None, dtype, param_dtype, rngs):
    """A Conv2d with PyTorch's explicit symmetric padding (default: 'same' for odd kernels)."""
    pad = kernel_size // 2 if padding is None else padding
    return nnx.Conv(in_ch, out_ch, (kernel_size, kernel_size), strides=stride,
                    padding=((pad, pad), (pad, pad)), dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def group_norm(channels, groups, eps, *, dtype, param_dtype, rngs):
    # Two-pass variance: the one-pass E[x^2]-E[x]^2 form drifts from PyTorch by ~1e-5.
    return nnx.GroupNorm(channels, num_groups=groups, epsilon=eps, use_fast_variance=False,
                         dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def layer_norm(dim, eps, *, dtype, param_dtype, rngs):
    return nnx.LayerNorm(dim, epsilon=eps, use_fast_variance=False,
                         dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def timestep_embedding(timesteps_B, dim: int, *, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: float = 10000.0):
    """Sinusoidal timestep features [B, dim] as in diffusers' ``get_timestep_embedding``."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    angles_BF = timesteps_B.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    sin, cos = jnp.sin(angles_BF), jnp.cos(angles_BF)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class ResnetBlock2D(nnx.Module):
    """GroupNorm-SiLU-Conv twice, with an optional time-embedding bias and a 1x1 shortcut."""

    def __init__(self, in_ch, out_ch, *, temb_ch, groups, eps, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = group_norm(in_ch, groups, eps, **kw)
        self.conv1 = conv(in_ch, out_ch, 3, **kw)
        self.time_emb_proj = nnx.Linear(temb_ch, out_ch, **kw) if temb_ch else None
        self.norm2 = group_norm(out_ch, groups, eps, **kw)
        self.conv2 = conv(out_ch, out_ch, 3, **kw)
        self.conv_shortcut = conv(in_ch, out_ch, 1, **kw) if in_ch != out_ch else None

    def __call__(self, x_BHWC, temb_BD=None):
        h = self.conv1(jax.nn.silu(self.norm1(x_BHWC)))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(jax.nn.silu(temb_BD))[:, None, None, :]
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        shortcut = x_BHWC if self.conv_shortcut is None else self.conv_shortcut(x_BHWC)
        return shortcut + h


class Downsample2D(nnx.Module):
    """Stride-2 3x3 conv. ``padding=0`` is the VAE's form: pad right/bottom by one first."""

    def __init__(self, ch, *, padding, dtype, param_dtype, rngs):
        self.asymmetric = padding == 0
        self.conv = conv(ch, ch, 3, stride=2, padding=padding, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x_BHWC):
        if self.asymmetric:
            x_BHWC = jnp.pad(x_BHWC, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return self.conv(x_BHWC)


def nearest_resize(x_BHWC, size_HW):
    """PyTorch ``interpolate(mode='nearest')``: source index floor(dst * in / out)."""
    (h, w), (H, W) = x_BHWC.shape[1:3], size_HW
    if (H, W) == (2 * h, 2 * w):  # the common case: a plain repeat
        return jnp.repeat(jnp.repeat(x_BHWC, 2, axis=1), 2, axis=2)
    rows = (jnp.arange(H) * h) // H
    cols = (jnp.arange(W) * w) // W
    return x_BHWC[:, rows][:, :, cols]


class Upsample2D(nnx.Module):
    """Nearest-neighbour 2x (or to an explicit size, for odd skip shapes), then a 3x3 conv."""

    def __init__(self, ch, *, dtype, param_dtype, rngs):
        self.conv = conv(ch, ch, 3, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x_BHWC, size_HW=None):
        size_HW = size_HW or (2 * x_BHWC.shape[1], 2 * x_BHWC.shape[2])
        return self.conv(nearest_resize(x_BHWC, size_HW))


class Attention(nnx.Module):
    """diffusers' ``Attention``: to_q/to_k/to_v, heads, to_out[0]; optional GroupNorm + residual (VAE)."""

    def __init__(self, query_dim, *, heads, head_dim, context_dim=None, qkv_bias=False,
                 norm_groups=None, norm_eps=1e-6, residual=False, upcast=False,
                 dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        inner = heads * head_dim
        self.heads, self.head_dim, self.residual, self.upcast = heads, head_dim, residual, upcast
        self.group_norm = group_norm(query_dim, norm_groups, norm_eps, **kw) if norm_groups else None
        self.to_q = nnx.Linear(query_dim, inner, use_bias=qkv_bias, **kw)
        self.to_k = nnx.Linear(context_dim or query_dim, inner, use_bias=qkv_bias, **kw)
        self.to_v = nnx.Linear(context_dim or query_dim, inner, use_bias=qkv_bias, **kw)
        self.to_out = nnx.List([nnx.Linear(inner, query_dim, **kw)])

    def __call__(self, x_BTC, context_BSD=None):
        residual = x_BTC
        if self.group_norm is not None:
            x_BTC = self.group_norm(x_BTC)
        context_BSD = x_BTC if context_BSD is None else context_BSD
        split = lambda t: t.reshape(*t.shape[:2], self.heads, self.head_dim)  # noqa: E731
        q, k, v = split(self.to_q(x_BTC)), split(self.to_k(context_BSD)), split(self.to_v(context_BSD))
        out = attention(q, k, v, upcast=self.upcast)
        out = self.to_out[0](out.reshape(*out.shape[:2], -1))
        return out + residual if self.residual else out
