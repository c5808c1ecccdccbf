"""sdjax: Stable Diffusion v1.5 in JAX / Flax NNX."""
from sdjax import _xla_flags

_xla_flags.apply()  # before any JAX computation starts the backends


def _require_importable_flax() -> None:
    """Turn flax's import failure under a jax it was not made for into an error naming both versions
    and the fix. The known case: flax <= 0.12.9 subclasses ``jax.experimental.hijax.HiPrimitive``
    when it is imported, and jax 0.11.2 deleted that class (google/flax#5596, fixed in flax 0.12.10);
    ``import flax.nnx`` then stops with a bare AttributeError."""
    import importlib
    try:
        importlib.import_module("flax.nnx")
    except (AttributeError, ImportError) as e:
        if isinstance(e, ModuleNotFoundError) and e.name in ("flax", "jax"):
            raise  # not installed at all: pip's own message says it
        from importlib.metadata import version
        fix = ("jax 0.11.2 and later need flax 0.12.10 or later: pip install -U 'flax>=0.12.10'"
               if "HiPrimitive" in str(e) else "install a flax release made for this jax: pip install -U flax")
        raise ImportError(f"sdjax needs flax.nnx, but flax {version('flax')} cannot be imported with jax "
                          f"{version('jax')} ({type(e).__name__}: {e}); {fix}") from e


_require_importable_flax()

from sdjax.models import AutoencoderKL, CLIPTextModel, ControlNetModel, UNet2DConditionModel  # noqa: E402
from sdjax.pipeline import HiresFix, StableDiffusion, StableDiffusionOutput  # noqa: E402

__all__ = ["AutoencoderKL", "CLIPTextModel", "UNet2DConditionModel", "ControlNetModel", "StableDiffusion",
           "StableDiffusionOutput", "HiresFix"]
__version__ = "0.1.0"
