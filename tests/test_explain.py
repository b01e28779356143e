"""explain: per-node forward values, local/upstream/downstream gradients, tables and graphs."""

import inspect
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprop


def line_of(fn, marker):
    lines, start = inspect.getsourcelines(fn)
    return start + next(i for i, text in enumerate(lines) if marker in text)


def circuit(x, y, z):
    q = x + y  # add gate
    return q * z  # mul gate


def neuron(w0, x0, w1, x1, w2):
    dot = w0 * x0 + w1 * x1 + w2
    return 1.0 / (1.0 + jnp.exp(-dot))  # sigmoid gate


def values(rows, key):
    return [[None if v is None else float(v) for v in r[key]] for r in rows]


def test_seed_circuit_values_and_gradients():
    """(x + y)·z at (-2, 5, -4): the seeds' first figure."""
    e = jaxprop.explain(circuit, -2.0, 5.0, -4.0)
    assert [r["primitive"] for r in e.rows] == ["add", "mul"]
    assert values(e.rows, "outputs") == [[3.0], [-12.0]]
    assert values(e.rows, "upstream") == [[-4.0], [1.0]]
    assert values(e.rows, "downstream") == [[-4.0, -4.0], [-4.0, 3.0]]
    assert values(e.rows, "local") == [[1.0, 1.0], [-4.0, 3.0]]
    assert {k: float(v) for k, v in e.grads.items()} == {"x": -4.0, "y": -4.0, "z": 3.0}
    assert e.rows[0]["in_names"] == ("x", "y") and e.rows[1]["in_names"] == ("v1", "z")
    assert [r["line"] for r in e.rows] == [line_of(circuit, "add gate"),
                                           line_of(circuit, "mul gate")]
    text = str(e)
    assert "upstream ∂L/∂out" in text and "∂L/∂z = 3" in text
    assert f"test_explain.py:{line_of(circuit, 'mul gate')} (circuit)" in text


def test_sigmoid_neuron_matches_jax_and_local_gradients():
    args = (2.0, -1.0, -3.0, -2.0, -3.0)
    e = jaxprop.explain(neuron, *args)
    want = jax.grad(neuron, argnums=tuple(range(5)))(*args)
    for name, g in zip(["w0", "x0", "w1", "x1", "w2"], want):
        np.testing.assert_allclose(e.grads[name], g, rtol=1e-6)
    exp_row = next(r for r in e.rows if r["primitive"] == "exp")
    np.testing.assert_allclose(exp_row["local"][0], jnp.exp(exp_row["inputs"][0]), rtol=1e-6)
    # chain rule at every elementwise node with one input: downstream = local · upstream
    for r in e.rows:
        if r["local"] is not None and len(r["inputs"]) == 1:
            np.testing.assert_allclose(r["downstream"][0], r["local"][0] * r["upstream"][0],
                                       rtol=1e-6)
    np.testing.assert_allclose(float(e.grads["w0"]), -0.19661, atol=1e-4)  # the seeds' value


def mlp(params, x):
    with jax.named_scope("layer1"):
        h = jnp.tanh(x @ params["w"] + params["b"])  # layer line
    with jax.named_scope("head"):
        return jnp.sum(h ** 2)  # head line


PARAMS = {"w": jnp.linspace(-1, 1, 24).reshape(3, 8), "b": jnp.zeros(8)}
X = jnp.ones((4, 3))


def test_large_values_are_summarised():
    x = jnp.concatenate([jnp.linspace(-1, 1, 9), jnp.array([jnp.nan])])
    e = jaxprop.explain(lambda x: jnp.sum(jnp.sin(x)), x)
    text = str(e)
    assert "f32[10]" in text and "nan=1" in text and "‖·‖=" in text
    assert "[-1, 1]" in text                       # min and max of the finite values
    short = str(jaxprop.explain(lambda x: jnp.sum(jnp.sin(x)), jnp.array([0.0, 1.0])))
    assert "[0, 1]" in short and "[1, 0.5403]" in short   # full values, local = cos


def test_grads_match_jax_and_collapse_by_scope_and_line():
    e = jaxprop.explain(mlp, PARAMS, X)
    g = jax.grad(mlp, argnums=(0, 1))(PARAMS, X)
    np.testing.assert_allclose(e.grads["params['w']"], g[0]["w"], rtol=1e-5)
    np.testing.assert_allclose(e.grads["x"], g[1], rtol=1e-5)
    groups = e.groups("scope")
    assert list(groups) == ["layer1", "head"]
    assert "dot_general" in groups["layer1"]["ops"] and "tanh" in groups["layer1"]["ops"]
    (h_name,) = groups["layer1"]["out"]
    assert list(groups["head"]["in"]) == [h_name]
    np.testing.assert_allclose(groups["layer1"]["upstream"][h_name],
                               groups["head"]["downstream"][h_name])
    np.testing.assert_allclose(groups["layer1"]["downstream"]["params['b']"], g[0]["b"],
                               rtol=1e-5)
    lines = e.groups("line")
    assert f"test_explain.py:{line_of(mlp, 'layer line')} (mlp)" in lines
    assert "group" in e.table(collapse="scope") and "layer1" in e.table(collapse="scope")
    assert "layer1" in str(jaxprop.explain(mlp, PARAMS, X, collapse="scope"))


