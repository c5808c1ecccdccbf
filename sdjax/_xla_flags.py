"""XLA flags sdjax adds to ``XLA_FLAGS`` before JAX starts its backends: the one place for them.

Each flag is added only when the user's ``XLA_FLAGS`` does not name it already, only while no JAX
backend is running yet (XLA reads the variable once, at start-up), and only for the jaxlib versions
it was measured on: XLA stops the process on a flag it does not know. ``SDJAX_XLA_FLAGS=0`` turns
this off.
"""
from __future__ import annotations

import os
import re

# name -> (value, jaxlib versions it was measured on, whether only with one CPU device)
FLAGS = {
    # YNNPACK's fusions take over XLA:CPU's convolutions and matmuls by default in jaxlib 0.10; XLA's
    # own kernels are faster for the SD v1.5 UNet: a 3x3 conv at 32x32x320 takes 37.1 ms instead of
    # 49.9, one UNet call at 256 px 4.70 s instead of 6.35 (`python benchmarks/cpu_kernels.py`).
    # One CPU device only: on several (--xla_force_host_platform_device_count=2..4, JAX_NUM_CPU_DEVICES)
    # jaxlib 0.10.2's own kernels gave wrong sampler results at random, images up to 1.0 apart from
    # one call to the next, where YNNPACK's repeat bit for bit (tests/test_sampling.py).
    "xla_cpu_experimental_ynn_fusion_type": ("", ("0.10.",), True),
}


def cpu_device_count(environ=os.environ) -> int:
    """How many CPU devices JAX will make: ``JAX_NUM_CPU_DEVICES`` where set, else XLA_FLAGS'
    ``--xla_force_host_platform_device_count`` (its last value), else 1."""
    try:
        count = int(environ.get("JAX_NUM_CPU_DEVICES", "-1"))
    except ValueError:
        count = -1
    if count > 0:
        return count
    forced = re.findall(r"--xla_force_host_platform_device_count=(\d+)", environ.get("XLA_FLAGS", ""))
    return int(forced[-1]) if forced else 1


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
    one_device = cpu_device_count(environ) == 1
    added = [f"--{name}={value}" for name, (value, versions, single_device) in FLAGS.items()
             if f"--{name}" not in current and version.startswith(versions) and (one_device or not single_device)]
    if added:
        environ["XLA_FLAGS"] = " ".join([current, *added]).strip()
    return added
