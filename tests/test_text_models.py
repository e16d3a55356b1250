"""Text models: shapes, causality, the LSTM against numpy in float64, its hand-written backward
pass against autodiff, vmapped clients, and the registry entries with their parameter counts."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import assert_trees_close, float64_params
from fedjax_lab.models import REGISTRY, get_model
from fedjax_lab.models import text
from fedjax_lab.options import OptionError

VOCAB, LENGTH, BATCH = 11, 6, 3
# Small widths: the tests check the maths, not the paper's sizes (whose counts are checked
# without initialising, through `jax.eval_shape`).
SMALL = {"char_lstm": {"embed": 3, "hidden": 5, "layers": 2},
         "word_lstm": {"embed": 4, "hidden": 6, "projection": 3},
         "transformer": {"width": 8, "layers": 2, "heads": 2, "hidden": 16, "context": 8},
         "bigram": {"embed": 4}}


def token_batch(seed=0, batch=BATCH, length=LENGTH):
    ids = np.random.default_rng(seed).integers(0, VOCAB, (batch, length))
    return jnp.asarray(ids, jnp.float32)


@functools.cache
def small_model(name):
    return get_model(name, (LENGTH,), VOCAB, **SMALL[name])


@functools.cache
def jitted_apply(name):
    """One compiled inference per model (and per dtype), shared by the tests."""
    return jax.jit(small_model(name).apply)


def count(model) -> int:
    shapes = jax.eval_shape(model.init, jax.random.key(0))
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes))


@pytest.mark.parametrize("name", sorted(SMALL))
def test_logits_per_position_and_causal(name):
    model = small_model(name)
    assert not model.has_train_mode and not model.has_state
    assert model.feature_shape == (LENGTH,) and model.num_classes == VOCAB
    params = model.init(jax.random.key(0))
    apply = jitted_apply(name)
    x = token_batch()
    logits = apply(params, x)
    assert logits.shape == (BATCH, LENGTH, VOCAB) and np.isfinite(logits).all()
    t = 3
    changed = apply(params, x.at[:, t].set((x[:, t] + 1) % VOCAB))
    np.testing.assert_array_equal(changed[:, :t], logits[:, :t])
    assert not np.allclose(changed[:, t], logits[:, t])


def numpy_char_lstm(params, ids):
    """Embed, stacked LSTMs (PyTorch's / flax's equations, one bias), Dense, in float64."""
    sigmoid = lambda z: 1 / (1 + np.exp(-z))
    p = jax.tree.map(np.asarray, params)
    h_in = p["Embed_0"]["embedding"][ids]
    for layer in sorted(k for k in p if k.startswith("LSTM")):
        w_ih, w_hh, b = (p[layer][k] for k in ("input_kernel", "recurrent_kernel", "bias"))
        hidden = w_hh.shape[0]
        h, c = np.zeros((ids.shape[0], hidden)), np.zeros((ids.shape[0], hidden))
        outputs = []
        for t in range(ids.shape[1]):
            z = h_in[:, t] @ w_ih + h @ w_hh + b
            i, f, g, o = (z[:, k * hidden:(k + 1) * hidden] for k in range(4))
            c = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
            h = sigmoid(o) * np.tanh(c)
            outputs.append(h)
        h_in = np.stack(outputs, axis=1)
    return h_in @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]


def test_char_lstm_is_the_lstm_equations_in_float64():
    with jax.enable_x64(True):
        model = small_model("char_lstm")
        params = float64_params(model)
        assert set(params) == {"Embed_0", "LSTM_0", "LSTM_1", "Dense_0"}
        # Nonzero biases, so that a misplaced one would show.
        params = jax.tree.map(lambda p: p + 0.1 * jnp.arange(p.size).reshape(p.shape) / p.size,
                              params)
        x = token_batch()
        logits = jitted_apply("char_lstm")(params, x)
        assert logits.dtype == jnp.float64
        np.testing.assert_allclose(logits, numpy_char_lstm(params, np.asarray(x, int)),
                                   rtol=1e-12, atol=1e-12)


def test_the_hand_written_lstm_backward_pass_is_autodiffs_also_vmapped():
    with jax.enable_x64(True):
        keys = jax.random.split(jax.random.key(0), 3)
        gate_inputs = jax.random.normal(keys[0], (2, 7, 3, 20), jnp.float64)
        kernel = jax.random.normal(keys[1], (2, 5, 20), jnp.float64) * 0.5
        weights = jax.random.normal(keys[2], (2, 7, 3, 5), jnp.float64)

        def gradients(scan):
            loss = lambda g, w, r: jnp.sum(scan(g, w) * r)
            return jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1))))(gate_inputs, kernel,
                                                                      weights)

        reference = gradients(text.lstm_scan_autodiff)
        assert_trees_close(gradients(text.lstm_scan), reference)
        single = jax.jit(jax.grad(lambda g, w: jnp.sum(text.lstm_scan(g, w) * weights[1]),
                                  argnums=(0, 1)))(gate_inputs[1], kernel[1])
        assert_trees_close(single, jax.tree.map(lambda g: g[1], reference))


def test_vmapped_clients_equal_each_client_alone():
    name = "char_lstm"
    model = small_model(name)
    clients = 3
    params = jax.vmap(model.init)(jax.random.split(jax.random.key(0), clients))
    x = jnp.stack([token_batch(seed) for seed in range(clients)])
    together = jax.jit(jax.vmap(model.apply))(params, x)
    for c in range(clients):
        alone = jitted_apply(name)(jax.tree.map(lambda p: p[c], params), x[c])
        np.testing.assert_allclose(together[c], alone, rtol=1e-5, atol=1e-6)


def test_registry_builds_the_papers_models_with_their_parameter_counts():
    assert {"char_lstm", "word_lstm", "transformer", "bigram"} <= set(REGISTRY)
    # PyTorch's Embedding(80, 8) + LSTM(8, 256, num_layers=2) + Linear(256, 80) has 819,920:
    # two bias vectors per LSTM layer (b_ih, b_hh), 2 x 1,024 more than our one.
    assert count(get_model("char_lstm", (80,), 80)) == 817_872
    # Reddi et al.'s model (one bias in the LSTM, as Keras), V = 10,000 + 4 specials.
    assert count(get_model("word_lstm", (20,), 10_004)) == 4_050_748
    assert count(get_model("transformer", (80,), 80)) == 433_744
    assert count(get_model("bigram", (80,), 80)) == 2_640


def test_bad_options_name_the_option():
    with pytest.raises(OptionError, match=r"model.context=8 is invalid; sequences of length 9"):
        get_model("transformer", (9,), VOCAB, **SMALL["transformer"])
    with pytest.raises(OptionError, match=r"model.heads=3 is invalid"):
        get_model("transformer", (LENGTH,), VOCAB, width=8, heads=3)
    with pytest.raises(OptionError, match=r"model.hidden=0 is invalid"):
        get_model("char_lstm", (LENGTH,), VOCAB, hidden=0)
    with pytest.raises(OptionError, match=r"model.embed=0 is invalid"):
        get_model("bigram", (LENGTH,), VOCAB, embed=0)
    with pytest.raises(ValueError, match=r"feature shape \(T,\)"):
        get_model("bigram", (4, 4), VOCAB)