def test_flax_modules_collapse_by_module_path():
    nn = pytest.importorskip("flax.linen")

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(2)(jnp.tanh(nn.Dense(5)(x)))

    model = MLP()
    params = model.init(jax.random.key(0), X)
    e = jaxprop.explain(lambda p, x: jnp.sum(model.apply(p, x) ** 2), params, X, argnums=0)
    keys = list(e.groups(("module", 2)))
    assert "MLP/Dense_0" in keys and "MLP/Dense_1" in keys
    g = jax.grad(lambda p: jnp.sum(model.apply(p, X) ** 2))(params)
    np.testing.assert_allclose(e.grads["p['params']['Dense_0']['kernel']"],
                               g["params"]["Dense_0"]["kernel"], rtol=1e-5)


def test_jit_inner_functions_are_inlined_with_their_lines():
    @jax.jit
    def inner(x):
        return jnp.sin(x) * 2.0  # inner line

    e = jaxprop.explain(lambda x: jnp.sum(inner(x)), jnp.arange(3.0))
    sin = next(r for r in e.rows if r["primitive"] == "sin")
    assert sin["line"] == line_of(inner, "inner line")
    np.testing.assert_allclose(e.grads["x"], 2 * jnp.cos(jnp.arange(3.0)), rtol=1e-6)


def test_under_jit_shapes_inside_values_outside():
    inside = []

    def run(p, x):
        e = jaxprop.explain(mlp, p, x)
        inside.append(str(e))
        return e

    e = jax.jit(run)(PARAMS, X)
    assert "f32[4,8]" in inside[0] and "‖·‖" not in inside[0]
    assert "‖·‖" in str(e)                                # concrete once returned
    eager = jaxprop.explain(mlp, PARAMS, X)
    for k in eager.grads:
        np.testing.assert_allclose(e.grads[k], eager.grads[k], rtol=1e-5)
    tanh = [next(r for r in ex.rows if r["primitive"] == "tanh") for ex in (e, eager)]
    np.testing.assert_allclose(tanh[0]["downstream"][0], tanh[1]["downstream"][0], rtol=1e-5)


def test_tags_name_their_values_and_nonscalar_outputs():
    e = jaxprop.explain(lambda x: jnp.sin(jaxprop.tag(x * 2.0, "h")), jnp.array([0.0, 1.0]))
    assert any("h" in r["out_names"] for r in e.rows)
    np.testing.assert_allclose(e.grads["x"], 2 * jnp.cos(jnp.array([0.0, 2.0])), rtol=1e-6)
    e = jaxprop.explain(lambda x: jnp.sin(x), jnp.array([0.0, 1.0]),
                        cotangent=jnp.array([1.0, -1.0]))
    np.testing.assert_allclose(e.grads["x"], [1.0, -jnp.cos(1.0)], rtol=1e-6)


def test_dot_graph():
    e = jaxprop.explain(circuit, -2.0, 5.0, -4.0)
    dot = e.to_dot()
    assert dot.startswith("digraph") and dot.rstrip().endswith("}")
    # the edge from the add gate to the mul gate carries q = 3 (forward) and -4 (gradient)
    assert 'n0 -> n1 [label=<<font color="#1a7f37">3</font><br/>' \
           '<font color="#c0392b">-4</font>>];' in dot
    assert '"in:z" -> n1' in dot and '"out:out"' in dot
    collapsed = jaxprop.explain(mlp, PARAMS, X).to_dot(collapse="scope")
    assert 'label="layer1"' in collapsed and "g0 -> g1" in collapsed


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz `dot` is not installed")
def test_render_svg(tmp_path):
    path = jaxprop.explain(circuit, -2.0, 5.0, -4.0).render(tmp_path / "circuit.svg")
    svg = open(path).read()
    assert "<svg" in svg and "-12" in svg


def test_render_without_dot_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="Graphviz"):
        jaxprop.explain(circuit, 1.0, 2.0, 3.0).render(tmp_path / "x.svg")


def test_equinox_module_with_function_leaves():
    eqx = pytest.importorskip("equinox")
    model = eqx.nn.MLP(3, 2, 4, 1, key=jax.random.key(0))      # holds activation functions
    loss = lambda m, x: jnp.sum(jax.vmap(m)(x) ** 2)           # noqa: E731
    e = jaxprop.explain(loss, model, X)
    g = eqx.filter_grad(loss)(model, X)
    np.testing.assert_allclose(e.grads["m.layers[0].weight"], g.layers[0].weight,
                               rtol=1e-5, atol=1e-7)
    assert sum(r["primitive"] == "dot_general" for r in e.rows) == 2
