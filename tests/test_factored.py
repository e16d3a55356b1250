"""The factored dense update of conv nets (the custom-VJP convolution: test_conv.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_lab.algorithms import fedavg, fedprox
from fedjax_lab.core import ClientBatch, client_keys, experiment_key, factored
from fedjax_lab.core.robust import coordinate_median
from fedjax_lab.models import femnist_cnn, mlp


def test_cnn_split_composes_to_the_model():
    model = femnist_cnn((28, 28), 62)
    params = model.init(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (3, 28, 28))
    split = model.dense_split
    z = split.features(params, x) @ params[split.layer]["kernel"] + params[split.layer]["bias"]
    np.testing.assert_array_equal(split.head(params, z), model.apply(params, x))


def _cohort(num_classes=5):
    rng = np.random.default_rng(0)
    counts = np.array([13, 7, 0, 4])
    num_clients, padded = len(counts), 13
    ids = jnp.arange(num_clients, dtype=jnp.int32)
    return ClientBatch(
        x=jnp.asarray(rng.normal(size=(num_clients, padded, 8, 8))),
        y=jnp.asarray(rng.integers(0, num_classes, (num_clients, padded)), jnp.int32),
        mask=jnp.asarray(np.arange(padded)[None] < counts[:, None]),
        num_examples=jnp.asarray(counts, jnp.int32), client_ids=ids,
        rng=client_keys(experiment_key(0), 0, ids))


@pytest.mark.parametrize("build, options, jit", [
    (fedavg, {}, False),
    (fedavg, {}, True),
    (fedprox, {"mu": 0.7}, True),
    (fedavg, {"straggler_fraction": 0.5, "num_epochs": 3}, True),
    (fedavg, {"weighting": "uniform", "batch_size": None}, True),
])
def test_factored_round_equals_per_client_sgd_in_float64(build, options, jit):
    with jax.enable_x64(True):
        model = femnist_cnn((8, 8), 5)
        options = {"num_epochs": 2, "batch_size": 4, **options}
        fast = build(model, factored.sgd(0.05), dense_update="factored", **options)
        plain = build(model, factored.sgd(0.05), dense_update="per_client", **options)
        state = jax.tree.map(lambda leaf: leaf.astype(jnp.float64)
                             if leaf.dtype == jnp.float32 else leaf, fast.init(jax.random.key(1)))
        batch = _cohort()
        ours = (jax.jit(fast.round) if jit else fast.round)(state, batch)
        reference = jax.jit(plain.round)(state, batch)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-13),
                     ours.params, reference.params)
        for name in ("train_loss", "local_steps", "participants", "update_norm"):
            np.testing.assert_allclose(ours.metrics[name], reference.metrics[name], rtol=1e-12)
        assert float(ours.metrics["update_norm"]) > 0


def test_plain_sgd_is_optax_sgd():
    params = {"w": jnp.arange(3.0)}
    grads = {"w": jnp.array([0.5, -1.0, 2.0])}
    ours = factored.sgd(0.1)
    reference = optax.sgd(0.1)
    np.testing.assert_array_equal(ours.update(grads, ours.init(params))[0]["w"],
                                  reference.update(grads, reference.init(params))[0]["w"])
    with pytest.raises(ValueError, match="learning_rate=0 is invalid"):
        factored.sgd(0)


def test_factored_path_applies_only_where_exact():
    cnn = femnist_cnn((8, 8), 5)
    fedavg(cnn, factored.sgd(0.1), dense_update="factored")
    with pytest.raises(ValueError, match="client optimiser is not fedjax_lab.core.factored.sgd"):
        fedavg(cnn, optax.sgd(0.1, momentum=0.9), dense_update="factored")
    with pytest.raises(ValueError, match="no DenseSplit"):
        fedavg(mlp((4,), 3), factored.sgd(0.1), dense_update="factored")
    with pytest.raises(ValueError, match="robust aggregator"):
        fedavg(cnn, factored.sgd(0.1), aggregator=coordinate_median, dense_update="factored")
    with pytest.raises(ValueError, match="other than FedProx's proximal term"):
        fedavg(cnn, factored.sgd(0.1), local_regularizer=lambda p, g: 0.0,
               dense_update="factored")
    with pytest.raises(ValueError, match="dense_update 'lowrank' is unknown"):
        fedavg(cnn, factored.sgd(0.1), dense_update="lowrank")
    fedavg(cnn, optax.adam(0.1))
