"""Fixtures shared by the rule-family tests."""

import jax.numpy as jnp
import pytest


@pytest.fixture(params=["float32", "float64"])
def dtype(request):
    """float32, and float64 under x64."""
    if request.param == "float64":
        request.getfixturevalue("x64")
    return jnp.dtype(request.param)
