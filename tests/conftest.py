"""Test-suite set-up.

Every test process sees 8 CPU devices (set before JAX is imported), so multi-device
code is exercised in-process; a test that wants one device builds a mesh over
``jax.devices()[:1]``.  Long checks at the real SD v1.5 configs are marked ``slow``
and run only with ``--runslow``.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no network in CI: never try the Hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False,
                     help="also run the slow tests at the real SD v1.5 configs")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)
