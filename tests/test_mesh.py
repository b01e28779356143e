"""Meshes on 8 simulated CPU devices (tests/multidevice/mesh_checks.py), run in one subprocess
because XLA_FLAGS must be set before JAX starts."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_checks(path: str, marks: str, timeout: int = 600) -> None:
    """``pytest -m marks path`` in a fresh process with 8 CPU devices; fail with its output."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-p", "no:xdist",
         "-m", marks, path], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]


def test_meshes_on_8_devices():
    run_checks("tests/multidevice/mesh_checks.py", "not slow")


@pytest.mark.slow
def test_meshes_on_8_devices_eager():
    run_checks("tests/multidevice/mesh_checks.py", "slow")


def test_readme_many_devices_blocks_run_on_one_device(capsys):
    """The README's "Many devices" Python blocks run as written in a 1-device process and
    print what the README shows."""
    import re
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Many devices"):]
    section = section[:section.index("\n## ", 1)]
    pairs = re.findall(r"```python\n(.*?)```\n```\n(.*?)```", section, re.S)
    assert pairs
    for code, shown in pairs:
        exec(compile(code, "README.md", "exec"), {})
        assert capsys.readouterr().out == shown
