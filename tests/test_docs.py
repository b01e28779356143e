"""The API reference builds from the docstrings (docs/build.py, pdoc), and jaxprop is typed."""

import importlib.util
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_api_reference_builds(tmp_path):
    pytest.importorskip("pdoc")
    spec = importlib.util.spec_from_file_location("build_docs", ROOT / "docs" / "build.py")
    build_docs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build_docs)                # in-process: jaxprop is imported already
    with warnings.catch_warnings():
        warnings.simplefilter("error")                 # a docstring pdoc cannot read fails
        index = build_docs.build(tmp_path)
    assert index.exists()
    testing = (tmp_path / "jaxprop" / "testing.html").read_text()
    assert "gradgradcheck" in testing and "finite differences" in testing
    assert "named_grads" in (tmp_path / "jaxprop" / "explain.html").read_text()
    assert (tmp_path / "jaxprop" / "rules" / "elementwise.html").exists()
    assert not (tmp_path / "jaxprop" / "_jax.html").exists()      # private modules stay out


def test_package_is_typed():
    assert (ROOT / "jaxprop" / "py.typed").exists()
    assert 'jaxprop = ["py.typed"]' in (ROOT / "pyproject.toml").read_text()   # installed too
