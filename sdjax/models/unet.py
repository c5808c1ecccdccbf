"""The Stable Diffusion UNet (diffusers' ``UNet2DConditionModel``) in Flax NNX, NHWC.

Built from a diffusers ``unet/config.json``. SD 1.x keys are covered, and the SD 2.x ones
(``use_linear_projection``, per-block ``attention_head_dim`` lists, ``upcast_attention``).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sdjax.models.layers import (Pretrained, Attention, Downsample2D, ResnetBlock2D, Upsample2D, check_config_flags,
                                 check_config_floats, check_config_ints, check_nhwc, conv, group_norm, layer_norm,
                                 timestep_embedding)


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """The UNet's architecture (diffusers' ``UNet2DConditionModel`` config fields sdjax builds;
    defaults: SD v1.5's). Per-block values are tuples, one per down block."""
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    down_block_types: tuple = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    block_out_channels: tuple = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    downsample_padding: int = 1
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: tuple = (768,) * 4
    num_attention_heads: tuple = (8,) * 4        # per down block
    transformer_layers_per_block: tuple = (1,) * 4
    use_linear_projection: bool = False
    upcast_attention: bool = False
    sample_size: int = 64

    # Keys whose non-default value means an architecture this module does not build.
    _UNSUPPORTED = {"class_embed_type": None, "addition_embed_type": None, "encoder_hid_dim": None,
                    "time_cond_proj_dim": None, "dual_cross_attention": False, "only_cross_attention": False,
                    "resnet_time_scale_shift": "default", "time_embedding_type": "positional",
                    "act_fn": "silu", "conv_in_kernel": 3, "conv_out_kernel": 3, "mid_block_scale_factor": 1,
                    "num_class_embeds": None, "mid_block_type": "UNetMidBlock2DCrossAttn",
                    "reverse_transformer_layers_per_block": None, "attention_type": "default",
                    # these add no weights (or none that strict loading would miss) but change the output
                    "timestep_post_act": None, "time_embedding_act_fn": None, "time_embedding_dim": None,
                    "resnet_out_scale_factor": 1, "resnet_skip_time_act": False, "cross_attention_norm": None,
                    "class_embeddings_concat": False, "encoder_hid_dim_type": None,
                    "addition_time_embed_dim": None}

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> "UNetConfig":
        """From a ``unet/config.json`` dict: one number for every block is spread over the blocks, and a
        setting for an architecture sdjax does not build (SDXL's added embeddings, ...) is a
        NotImplementedError naming it."""
        for key, ok in cls._UNSUPPORTED.items():
            value = cfg.get(key, ok)
            if isinstance(value, (list, tuple)) and key == "only_cross_attention":
                value = any(value)
            if value != ok and not (isinstance(ok, int) and not isinstance(ok, bool)
                                    and isinstance(value, (int, float)) and float(value) == ok):
                sdxl = " (an SDXL UNet: sdjax builds SD 1.x / 2.x ones)" if value == "text_time" else ""
                raise NotImplementedError(f"UNet config {key}={value!r} is not supported (expected {ok!r}){sdxl}")
        for key in ("down_block_types", "up_block_types", "block_out_channels"):
            if key in cfg and not isinstance(cfg[key], (list, tuple)):
                raise ValueError(f"UNet config {key}={cfg[key]!r}: expected a list, one entry per block")
        n = len(cfg.get("down_block_types", cls.down_block_types))
        per_block = lambda v: tuple(v) if isinstance(v, (list, tuple)) else (v,) * n  # noqa: E731
        # diffusers reads SD's "attention_head_dim" as the number of heads when num_attention_heads is unset.
        heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8)
        known = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in cfg.items() if k in known}
        kw.update(
            down_block_types=tuple(cfg.get("down_block_types", cls.down_block_types)),
            up_block_types=tuple(cfg.get("up_block_types", cls.up_block_types)),
            block_out_channels=tuple(cfg.get("block_out_channels", cls.block_out_channels)),
            cross_attention_dim=per_block(cfg.get("cross_attention_dim", 768)),
            num_attention_heads=per_block(heads),
            transformer_layers_per_block=per_block(cfg.get("transformer_layers_per_block", 1)),
        )
        if isinstance(kw.get("layers_per_block"), (list, tuple)):   # (another non-integer: __post_init__ says so)
            raise NotImplementedError(f"UNet config layers_per_block={kw['layers_per_block']!r}: per-block lists "
                                      "are not supported")
        return cls(**kw)

    def __post_init__(self):
        """Refuse a config whose parts do not fit together, naming the fields (instead of an
        IndexError or a shape error from deep inside the model's construction)."""
        check_config_ints("UNet", self, "in_channels", "out_channels", "layers_per_block", "norm_num_groups")
        check_config_ints("UNet", self, "block_out_channels", "cross_attention_dim", "num_attention_heads",
                          "transformer_layers_per_block", per_block=True)
        check_config_floats("UNet", self, "freq_shift")
        check_config_floats("UNet", self, "norm_eps", positive=True)
        check_config_flags("UNet", self, "center_input_sample", "flip_sin_to_cos", "use_linear_projection",
                           "upcast_attention")
        n = len(self.block_out_channels)
        for name in ("down_block_types", "up_block_types", "cross_attention_dim", "num_attention_heads",
                     "transformer_layers_per_block"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"UNet config {name}={list(getattr(self, name))} has {len(getattr(self, name))} "
                                 f"entries; block_out_channels={list(self.block_out_channels)} has {n}")
        for name, kinds in (("down_block_types", ("DownBlock2D", "CrossAttnDownBlock2D")),
                            ("up_block_types", ("UpBlock2D", "CrossAttnUpBlock2D"))):
            if unknown := [k for k in getattr(self, name) if k not in kinds]:
                raise NotImplementedError(f"UNet config {name}: {unknown} not supported (only {', '.join(kinds)})")
        for ch, heads in zip(self.block_out_channels, self.num_attention_heads):
            if ch % self.norm_num_groups:
                raise ValueError(f"UNet config: block_out_channels {ch} is not divisible by norm_num_groups "
                                 f"{self.norm_num_groups}")
            if ch % heads:
                raise ValueError(f"UNet config: block_out_channels {ch} is not divisible by its attention head "
                                 f"count {heads} (attention_head_dim / num_attention_heads)")


