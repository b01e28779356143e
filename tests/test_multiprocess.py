"""A data-parallel step on a global mesh across 2 processes (jax.distributed on 127.0.0.1,
gloo CPU collectives): the same losses in both processes, as in one process with 8 devices,
and as jax.grad's. The test starts its processes and ends them within a bounded time."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "multidevice" / "two_process_step.py"
TIMEOUT = 240  # seconds for all processes together


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp_path, processes, port):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("XLA_FLAGS", None)
    return [subprocess.Popen(
        [sys.executable, str(SCRIPT), "--processes", str(processes), "--rank", str(rank),
         "--port", str(port), "--out", str(tmp_path / f"p{processes}_{rank}.json")],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in range(processes)]


def finish(procs):
    """Wait for every process (bounded); kill the rest on failure or timeout."""
    try:
        outputs = [p.communicate(timeout=TIMEOUT)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-4000:]


def test_two_processes_train_like_one(tmp_path):
    procs = launch(tmp_path, 2, free_port()) + launch(tmp_path, 1, 0)
    finish(procs)
    ranks = [json.loads((tmp_path / f"p2_{r}.json").read_text()) for r in range(2)]
    single = json.loads((tmp_path / "p1_0.json").read_text())
    assert [r["process_count"] for r in ranks] == [2, 2] and single["process_count"] == 1
    assert all(r["devices"] == 8 for r in [*ranks, single])
    assert ranks[0]["jaxprop"] == ranks[1]["jaxprop"]  # bit-identical across processes
    for r in ranks:
        np.testing.assert_allclose(r["jaxprop"], r["jax"], rtol=1e-5)
        np.testing.assert_allclose(r["jaxprop"], single["jaxprop"], rtol=1e-5)
    assert ranks[0]["jaxprop"][-1] < ranks[0]["jaxprop"][0]  # it trains
