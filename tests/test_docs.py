"""The API reference builds from the docstrings (docs/build.py, pdoc), and jaxprop is typed."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_api_reference_builds(tmp_path):
    pytest.importorskip("pdoc")
    proc = subprocess.run([sys.executable, str(ROOT / "docs" / "build.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Warning" not in proc.stderr, proc.stderr[-3000:]
    assert (tmp_path / "index.html").exists()
    testing = (tmp_path / "jaxprop" / "testing.html").read_text()
    assert "gradgradcheck" in testing and "finite differences" in testing
    assert "named_grads" in (tmp_path / "jaxprop" / "explain.html").read_text()
    assert (tmp_path / "jaxprop" / "rules" / "elementwise.html").exists()
    assert not (tmp_path / "jaxprop" / "_jax.html").exists()      # private modules stay out


def test_package_is_typed():
    assert (ROOT / "jaxprop" / "py.typed").exists()
    assert 'jaxprop = ["py.typed"]' in (ROOT / "pyproject.toml").read_text()   # installed too
