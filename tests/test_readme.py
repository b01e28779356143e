"""README.md runs as written: every ```python block executes and prints what the README shows.

The rule, which README authors follow:

- Each ```python block runs on its own, in a fresh namespace (so it makes its own imports and
  definitions), as a file named ``example.py`` (that is the file name tracebacks and jaxprop's
  source columns show; line 1 is the block's first line). The working directory is a
  temporary one, so files a block writes (plots, graphs) land there.
- All blocks run in one subprocess, in README order (JAX starts once), with ``COLUMNS=120``
  (explain's tables fit that terminal width); JAX's x64 flag is restored after each block,
  so one block cannot change the next.
- If the first non-blank line after a block's closing fence opens a plain ``` fence (no
  language), that block is the output: what the python block prints must equal it, line by
  line, after removing trailing whitespace from every line and blank lines at both ends.
  Nothing else is normalised.
- A block that fails only because Graphviz's ``dot`` is not installed is skipped.

Failures name the README line of the block (and of the failing statement).
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FENCE = re.compile(r"^(`{3,})\s*([\w+-]*)\s*$")


def readme_blocks(text):
    """[(line of the opening fence, code, expected output or None)] for every python block."""
    lines = text.split("\n")
    fences, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        ticks, lang, start = m.group(1), m.group(2), i
        i += 1
        while i < len(lines) and lines[i].strip() != ticks:
            i += 1
        fences.append((start, i, lang, "\n".join(lines[start + 1:i])))
        i += 1
    blocks = []
    for k, (start, end, lang, body) in enumerate(fences):
        if lang != "python":
            continue
        expected = None
        if k + 1 < len(fences):
            nxt = fences[k + 1]
            between = lines[end + 1:nxt[0]]
            if nxt[2] == "" and all(not line.strip() for line in between):
                expected = nxt[3]
        blocks.append((start + 1, body, expected))
    return blocks


def normalise(text):
    """Trailing whitespace of each line and blank lines at both ends removed."""
    return "\n".join(line.rstrip() for line in text.strip("\n").split("\n")).strip("\n")


RUNNER = r'''
import contextlib, io, json, os, sys, tempfile, traceback
blocks = json.load(sys.stdin)
sys.path.insert(0, sys.argv[1])
import jax
os.chdir(tempfile.mkdtemp(prefix="readme-"))
results = []
for line, code in blocks:
    path = os.path.abspath("example.py")
    with open(path, "w") as f:
        f.write(code)
    out, x64 = io.StringIO(), jax.config.jax_enable_x64
    error = None
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(code, path, "exec"), {"__name__": "__main__", "__file__": path})
            jax.effects_barrier()
    except BaseException as err:  # noqa: BLE001 - reported per block
        tb = traceback.extract_tb(err.__traceback__)
        where = [fr.lineno for fr in tb if fr.filename == path]
        error = dict(kind=type(err).__name__, message=str(err),
                     line=where[-1] if where else None,
                     traceback="".join(traceback.format_exception(err)))
    finally:
        jax.config.update("jax_enable_x64", x64)
    results.append(dict(line=line, stdout=out.getvalue(), error=error))
sys.__stdout__.write("\n@@RESULTS@@" + json.dumps(results))
'''

BLOCKS = readme_blocks(README.read_text())


@pytest.fixture(scope="module")
def executed():
    """Run every block once, in one subprocess; results keyed by the block's README line."""
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"),
               COLUMNS="120")  # tables fit the terminal: a fixed one
    proc = subprocess.run([sys.executable, "-c", RUNNER, str(ROOT)], env=env, text=True,
                          input=json.dumps([(line, code) for line, code, _ in BLOCKS]),
                          capture_output=True, timeout=600)
    if "@@RESULTS@@" not in proc.stdout:
        pytest.fail(f"the README runner crashed:\n{proc.stderr[-4000:]}")
    return {r["line"]: r for r in json.loads(proc.stdout.split("@@RESULTS@@")[-1])}


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 5, "README.md's python blocks were not found"


@pytest.mark.parametrize("line, code, expected", BLOCKS,
                         ids=[f"README.md:{line}" for line, _, _ in BLOCKS])
def test_readme_block(executed, line, code, expected):
    result = executed[line]
    error = result["error"]
    if error is not None:
        if "Graphviz's `dot` program is not installed" in error["message"]:
            pytest.skip(f"README.md:{line}: needs Graphviz's dot")
        at = f"README.md:{line + error['line']}" if error["line"] else "?"
        pytest.fail(f"the python block at README.md:{line} raised {error['kind']} at {at}: "
                    f"{error['message']}\n{error['traceback']}", pytrace=False)
    if expected is not None and normalise(result["stdout"]) != normalise(expected):
        pytest.fail(f"the python block at README.md:{line} printed\n{result['stdout']}\n"
                    f"but the README shows (README.md:{line + code.count(chr(10)) + 2})\n"
                    f"{expected}", pytrace=False)


def test_the_rule_parses_blocks_and_outputs():
    text = "a\n```python\nprint(1)\n```\n\n```\n1\n```\n```python\nx = 2\n```\n```bash\nls\n```\n"
    assert readme_blocks(text) == [(2, "print(1)", "1"), (9, "x = 2", None)]
    assert normalise("\n a  \nb\t\n\n") == " a\nb"
