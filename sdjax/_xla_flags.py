"""XLA flags sdjax adds to ``XLA_FLAGS`` before JAX starts its backends: the one place for them.

Each flag is added only when the user's ``XLA_FLAGS`` does not name it already, only while no JAX
backend is running yet (XLA reads the variable once, at start-up), and only for the jaxlib versions
it was measured on: XLA stops the process on a flag it does not know. ``SDJAX_XLA_FLAGS=0`` turns
this off.
"""
from __future__ import annotations

import os

# name -> (value, jaxlib versions it was measured on)
FLAGS = {
    # YNNPACK's fusions take over XLA:CPU's convolutions and matmuls by default in jaxlib 0.10; XLA's
    # own kernels are faster for the SD v1.5 UNet: a 3x3 conv at 32x32x320 takes 37.1 ms instead of
    # 49.9, one UNet call at 256 px 4.70 s instead of 6.35 (`python benchmarks/cpu_kernels.py`).
    "xla_cpu_experimental_ynn_fusion_type": ("", ("0.10.",)),
}


def apply(environ=os.environ) -> list[str]:
    """Add `FLAGS` to ``environ["XLA_FLAGS"]`` where allowed; returns the flags added."""
    if environ.get("SDJAX_XLA_FLAGS", "1") == "0":
        return []
    try:
        from jax._src import xla_bridge
        if getattr(xla_bridge, "_backends", None):  # too late: XLA has read its flags
            return []
        import jaxlib
        version = jaxlib.__version__
    except ImportError:
        return []
    current = environ.get("XLA_FLAGS", "")
    added = [f"--{name}={value}" for name, (value, versions) in FLAGS.items()
             if f"--{name}" not in current and version.startswith(versions)]
    if added:
        environ["XLA_FLAGS"] = " ".join([current, *added]).strip()
    return added
