"""Shared test setup: hypothesis profiles and an x64 fixture."""

import os

import jax
import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=8, derandomize=True, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=30, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def x64():
    """Run the test with 64-bit floats enabled (``jax.enable_x64``)."""
    with jax.enable_x64(True):
        yield
