"""The Stable Diffusion VAE (diffusers' ``AutoencoderKL``) in Flax NNX, NHWC."""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from sdjax.models.layers import (Pretrained, Attention, Downsample2D, ResnetBlock2D, Upsample2D, check_config_flags,
                                 check_config_floats, check_config_ints, check_nhwc, conv, group_norm)
from sdjax.schedulers import image_key_count


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """The VAE's architecture (diffusers' ``AutoencoderKL`` config fields; defaults: SD v1.5's)."""
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    sample_size: int = 512

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> "VAEConfig":
        """From a ``vae/config.json`` dict; block types, activations or a ``shift_factor`` sdjax does
        not build are a NotImplementedError naming them."""
        if cfg.get("act_fn", "silu") != "silu":
            raise NotImplementedError(f"VAE act_fn={cfg['act_fn']!r} is not supported")
        for key, ok in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            if any(t != ok for t in cfg.get(key, [ok])):
                raise NotImplementedError(f"VAE {key}={cfg[key]!r} is not supported (only {ok})")
        if cfg.get("shift_factor") not in (None, 0, 0.0):
            raise NotImplementedError("VAE shift_factor is not supported (SD 1.x/2.x VAEs have none)")
        known = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in cfg.items() if k in known}
        kw["block_out_channels"] = tuple(cfg.get("block_out_channels", cls.block_out_channels))
        return cls(**kw)

    def __post_init__(self):
        check_config_ints("VAE", self, "in_channels", "out_channels", "layers_per_block", "latent_channels",
                          "norm_num_groups")
        check_config_ints("VAE", self, "block_out_channels", per_block=True)
        check_config_floats("VAE", self, "scaling_factor", positive=True)
        check_config_flags("VAE", self, "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention")
        if bad := [ch for ch in self.block_out_channels if ch % self.norm_num_groups]:
            raise ValueError(f"VAE config: block_out_channels {bad} not divisible by norm_num_groups "
                             f"{self.norm_num_groups}")


class DiagonalGaussian(NamedTuple):
    """The encoder's posterior q(z|x) with diagonal covariance."""
    mean: jax.Array
    logvar: jax.Array

    @property
    def std(self):
        return jnp.exp(0.5 * self.logvar)

    def sample(self, key):
        """A draw ``mean + std * N(0, 1)`` (what diffusers' img2img and training encode with).

        ``key``: one PRNG key for the whole batch, or one per image (shape [B] for typed keys, [B, 2]
        for raw uint32 keys, e.g. ``sampling.image_keys(seeds)``), so that an image's draw does not
        depend on the batch it is encoded in."""
        if image_key_count(key) is not None:
            if key.shape[0] != self.mean.shape[0]:
                raise ValueError(f"got {key.shape[0]} per-image keys for a batch of {self.mean.shape[0]}")
            noise = jax.vmap(lambda k: jax.random.normal(k, self.mean.shape[1:], self.mean.dtype))(key)
        else:
            noise = jax.random.normal(key, self.mean.shape, self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self):
        """The most likely latents: the mean."""
        return self.mean


