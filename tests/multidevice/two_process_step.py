"""A data-parallel SGD step on a global 8-device mesh, as one of ``--processes`` processes.

    python two_process_step.py --processes 2 --rank R --port P --out losses_R.json

Each process holds 8 / processes CPU devices and its slice of every batch; the gradient is
jaxprop.grad (and jax.grad, for reference) of the global mean loss under jax.jit. With
``--processes 1`` it is the same step in one process with 8 devices. Writes the losses.
"""

import argparse
import json
import os

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--processes", type=int, default=2, help="number of processes")
parser.add_argument("--rank", type=int, default=0, help="this process's index")
parser.add_argument("--port", type=int, default=0, help="coordinator port on 127.0.0.1")
parser.add_argument("--steps", type=int, default=5, help="SGD steps")
parser.add_argument("--out", required=True, help="where to write the losses (JSON)")
args = parser.parse_args()
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={8 // args.processes}"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
if args.processes > 1:
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{args.port}",
                               num_processes=args.processes, process_id=args.rank,
                               initialization_timeout=60)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import jaxprop  # noqa: E402


def loss(params, x, y):
    (w1, b1), (w2, b2) = params
    logits = jnp.tanh(x @ w1 + b1) @ w2 + b2
    return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.sum(logits * y, -1))


rng = np.random.default_rng(0)
params = [(rng.normal(size=(16, 32)).astype(np.float32) / 4, np.zeros(32, np.float32)),
          (rng.normal(size=(32, 8)).astype(np.float32) / 6, np.zeros(8, np.float32))]
batches = [(rng.normal(size=(64, 16)).astype(np.float32),
            np.eye(8, dtype=np.float32)[rng.integers(0, 8, 64)]) for _ in range(args.steps)]

mesh = jax.make_mesh((8,), ("data",))
assert len(jax.devices()) == 8, jax.devices()
replicated, rows = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
per_process = 64 // args.processes
mine = slice(args.rank * per_process, (args.rank + 1) * per_process)


def global_batch(x):
    """The global array whose rows this process holds are ``x[mine]``."""
    return jax.make_array_from_process_local_data(rows, x[mine], x.shape)


def train(grad_fn):
    @jax.jit
    def step(params, x, y):
        value, grads = grad_fn(loss)(params, x, y)
        return jax.tree.map(lambda p, g: p - 0.5 * g, params, grads), value

    p = jax.device_put(params, replicated)
    losses = []
    for x, y in batches:
        p, value = step(p, global_batch(x), global_batch(y))
        losses.append(float(value))
    return losses


result = {"jaxprop": train(jaxprop.value_and_grad), "jax": train(jax.value_and_grad),
          "process_count": jax.process_count(), "devices": len(jax.devices())}
with open(args.out, "w") as f:
    json.dump(result, f)
if args.processes > 1:
    jax.distributed.shutdown()
