"""shard_map, pmap and collectives on 8 simulated CPU devices (tests/multidevice/checks_*.py).

XLA_FLAGS=--xla_force_host_platform_device_count=8 must be set before JAX initialises, so
the checks run in one pytest subprocess per test here: the default run takes the quick
subset, the slow run every collective × check_vma × eager/jit × gradient inside/outside.
"""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def run_checks(*args: str, timeout: int) -> None:
    """Run the multi-device checks in a fresh interpreter with 8 CPU devices; fail with its
    report if any check fails."""
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    env = dict(os.environ, XLA_FLAGS=flags.strip(), JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
           "-o", "python_files=checks_*.py", "tests/multidevice", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{proc.stdout[-8000:]}\n{proc.stderr[-4000:]}"
    assert " passed" in proc.stdout, proc.stdout[-2000:]


def test_collectives_and_shard_map_quick():
    run_checks("-m", "not slow", timeout=600)


@pytest.mark.slow
def test_collectives_and_shard_map_all():
    run_checks(timeout=3600)
