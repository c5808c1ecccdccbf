"""sdjax: Stable Diffusion v1.5 in JAX / Flax NNX."""
from sdjax import _xla_flags

_xla_flags.apply()  # before any JAX computation starts the backends

from sdjax.models import AutoencoderKL, CLIPTextModel, UNet2DConditionModel
from sdjax.pipeline import StableDiffusion, StableDiffusionOutput

__all__ = ["AutoencoderKL", "CLIPTextModel", "UNet2DConditionModel", "StableDiffusion", "StableDiffusionOutput"]
__version__ = "0.1.0"
