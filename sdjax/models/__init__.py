"""Flax NNX modules of Stable Diffusion v1.5 (NHWC): text encoder, UNet, VAE, and ControlNet."""
from sdjax.models.clip_text import CLIPTextConfig, CLIPTextModel, CLIPTextOutput
from sdjax.models.controlnet import ControlNetConfig, ControlNetModel
from sdjax.models.unet import UNet2DConditionModel, UNetConfig
from sdjax.models.vae import AutoencoderKL, DiagonalGaussian, VAEConfig

__all__ = ["CLIPTextConfig", "CLIPTextModel", "CLIPTextOutput", "UNet2DConditionModel", "UNetConfig",
           "AutoencoderKL", "DiagonalGaussian", "VAEConfig", "ControlNetConfig", "ControlNetModel"]
