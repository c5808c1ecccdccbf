"""ControlNet (diffusers' ``ControlNetModel``) in Flax NNX, NHWC: a copy of the UNet's down and mid
blocks that reads a control image (edges, depth, a pose) beside the latents and returns one residual
for each of the UNet's skip connections and one for its mid block, which the UNet adds
(`UNet2DConditionModel.__call__`'s ``down_block_additional_residuals``, ``mid_block_additional_residual``).

Built from a diffusers ControlNet ``config.json`` (``lllyasviel/control_v11p_sd15_canny`` and the like).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sdjax.models.layers import Pretrained, check_config_ints, check_nhwc, conv
from sdjax.models.unet import (TimestepEmbedding, UNetConfig, check_context, down_blocks, mid_block,
                               skip_channels, time_embedding_of)


@dataclasses.dataclass(frozen=True)
class ControlNetConfig(UNetConfig):
    """A ControlNet's architecture: the UNet fields of its down and mid blocks (defaults: SD v1.5's),
    and its control image's encoder (diffusers' ``ControlNetConditioningEmbedding``)."""
    conditioning_channels: int = 3
    conditioning_embedding_out_channels: tuple = (16, 32, 96, 256)
    controlnet_conditioning_channel_order: str = "rgb"

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> "ControlNetConfig":
        """From a ControlNet ``config.json`` dict (a setting sdjax does not build is a
        NotImplementedError naming it, as for the UNet)."""
        if cfg.get("global_pool_conditions", False):
            raise NotImplementedError("ControlNet config global_pool_conditions=True (shuffle-style ControlNets) is "
                                      "not supported")
        n = len(cfg.get("down_block_types", cls.down_block_types))
        embedding = cfg.get("conditioning_embedding_out_channels", cls.conditioning_embedding_out_channels)
        if not isinstance(embedding, (list, tuple)):
            raise ValueError(f"ControlNet config conditioning_embedding_out_channels={embedding!r}: expected a list")
        # (a ControlNet has no up blocks: these stand for the UNet's, which it steers)
        return super().from_dict({**cfg, "up_block_types": ["CrossAttnUpBlock2D"] * n,
                                  "conditioning_embedding_out_channels": tuple(embedding)})

    def __post_init__(self):
        super().__post_init__()
        check_config_ints("ControlNet", self, "conditioning_channels")
        check_config_ints("ControlNet", self, "conditioning_embedding_out_channels", per_block=True)
        if self.controlnet_conditioning_channel_order not in ("rgb", "bgr"):
            raise ValueError(f"ControlNet config controlnet_conditioning_channel_order="
                             f"{self.controlnet_conditioning_channel_order!r}: expected 'rgb' or 'bgr'")

    @property
    def image_scale(self) -> int:
        """Control image pixels per latent along each side (8 for SD's: a stride-2 conv per step)."""
        return 2 ** (len(self.conditioning_embedding_out_channels) - 1)


class ControlNetConditioningEmbedding(nnx.Module):
    """The control image [B, H, W, 3] in [0, 1] to the UNet's first channels at latent size: a conv,
    then (a conv, a stride-2 conv) per step between ``channels``, SiLU after each, then a conv."""

    def __init__(self, out_ch: int, channels: tuple, in_ch: int, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.conv_in = conv(in_ch, channels[0], 3, **kw)
        self.blocks = nnx.List([layer for a, b in zip(channels[:-1], channels[1:])
                                for layer in (conv(a, a, 3, **kw), conv(a, b, 3, stride=2, **kw))])
        self.conv_out = conv(channels[-1], out_ch, 3, **kw)

    def __call__(self, x_BHWC):
        x_BHWC = jax.nn.silu(self.conv_in(x_BHWC))
        for block in self.blocks:
            x_BHWC = jax.nn.silu(block(x_BHWC))
        return self.conv_out(x_BHWC)


class ControlNetModel(nnx.Module, Pretrained):
    """The residuals a ControlNet adds to the UNet for a control image.

    ``__call__(sample [B, h, w, 4], timesteps, encoder_hidden_states [B, 77, 768], controlnet_cond
    [B, 8h, 8w, 3] in [0, 1], conditioning_scale=1.0)`` -> (down residuals, a tuple of [B, h_k, w_k, C_k]
    for the UNet's skip connections, mid residual), each times ``conditioning_scale``, as diffusers'
    ``ControlNetModel`` returns them. Load real weights with ``ControlNetModel.from_pretrained(path)``.
    """

    def __init__(self, config: ControlNetConfig | dict, *, dtype=jnp.float32, param_dtype=None, rngs: nnx.Rngs):
        cfg = config if isinstance(config, ControlNetConfig) else ControlNetConfig.from_dict(config)
        self.config = cfg
        self.dtype = dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype or dtype, rngs=rngs)
        chs = cfg.block_out_channels
        temb_ch = 4 * chs[0]
        self.conv_in = conv(cfg.in_channels, chs[0], 3, **kw)
        self.time_embedding = TimestepEmbedding(chs[0], temb_ch, **kw)
        self.controlnet_cond_embedding = ControlNetConditioningEmbedding(
            chs[0], cfg.conditioning_embedding_out_channels, cfg.conditioning_channels, **kw)
        self.down_blocks = down_blocks(cfg, temb_ch, **kw)
        # one 1x1 conv for each residual (zero at the start of a ControlNet's training)
        self.controlnet_down_blocks = nnx.List([conv(ch, ch, 1, **kw) for ch in skip_channels(cfg)])
        self.mid_block = mid_block(cfg, temb_ch, **kw)
        self.controlnet_mid_block = conv(chs[-1], chs[-1], 1, **kw)

    def __call__(self, sample_BHWC, timesteps, encoder_hidden_states_BSD, controlnet_cond_BHWC,
                 conditioning_scale=1.0) -> tuple[tuple[jax.Array, ...], jax.Array]:
        cfg = self.config
        check_nhwc("sample_BHWC", sample_BHWC, cfg.in_channels)
        check_context(sample_BHWC, encoder_hidden_states_BSD, cfg)
        check_nhwc("controlnet_cond_BHWC", controlnet_cond_BHWC, cfg.conditioning_channels)
        B, h, w, _ = sample_BHWC.shape
        want = (B, h * cfg.image_scale, w * cfg.image_scale, cfg.conditioning_channels)
        if tuple(controlnet_cond_BHWC.shape) != want:
            raise ValueError(f"controlnet_cond_BHWC has shape {tuple(controlnet_cond_BHWC.shape)}; expected {want}: "
                             f"the control image at {cfg.image_scale} pixels a latent, one per sample")
        x = sample_BHWC.astype(self.dtype)
        context = encoder_hidden_states_BSD.astype(self.dtype)
        cond = controlnet_cond_BHWC.astype(self.dtype)
        if cfg.controlnet_conditioning_channel_order == "bgr":
            cond = cond[..., ::-1]
        temb = time_embedding_of(self, timesteps, B, self.dtype)
        x = self.conv_in(x) + self.controlnet_cond_embedding(cond)
        skips = (x,)
        for block in self.down_blocks:
            x, outs = block(x, temb, context)
            skips += outs
        x = self.mid_block(x, temb, context)
        scale = jnp.asarray(conditioning_scale, self.dtype)
        down = tuple(zero_conv(s) * scale for zero_conv, s in zip(self.controlnet_down_blocks, skips))
        return down, self.controlnet_mid_block(x) * scale
