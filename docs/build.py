"""Build jaxprop's API reference from its docstrings with pdoc (``pip install -e ".[docs]"``).

    python docs/build.py            # writes docs/api/index.html (not committed: build it)
    python docs/build.py OUT_DIR

Every public module is documented: ``jaxprop`` and each ``jaxprop.<name>`` (rules included)
whose name does not start with an underscore.
"""

from __future__ import annotations

import pkgutil
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # document this checkout's jaxprop

import jaxprop  # noqa: E402


def public_modules() -> list[str]:
    """'jaxprop' and its submodules without a leading underscore in any part of the name."""
    found = [m.name for m in pkgutil.walk_packages(jaxprop.__path__, "jaxprop.")]
    return ["jaxprop"] + sorted(n for n in found
                                if not any(p.startswith("_") for p in n.split(".")))


def build(out: Path) -> Path:
    """Write the HTML reference into ``out``; returns its index.html."""
    import pdoc
    import pdoc.render

    pdoc.render.configure(docformat="restructuredtext", show_source=True,
                          footer_text=f"jaxprop {jaxprop.__version__}")
    with warnings.catch_warnings():  # a package's submodules come twice: listed and found
        warnings.filterwarnings("ignore", message="The module specification")
        pdoc.pdoc(*public_modules(), output_directory=out)
    return out / "index.html"


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "api"
    print(f"API reference: {build(out)}")
