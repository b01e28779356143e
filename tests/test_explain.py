"""explain: per-node forward values, local/upstream/downstream gradients, tables and graphs."""

import functools
import inspect
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprop


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch):
    """Tables fit the terminal; these tests read whole cells, so the terminal is wide."""
    monkeypatch.setenv("COLUMNS", "250")


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
    assert {k: float(v) for k, v in e.named_grads.items()} == {"x": -4.0, "y": -4.0, "z": 3.0}
    assert tuple(map(float, e.grads)) == (-4.0, -4.0, 3.0)      # as jax.grad(argnums=(0,1,2))
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
    for name, g, ours in zip(["w0", "x0", "w1", "x1", "w2"], want, e.grads):
        np.testing.assert_allclose(e.named_grads[name], g, rtol=1e-6)
        np.testing.assert_allclose(ours, g, rtol=1e-6)
    exp_row = next(r for r in e.rows if r["primitive"] == "exp")
    np.testing.assert_allclose(exp_row["local"][0], jnp.exp(exp_row["inputs"][0]), rtol=1e-6)
    # chain rule at every elementwise node with one input: downstream = local · upstream
    for r in e.rows:
        if r["local"] is not None and len(r["inputs"]) == 1:
            np.testing.assert_allclose(r["downstream"][0], r["local"][0] * r["upstream"][0],
                                       rtol=1e-6)
    np.testing.assert_allclose(float(e.grads[0]), -0.19661, atol=1e-4)  # the seeds' value


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
    np.testing.assert_allclose(e.named_grads["params['w']"], g[0]["w"], rtol=1e-5)
    np.testing.assert_allclose(e.grads[1], g[1], rtol=1e-5)
    for ours, theirs in zip(jax.tree.leaves(e.grads), jax.tree.leaves(g)):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5)
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
    np.testing.assert_allclose(e.named_grads["p['params']['Dense_0']['kernel']"],
                               g["params"]["Dense_0"]["kernel"], rtol=1e-5)
    assert jax.tree.structure(e.grads) == jax.tree.structure(g)    # argnums=0: params' shape
    new = jax.tree.map(lambda p, d: p - 0.1 * d, params, e.grads)   # an SGD step, as with optax
    assert jax.tree.structure(new) == jax.tree.structure(params)


def test_jit_inner_functions_are_inlined_with_their_lines():
    @jax.jit
    def inner(x):
        return jnp.sin(x) * 2.0  # inner line

    e = jaxprop.explain(lambda x: jnp.sum(inner(x)), jnp.arange(3.0))
    sin = next(r for r in e.rows if r["primitive"] == "sin")
    assert sin["line"] == line_of(inner, "inner line")
    np.testing.assert_allclose(e.grads[0], 2 * jnp.cos(jnp.arange(3.0)), rtol=1e-6)


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
    for a, b in zip(jax.tree.leaves(e.grads), jax.tree.leaves(eager.grads)):
        np.testing.assert_allclose(a, b, rtol=1e-5)
    tanh = [next(r for r in ex.rows if r["primitive"] == "tanh") for ex in (e, eager)]
    np.testing.assert_allclose(tanh[0]["downstream"][0], tanh[1]["downstream"][0], rtol=1e-5)


def test_tags_name_their_values_and_nonscalar_outputs():
    e = jaxprop.explain(lambda x: jnp.sin(jaxprop.tag(x * 2.0, "h")), jnp.array([0.0, 1.0]))
    assert any("h" in r["out_names"] for r in e.rows)
    np.testing.assert_allclose(e.grads[0], 2 * jnp.cos(jnp.array([0.0, 2.0])), rtol=1e-6)
    e = jaxprop.explain(lambda x: jnp.sin(x), jnp.array([0.0, 1.0]),
                        cotangent=jnp.array([1.0, -1.0]))
    np.testing.assert_allclose(e.grads[0], [1.0, -jnp.cos(1.0)], rtol=1e-6)


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
    np.testing.assert_allclose(e.grads[0].layers[0].weight, g.layers[0].weight,
                               rtol=1e-5, atol=1e-7)
    assert e.grads[0].activation is None                       # not differentiable: None
    assert sum(r["primitive"] == "dot_general" for r in e.rows) == 2


def test_constant_inputs_have_no_gradient_shown_as_a_dash():
    e = jaxprop.explain(neuron, 2.0, -1.0, -3.0, -2.0, -3.0)
    div = next(r for r in e.rows if r["primitive"] == "div")         # 1.0 / (1 + exp(-dot))
    assert div["in_names"][0] is None and div["local"][0] is None
    line = next(t for t in str(e).split("\n") if "const = 1" in t and " div " in t)
    assert line.split()[8:11] == ["—", "1", "—"]               # local, upstream, downstream


@functools.lru_cache(maxsize=None)
def flax_explanation():
    """A 2-block Flax MLP (Dense, LayerNorm, relu per block): long parameter names, scopes."""
    nn = pytest.importorskip("flax.linen")

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.relu(nn.LayerNorm()(nn.Dense(16)(x)))

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3)(Block(name="block2")(Block(name="block1")(x)))

    model = MLP()
    params = model.init(jax.random.key(0), X)
    loss = lambda p, x: jnp.mean(jax.nn.log_softmax(model.apply(p, x))[:, 0])  # noqa: E731
    return jaxprop.explain(loss, params, X, argnums=0)


def test_tables_fit_the_terminal_width(monkeypatch):
    e = flax_explanation()
    widest = lambda text: max(len(line) for line in text.split("\n"))  # noqa: E731
    for collapse in (None, ("module", 2)):
        assert widest(e.table(collapse, width=0)) > 130                # the natural width
        assert widest(e.table(collapse, width=100)) <= 100
    monkeypatch.setenv("COLUMNS", "90")
    assert widest(str(e)) <= 90 and widest(e.table(("module", 2))) <= 90
    text = e.table(("module", 2), width=100)
    assert re.search(r"…\S*\['scale'\]", text)               # names keep their end
    assert "MLP/block1" in text and "dot_general" in text       # op lists wrap, not cut


def test_large_graphs_are_laid_out_top_to_bottom_with_scopes_and_a_legend():
    small = jaxprop.explain(circuit, -2.0, 5.0, -4.0).to_dot()
    assert "rankdir=LR" in small and "cluster_legend" in small
    e = flax_explanation()
    dot = e.to_dot()
    assert "rankdir=TB" in dot and 'subgraph cluster_0 { label="MLP/block1/Dense_0"' in dot
    assert "rank=same" in e.to_dot(collapse="module")    # parameters beside their module
    assert "cluster_legend" not in e.to_dot(legend=False)


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz `dot` is not installed")
def test_a_flax_models_module_graph_renders_readably(tmp_path):
    svg = open(flax_explanation().render(tmp_path / "m.svg", collapse="module")).read()
    w, h = (float(v) for v in re.search(r'width="([\d.]+)pt" height="([\d.]+)pt"',
                                        svg).groups())
    assert w <= 1200 and h <= 1400, (w, h)         # was 4627×460 px left to right