class VAEMidBlock(nnx.Module):
    """``UNetMidBlock2D``: resnet, one-head self-attention over pixels, resnet."""

    def __init__(self, ch, *, groups, add_attention, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List([ResnetBlock2D(ch, ch, temb_ch=None, groups=groups, eps=1e-6, **kw)
                                 for _ in range(2)])
        self.attentions = nnx.List([Attention(ch, heads=1, head_dim=ch, qkv_bias=True, norm_groups=groups,
                                              norm_eps=1e-6, residual=True, upcast=True, **kw)]
                                   ) if add_attention else None

    def __call__(self, x_BHWC):
        x_BHWC = self.resnets[0](x_BHWC)
        if self.attentions is not None:
            B, H, W, C = x_BHWC.shape
            x_BHWC = self.attentions[0](x_BHWC.reshape(B, H * W, C)).reshape(B, H, W, C)
        return self.resnets[1](x_BHWC)


class EncoderBlock(nnx.Module):
    """``DownEncoderBlock2D``: resnets without time embedding, then an asymmetric-pad downsample."""

    def __init__(self, in_ch, out_ch, *, layers, groups, add_downsample, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List([ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, temb_ch=None, groups=groups,
                                               eps=1e-6, **kw) for i in range(layers)])
        self.downsamplers = nnx.List([Downsample2D(out_ch, padding=0, **kw)]) if add_downsample else None

    def __call__(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.downsamplers is None else self.downsamplers[0](x)


class DecoderBlock(nnx.Module):
    """``UpDecoderBlock2D``: resnets, then a nearest-2x upsample and conv."""

    def __init__(self, in_ch, out_ch, *, layers, groups, add_upsample, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List([ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, temb_ch=None, groups=groups,
                                               eps=1e-6, **kw) for i in range(layers)])
        self.upsamplers = nnx.List([Upsample2D(out_ch, **kw)]) if add_upsample else None

    def __call__(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.upsamplers is None else self.upsamplers[0](x)


class Encoder(nnx.Module):
    def __init__(self, cfg: VAEConfig, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        chs, groups = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = conv(cfg.in_channels, chs[0], 3, **kw)
        self.down_blocks = nnx.List([
            EncoderBlock(chs[max(i - 1, 0)], chs[i], layers=cfg.layers_per_block, groups=groups,
                         add_downsample=i < len(chs) - 1, **kw) for i in range(len(chs))])
        self.mid_block = VAEMidBlock(chs[-1], groups=groups, add_attention=cfg.mid_block_add_attention, **kw)
        self.conv_norm_out = group_norm(chs[-1], groups, 1e-6, **kw)
        self.conv_out = conv(chs[-1], 2 * cfg.latent_channels, 3, **kw)

    def __call__(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
    def __init__(self, cfg: VAEConfig, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        rev, groups = list(reversed(cfg.block_out_channels)), cfg.norm_num_groups
        self.conv_in = conv(cfg.latent_channels, rev[0], 3, **kw)
        self.mid_block = VAEMidBlock(rev[0], groups=groups, add_attention=cfg.mid_block_add_attention, **kw)
        self.up_blocks = nnx.List([
            DecoderBlock(rev[max(i - 1, 0)], rev[i], layers=cfg.layers_per_block + 1, groups=groups,
                         add_upsample=i < len(rev) - 1, **kw) for i in range(len(rev))])
        self.conv_norm_out = group_norm(rev[-1], groups, 1e-6, **kw)
        self.conv_out = conv(rev[-1], cfg.out_channels, 3, **kw)

    def __call__(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module, Pretrained):
    """Image [B, H, W, 3] in [-1, 1] <-> latents [B, H/8, W/8, 4].

    ``encode`` returns the posterior (a `DiagonalGaussian`); ``decode`` the image. Latents fed to
    the UNet are ``posterior.sample(key) * scaling_factor``; decode ``latents / scaling_factor``.
    """

    def __init__(self, config: VAEConfig | dict, *, dtype=jnp.float32, param_dtype=None, rngs: nnx.Rngs):
        cfg = config if isinstance(config, VAEConfig) else VAEConfig.from_dict(config)
        self.config, self.dtype = cfg, dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype or dtype, rngs=rngs)
        self.encoder = Encoder(cfg, **kw)
        self.decoder = Decoder(cfg, **kw)
        lat = cfg.latent_channels
        self.quant_conv = conv(2 * lat, 2 * lat, 1, **kw) if cfg.use_quant_conv else None
        self.post_quant_conv = conv(lat, lat, 1, **kw) if cfg.use_post_quant_conv else None

    @property
    def scaling_factor(self) -> float:
        """UNet latents = VAE latents * scaling_factor (0.18215 for SD v1.5)."""
        return self.config.scaling_factor

    def encode(self, images_BHWC) -> DiagonalGaussian:
        """The posterior of float images [B, H, W, 3] in [-1, 1]."""
        check_nhwc("images_BHWC", images_BHWC, self.config.in_channels)
        if not jnp.issubdtype(images_BHWC.dtype, jnp.floating):
            raise TypeError(f"images_BHWC has dtype {images_BHWC.dtype}; expected floats in [-1, 1] "
                            "(e.g. uint8 pixels / 127.5 - 1)")
        moments = self.encoder(images_BHWC.astype(self.dtype))
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return DiagonalGaussian(mean, jnp.clip(logvar, -30.0, 20.0))

    def decode(self, latents_BHWC):
        """Images [B, H, W, 3] (about [-1, 1]) from VAE latents [B, h, w, latent_channels] (divide UNet
        latents by ``scaling_factor`` first)."""
        check_nhwc("latents_BHWC", latents_BHWC, self.config.latent_channels)
        z = latents_BHWC.astype(self.dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, images_BHWC, key=None):
        """Reconstruct: encode, take the posterior sample (``key``) or its mode, decode."""
        posterior = self.encode(images_BHWC)
        return self.decode(posterior.mode() if key is None else posterior.sample(key))