class TimestepEmbedding(nnx.Module):
    def __init__(self, in_dim, out_dim, *, dtype, param_dtype, rngs):
        self.linear_1 = nnx.Linear(in_dim, out_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.linear_2 = nnx.Linear(out_dim, out_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x):
        return self.linear_2(jax.nn.silu(self.linear_1(x)))


class GEGLU(nnx.Module):
    def __init__(self, dim, inner, *, dtype, param_dtype, rngs):
        self.proj = nnx.Linear(dim, 2 * inner, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x):
        hidden, gate = jnp.split(self.proj(x), 2, axis=-1)
        return hidden * jax.nn.gelu(gate, approximate=False)  # exact gelu, as diffusers


class FeedForward(nnx.Module):
    """``ff.net = [GEGLU, Dropout, Linear]`` (index 1 has no weights)."""

    def __init__(self, dim, *, dtype, param_dtype, rngs):
        inner = 4 * dim
        self.net = nnx.List([GEGLU(dim, inner, dtype=dtype, param_dtype=param_dtype, rngs=rngs),
                             nnx.Dropout(0.0),
                             nnx.Linear(inner, dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)])

    def __call__(self, x):
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(nnx.Module):
    def __init__(self, dim, *, heads, context_dim, upcast, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        head_dim = dim // heads
        self.norm1 = layer_norm(dim, 1e-5, **kw)
        self.attn1 = Attention(dim, heads=heads, head_dim=head_dim, upcast=upcast, **kw)
        self.norm2 = layer_norm(dim, 1e-5, **kw)
        self.attn2 = Attention(dim, heads=heads, head_dim=head_dim, context_dim=context_dim, upcast=upcast, **kw)
        self.norm3 = layer_norm(dim, 1e-5, **kw)
        self.ff = FeedForward(dim, **kw)

    def __call__(self, x_BTC, context_BSD):
        x_BTC = x_BTC + self.attn1(self.norm1(x_BTC))
        x_BTC = x_BTC + self.attn2(self.norm2(x_BTC), context_BSD)
        return x_BTC + self.ff(self.norm3(x_BTC))


class Transformer2DModel(nnx.Module):
    """GroupNorm (eps 1e-6) -> proj_in -> transformer blocks on [B, HW, C] -> proj_out -> + input."""

    def __init__(self, ch, *, heads, context_dim, layers, groups, linear_projection, upcast,
                 dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        proj = (lambda: nnx.Linear(ch, ch, **kw)) if linear_projection else (lambda: conv(ch, ch, 1, **kw))
        self.norm = group_norm(ch, groups, 1e-6, **kw)
        self.proj_in = proj()
        self.transformer_blocks = nnx.List([
            BasicTransformerBlock(ch, heads=heads, context_dim=context_dim, upcast=upcast, **kw)
            for _ in range(layers)])
        self.proj_out = proj()

    def __call__(self, x_BHWC, context_BSD):
        B, H, W, C = x_BHWC.shape
        h = self.proj_in(self.norm(x_BHWC)).reshape(B, H * W, C)  # 1x1 conv == linear in NHWC
        for block in self.transformer_blocks:
            h = block(h, context_BSD)
        return self.proj_out(h.reshape(B, H, W, C)) + x_BHWC


class UNetBlock(nnx.Module):
    """One down or up block: resnets (+ a transformer after each), then a resampler.

    Covers ``DownBlock2D``, ``CrossAttnDownBlock2D``, ``UpBlock2D`` and ``CrossAttnUpBlock2D``;
    an up block concatenates one skip connection before each resnet.
    """

    def __init__(self, kind, *, resnet_in_chs, out_ch, temb_ch, add_resample, cfg: UNetConfig,
                 heads, context_dim, transformer_layers, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        groups, eps = cfg.norm_num_groups, cfg.norm_eps
        self.is_up = kind.startswith(("UpBlock", "CrossAttnUp"))
        self.resnets = nnx.List([ResnetBlock2D(c, out_ch, temb_ch=temb_ch, groups=groups, eps=eps, **kw)
                                 for c in resnet_in_chs])
        if kind.startswith("CrossAttn"):
            self.attentions = nnx.List([
                Transformer2DModel(out_ch, heads=heads, context_dim=context_dim, layers=transformer_layers,
                                   groups=groups, linear_projection=cfg.use_linear_projection,
                                   upcast=cfg.upcast_attention, **kw)
                for _ in resnet_in_chs])
        else:
            self.attentions = None
        if add_resample and self.is_up:
            self.upsamplers = nnx.List([Upsample2D(out_ch, **kw)])
        elif add_resample:
            self.downsamplers = nnx.List([Downsample2D(out_ch, padding=cfg.downsample_padding, **kw)])

    def __call__(self, x_BHWC, temb_BD, context_BSD, skips=(), upsample_size=None):
        """Down: returns (x, outputs to skip). Up: consumes ``skips`` (this block's, last first)."""
        outputs = []
        for i, resnet in enumerate(self.resnets):
            if self.is_up:
                x_BHWC = jnp.concatenate([x_BHWC, skips[-1 - i]], axis=-1)
            x_BHWC = resnet(x_BHWC, temb_BD)
            if self.attentions is not None:
                x_BHWC = self.attentions[i](x_BHWC, context_BSD)
            outputs.append(x_BHWC)
        if self.is_up:
            if hasattr(self, "upsamplers"):
                x_BHWC = self.upsamplers[0](x_BHWC, upsample_size)
            return x_BHWC
        if hasattr(self, "downsamplers"):
            x_BHWC = self.downsamplers[0](x_BHWC)
            outputs.append(x_BHWC)
        return x_BHWC, tuple(outputs)


class MidBlock(nnx.Module):
    """``UNetMidBlock2DCrossAttn``: resnet, transformer, resnet."""

    def __init__(self, ch, *, temb_ch, cfg: UNetConfig, heads, context_dim, transformer_layers,
                 dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List([ResnetBlock2D(ch, ch, temb_ch=temb_ch, groups=cfg.norm_num_groups,
                                               eps=cfg.norm_eps, **kw) for _ in range(2)])
        self.attentions = nnx.List([Transformer2DModel(
            ch, heads=heads, context_dim=context_dim, layers=transformer_layers, groups=cfg.norm_num_groups,
            linear_projection=cfg.use_linear_projection, upcast=cfg.upcast_attention, **kw)])

    def __call__(self, x_BHWC, temb_BD, context_BSD):
        x_BHWC = self.resnets[0](x_BHWC, temb_BD)
        x_BHWC = self.attentions[0](x_BHWC, context_BSD)
        return self.resnets[1](x_BHWC, temb_BD)


def down_blocks(cfg: UNetConfig, temb_ch: int, **kw) -> nnx.List:
    """The down blocks of a UNet (and of a ControlNet, a copy of them) of ``cfg``."""
    chs, n, blocks, out_ch = cfg.block_out_channels, cfg.layers_per_block, [], cfg.block_out_channels[0]
    for i, kind in enumerate(cfg.down_block_types):
        in_ch, out_ch = out_ch, chs[i]
        blocks.append(UNetBlock(kind, resnet_in_chs=[in_ch] + [out_ch] * (n - 1), out_ch=out_ch,
                                temb_ch=temb_ch, add_resample=i < len(chs) - 1, cfg=cfg,
                                heads=cfg.num_attention_heads[i], context_dim=cfg.cross_attention_dim[i],
                                transformer_layers=cfg.transformer_layers_per_block[i], **kw))
    return nnx.List(blocks)


def mid_block(cfg: UNetConfig, temb_ch: int, **kw) -> MidBlock:
    return MidBlock(cfg.block_out_channels[-1], temb_ch=temb_ch, cfg=cfg, heads=cfg.num_attention_heads[-1],
                    context_dim=cfg.cross_attention_dim[-1],
                    transformer_layers=cfg.transformer_layers_per_block[-1], **kw)


def skip_channels(cfg: UNetConfig) -> list[int]:
    """The channels of each output the down blocks pass on (conv_in's first): the UNet's skip
    connections, and a ControlNet's residuals for them."""
    chs, out = cfg.block_out_channels, [cfg.block_out_channels[0]]
    for i, ch in enumerate(chs):
        out += [ch] * (cfg.layers_per_block + (i < len(chs) - 1))
    return out


def time_embedding_of(model, timesteps, batch: int, dtype) -> jax.Array:
    """The time embedding [batch, 4 * C] of a UNet's or ControlNet's ``timesteps`` (a scalar or one a sample)."""
    if jnp.shape(timesteps) not in ((), (1,), (batch,)):   # e.g. doubled for guidance, the samples not
        raise ValueError(f"timesteps has shape {jnp.shape(timesteps)}; expected a scalar or one per sample "
                         f"([{batch}], sample_BHWC's batch)")
    t_B = jnp.broadcast_to(jnp.asarray(timesteps), (batch,))
    t_emb = timestep_embedding(t_B, model.config.block_out_channels[0],
                               flip_sin_to_cos=model.config.flip_sin_to_cos, freq_shift=model.config.freq_shift)
    return model.time_embedding(t_emb.astype(dtype))


def check_context(sample_BHWC, context_BSD, cfg: UNetConfig) -> None:
    """A ValueError unless the text states are [the sample's batch, tokens, a cross_attention_dim]."""
    widths, context_shape = set(cfg.cross_attention_dim), tuple(context_BSD.shape)
    if (len(context_shape) != 3 or context_shape[0] != sample_BHWC.shape[0]
            or (len(widths) == 1 and context_shape[-1] not in widths)):
        raise ValueError(f"encoder_hidden_states_BSD has shape {context_shape}; expected [batch "
                         f"{sample_BHWC.shape[0]} (the sample's), tokens, {' or '.join(map(str, sorted(widths)))} "
                         "(cross_attention_dim)]")


class UNet2DConditionModel(nnx.Module, Pretrained):
    """Predicts the noise (or v) in ``sample`` at ``timesteps`` given text states.

    ``__call__(sample [B, h, w, 4], timesteps [B] or scalar, encoder_hidden_states [B, 77, 768])``.
    Load real weights with ``UNet2DConditionModel.from_pretrained(path, subfolder="unet")``.
    """

    def __init__(self, config: UNetConfig | dict, *, dtype=jnp.float32, param_dtype=None, remat: bool = False,
                 rngs: nnx.Rngs):
        cfg = config if isinstance(config, UNetConfig) else UNetConfig.from_dict(config)
        self.config = cfg
        self.dtype = dtype
        self.remat = remat  # gradient checkpointing: recompute each block's activations in the backward pass
        kw = dict(dtype=dtype, param_dtype=param_dtype or dtype, rngs=rngs)
        chs, n = cfg.block_out_channels, cfg.layers_per_block
        temb_ch = 4 * chs[0]
        self.conv_in = conv(cfg.in_channels, chs[0], 3, **kw)
        self.time_embedding = TimestepEmbedding(chs[0], temb_ch, **kw)

        self.down_blocks = down_blocks(cfg, temb_ch, **kw)
        self.mid_block = mid_block(cfg, temb_ch, **kw)

        up, rev = [], list(reversed(chs))
        rev_heads, rev_ctx = cfg.num_attention_heads[::-1], cfg.cross_attention_dim[::-1]
        rev_layers = cfg.transformer_layers_per_block[::-1]
        prev_ch = rev[0]
        for i, kind in enumerate(cfg.up_block_types):
            out_ch, skip_in = rev[i], rev[min(i + 1, len(chs) - 1)]
            # resnet j sees the previous output plus one skip; the last skip comes from the block below.
            ins = [(prev_ch if j == 0 else out_ch) + (skip_in if j == n else out_ch) for j in range(n + 1)]
            up.append(UNetBlock(kind, resnet_in_chs=ins, out_ch=out_ch, temb_ch=temb_ch,
                                add_resample=i < len(chs) - 1, cfg=cfg, heads=rev_heads[i],
                                context_dim=rev_ctx[i], transformer_layers=rev_layers[i], **kw))
            prev_ch = out_ch
        self.up_blocks = nnx.List(up)
        self.conv_norm_out = group_norm(chs[0], cfg.norm_num_groups, cfg.norm_eps, **kw)
        self.conv_out = conv(chs[0], cfg.out_channels, 3, **kw)

    def __call__(self, sample_BHWC, timesteps, encoder_hidden_states_BSD, down_block_additional_residuals=None,
                 mid_block_additional_residual=None):
        """The prediction [B, h, w, out_channels]. ``down_block_additional_residuals`` (a tuple, one
        [B, h_k, w_k, C_k] per skip connection, conv_in's first: `skip_channels`) and
        ``mid_block_additional_residual`` are added to the skip connections and to the mid block's
        output, as diffusers' UNet takes a ControlNet's (`sdjax.models.ControlNetModel`)."""
        check_nhwc("sample_BHWC", sample_BHWC, self.config.in_channels)
        check_context(sample_BHWC, encoder_hidden_states_BSD, self.config)
        x = sample_BHWC.astype(self.dtype)
        context = encoder_hidden_states_BSD.astype(self.dtype)
        if self.config.center_input_sample:
            x = 2 * x - 1.0
        temb = time_embedding_of(self, timesteps, x.shape[0], self.dtype)

        def run(block, *args, **static):
            if not self.remat:
                return block(*args, **static)
            # Only each block's inputs are kept for the backward pass. jax.checkpoint of a pure function
            # (weights in, activations out) works at any trace level; nnx.remat would write the block's
            # weights back, which fails where they come from an outer trace (a lax.scan over steps).
            graphdef, weights = nnx.split(block)
            return jax.checkpoint(lambda w, *a: nnx.merge(graphdef, w)(*a, **static))(weights, *args)

        x = self.conv_in(x)
        skips = (x,)
        for block in self.down_blocks:
            x, outs = run(block, x, temb, context)
            skips += outs
        if down_block_additional_residuals is not None:
            residuals = tuple(down_block_additional_residuals)
            if [tuple(r.shape) for r in residuals] != [tuple(s.shape) for s in skips]:
                raise ValueError(f"down_block_additional_residuals have shapes {[tuple(r.shape) for r in residuals]}; "
                                 f"the skip connections' are {[tuple(s.shape) for s in skips]}")
            skips = tuple(s + r.astype(s.dtype) for s, r in zip(skips, residuals))
        x = run(self.mid_block, x, temb, context)
        if mid_block_additional_residual is not None:
            if tuple(mid_block_additional_residual.shape) != tuple(x.shape):
                raise ValueError(f"mid_block_additional_residual has shape {tuple(mid_block_additional_residual.shape)}"
                                 f"; the mid block's output is {tuple(x.shape)}")
            x = x + mid_block_additional_residual.astype(x.dtype)
        for block in self.up_blocks:
            n = len(block.resnets)
            skips, block_skips = skips[:-n], skips[-n:]
            # Upsample to the spatial size of the next block's skips (odd latent sizes).
            upsample_size = tuple(skips[-1].shape[1:3]) if skips else None
            x = run(block, x, temb, context, block_skips, upsample_size=upsample_size)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))
