"""Test configuration shared by the test suite and the package doctests.

Eight simulated CPU devices (set before JAX is imported) let the sharding
tests run anywhere; strict promotion catches silent dtype and rank changes.
"""

import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

try:
    from hypothesis import HealthCheck, settings
except ImportError:  # hypothesis is a test extra; doctests run without it
    pass
else:
    settings.register_profile(
        "default",
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
        print_blob=True,
    )
    settings.load_profile("default")
