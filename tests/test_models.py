"""Models: the registry, dropout in training only, BatchNorm statistics through FedAvg,
ResNet-18 with GroupNorm."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from common import (NUM_CLASSES, NUM_FEATURES, assert_trees_close, assert_trees_equal,
                    float64_params, make_clients, stack_clients)
from fedjax_lab import options
from fedjax_lab.algorithms import REGISTRY as ALGORITHMS
from fedjax_lab.algorithms import fedavg
from fedjax_lab.core import (ClientBatch, ClientExecution, client_keys, client_weights,
                             experiment_key, local_train, model_loss)
from fedjax_lab.core.factored import unsupported_reason
from fedjax_lab.core.losses import LossWithState, ProximalTerm
from fedjax_lab.core.types import DataInfo
from fedjax_lab.models import (MODELS, REGISTRY, SplitModel, cifar_cnn, get_model, mlp,
                               resnet18_gn, split_mlp)
from fedjax_lab.options import OptionError

DIGITS_SHAPE = (64,)
SIZES = [9, 4, 13, 0]


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_registered_model_builds_with_its_defaults_and_gives_logits(name):
    spec = REGISTRY[name]
    options.validate(spec.config())
    assert options.from_dict(spec.config, options.to_dict(spec.config())) == spec.config()
    model = spec.build(spec.config(), DIGITS_SHAPE, 10)
    assert isinstance(model, SplitModel) == (spec.kind == "split")
    if spec.next_token:  # token ids in, one prediction per position out
        x = jax.random.randint(jax.random.key(1), (3,) + DIGITS_SHAPE, 0, 10).astype(jnp.float32)
    else:
        x = jax.random.normal(jax.random.key(1), (3,) + DIGITS_SHAPE)
    logits = jax.jit(lambda key: model.apply(model.init(key), x))(jax.random.key(0))
    expected = (3,) + DIGITS_SHAPE + (10,) if spec.next_token else (3, 10)
    assert logits.shape == expected and np.isfinite(logits).all()


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_equal_registry_builds_are_one_model_object_so_programs_are_reused(name):
    spec = REGISTRY[name]
    build = lambda: spec.build(spec.config(), DIGITS_SHAPE, 10)
    assert build() is build()
    assert mlp(DIGITS_SHAPE, 10, hidden=(8,)) is not mlp(DIGITS_SHAPE, 10, hidden=(9,))


def test_get_model_reads_options_and_names_bad_ones():
    model = get_model("mlp", DIGITS_SHAPE, 10, hidden=[32], dropout=0.2)
    assert model.has_train_mode and not model.has_state
    assert jax.tree.map(jnp.shape, model.init(jax.random.key(0)))["Dense_0"]["kernel"] == (64, 32)
    assert MODELS["split_mlp"](DIGITS_SHAPE, 10, hidden=(16, 8)).latent_dim == 8
    with pytest.raises(OptionError, match=r"model.name='resnet' is invalid; unknown model; "
                                          r"allowed: logistic, mlp"):
        get_model("resnet", DIGITS_SHAPE, 10)
    with pytest.raises(OptionError, match=r"model.dropout=1.0 is invalid"):
        get_model("mlp", DIGITS_SHAPE, 10, dropout=1.0)
    with pytest.raises(OptionError, match=r"model.width.*unknown option"):
        get_model("mlp", DIGITS_SHAPE, 10, width=3)
    with pytest.raises(OptionError, match=r"model.hidden=\(\) is invalid"):
        get_model("split_mlp", DIGITS_SHAPE, 10, hidden=[])


def test_plain_models_are_unchanged_and_have_no_training_mode():
    plain = mlp(DIGITS_SHAPE, 10, (16,))
    assert not plain.has_train_mode and not plain.has_state
    params = plain.init(jax.random.key(0))
    assert set(params) == {"Dense_0", "Dense_1"}
    x = jax.random.normal(jax.random.key(1), (4,) + DIGITS_SHAPE)
    np.testing.assert_array_equal(plain.apply(params, x, train=True, rng=jax.random.key(2)),
                                  plain.apply(params, x))


@pytest.mark.parametrize("build", [lambda: mlp(DIGITS_SHAPE, 10, (32, 32), dropout=0.5),
                                   lambda: cifar_cnn(DIGITS_SHAPE, 10),
                                   lambda: split_mlp(DIGITS_SHAPE, 10, (32, 16), dropout=0.5)])
def test_dropout_draws_from_the_key_in_training_and_is_off_in_inference(build):
    model = build()
    assert model.has_train_mode
    params = model.init(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (4,) + DIGITS_SHAPE)
    train = lambda key: model.apply(params, x, train=True, rng=key)
    assert not np.allclose(train(jax.random.key(2)), train(jax.random.key(3)))
    np.testing.assert_array_equal(train(jax.random.key(2)), train(jax.random.key(2)))
    inference = model.apply(params, x)
    np.testing.assert_array_equal(model.apply(params, x), inference)
    assert not np.allclose(train(jax.random.key(2)), inference)


def test_dropout_model_infers_as_the_same_network_without_dropout():
    x = jax.random.normal(jax.random.key(1), (4,) + DIGITS_SHAPE)
    dropped = mlp(DIGITS_SHAPE, 10, (32,), dropout=0.5)
    params = dropped.init(jax.random.key(0))
    plain = mlp(DIGITS_SHAPE, 10, (32,))
    assert_trees_equal(params, plain.init(jax.random.key(0)))
    np.testing.assert_array_equal(dropped.apply(params, x), plain.apply(params, x))
    rate_zero = cifar_cnn(DIGITS_SHAPE, 10, conv_dropout=0.0, dense_dropout=0.0)
    assert not rate_zero.has_train_mode
    cnn_params = rate_zero.init(jax.random.key(0))
    np.testing.assert_array_equal(rate_zero.apply(cnn_params, x, train=True,
                                                  rng=jax.random.key(5)),
                                  rate_zero.apply(cnn_params, x))


def _client_data(sizes=SIZES, padded_length=None, dtype=np.float32):
    xs, ys = make_clients(sizes, dtype=dtype)
    return stack_clients(xs, ys, padded_length)


def test_local_training_with_dropout_runs_vmapped_under_jit_and_uses_the_step_keys():
    batch = _client_data()
    dropped = mlp((NUM_FEATURES,), NUM_CLASSES, (16,), dropout=0.5)
    params = dropped.init(jax.random.key(0))

    def trainer(model):
        return jax.jit(jax.vmap(lambda x, y, m, r: local_train(
            model_loss(model.apply), optax.sgd(0.1), params, x, y, m, r, num_epochs=2,
            batch_size=4).params))

    train = trainer(dropped)
    trained = train(batch.x, batch.y, batch.mask, batch.rng)
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(trained))
    assert_trees_equal(jax.tree.map(lambda leaf: leaf[3], trained), params)  # the empty client
    other_keys = jax.vmap(lambda key: jax.random.fold_in(key, 1))(batch.rng)
    redrawn = train(batch.x, batch.y, batch.mask, other_keys)
    plain = trainer(mlp((NUM_FEATURES,), NUM_CLASSES, (16,)))(batch.x, batch.y, batch.mask,
                                                              batch.rng)
    kernel = lambda tree: tree["Dense_0"]["kernel"][0]
    assert not np.allclose(kernel(trained), kernel(plain))
    assert not np.allclose(kernel(trained), kernel(redrawn))


def bn_model():
    return mlp((NUM_FEATURES,), NUM_CLASSES, (8,), batch_norm=True)


def test_batch_norm_statistics_live_in_the_params_and_inference_uses_them():
    model = bn_model()
    assert model.has_state and model.has_train_mode and model.mutable == ("batch_stats",)
    params = model.init(jax.random.key(0))
    assert set(params) == {"params", "batch_stats"}
    assert unsupported_reason(model._replace(dense_split=object()), None, None).startswith(
        "the model trains differently")
    x = jax.random.normal(jax.random.key(1), (6, NUM_FEATURES))
    shifted = params | {"batch_stats": jax.tree.map(lambda s: s + 0.5, params["batch_stats"])}
    together = model.apply(shifted, x)
    alone = jnp.concatenate([model.apply(shifted, x[i:i + 1]) for i in range(6)])
    np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-6)
    assert not np.allclose(together, model.apply(params, x))
    logits, state = model.apply(params, x, train=True, mask=jnp.arange(6) < 4,
                                return_state=True)
    _, first_four = model.apply(params, x[:4], train=True, return_state=True)
    assert_trees_close(state, first_four, rtol=1e-6, atol=1e-6)
    loss = model_loss(model.apply)(params, x, jnp.zeros(6, jnp.int32), jnp.ones(6, bool), None)
    assert isinstance(loss, LossWithState) and isinstance(2.0 * loss + 1.0, LossWithState)


@pytest.mark.parametrize("optimizer", [optax.sgd(0.5), optax.sgd(0.5, momentum=0.9)])
def test_local_training_writes_the_statistics_back_and_keeps_the_optimiser_off_them(optimizer):
    """One full-batch step with a proximal term (a nonzero gradient on the statistics if they
    were parameters): the new statistics are exactly the batch's moving average."""
    with jax.enable_x64(True):
        batch = _client_data([7], padded_length=10, dtype=np.float64)
        model = bn_model()
        params = float64_params(model)
        anchor = jax.tree.map(lambda leaf: leaf + 1.0, params)
        base = model_loss(model.apply)
        loss = lambda p, x, y, m, r: base(p, x, y, m, r) + ProximalTerm(0.3)(p, anchor)
        result = local_train(loss, optimizer, params, batch.x[0], batch.y[0], batch.mask[0],
                             batch.rng[0], num_epochs=1, batch_size=None)
        _, expected = model.apply(params, batch.x[0, :7], train=True, return_state=True)
        assert_trees_close(result.params["batch_stats"], expected["batch_stats"])
        assert not np.allclose(result.params["batch_stats"]["BatchNorm_0"]["mean"], 0.0)


def test_padding_never_reaches_the_batch_statistics():
    tight, padded = _client_data([11]), _client_data([11], padded_length=30)
    model = bn_model()
    params = model.init(jax.random.key(0))
    train = jax.jit(lambda b: local_train(model_loss(model.apply), optax.sgd(0.1), params,
                                          b.x[0], b.y[0], b.mask[0], b.rng[0], num_epochs=2,
                                          batch_size=4))
    a, b = train(tight), train(padded)
    assert_trees_equal(a, b)
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(a))


def test_fedavg_averages_batch_norm_statistics_and_evaluates_with_them():
    with jax.enable_x64(True):
        batch = _client_data(dtype=np.float64)
        model = bn_model()
        algorithm = fedavg(model, optax.sgd(0.2), num_epochs=2, batch_size=4)
        state = algorithm.init(jax.random.key(0))
        state = state._replace(params=float64_params(model))
        initial = state.params
        round_fn = jax.jit(algorithm.round)
        clients = jax.jit(lambda params: jax.vmap(lambda x, y, m, r: local_train(
            model_loss(model.apply), optax.sgd(0.2), params, x, y, m, r, num_epochs=2,
            batch_size=4).params)(batch.x, batch.y, batch.mask, batch.rng))
        weights = client_weights(batch.num_examples)
        for _ in range(2):
            expected = jax.tree.map(lambda leaf: jnp.tensordot(weights, leaf, axes=1),
                                    clients(state.params)["batch_stats"])
            eager = algorithm.round(state, batch)
            state = round_fn(state, batch)
            assert_trees_close(state.params["batch_stats"], expected)
            assert_trees_close(eager, state, rtol=1e-10, atol=1e-12)
        moved = jax.tree.map(lambda a, b: not np.allclose(a, b), state.params["batch_stats"],
                             initial["batch_stats"])
        assert all(jax.tree.leaves(moved))
        logits = algorithm.predict(state, batch)
        alone = algorithm.predict(state, batch._replace(x=batch.x[:, :1]))
        np.testing.assert_allclose(logits[:, :1], alone, rtol=1e-12, atol=1e-12)


def _resnet18_parameter_count(num_classes: int, channels: int = 3, width: int = 64) -> int:
    """ResNet-18's parameters from its layer shapes: bias-free convolutions, a scale and an
    offset per normalised channel, a 1x1 projection where the width changes, the dense layer."""
    conv = lambda size, c_in, c_out: size * size * c_in * c_out
    norm = lambda c: 2 * c
    count, c_in = conv(3, channels, width) + norm(width), width
    for stage in range(4):
        c_out = width * 2**stage
        for _ in range(2):
            count += conv(3, c_in, c_out) + conv(3, c_out, c_out) + 2 * norm(c_out)
            if c_in != c_out:
                count += conv(1, c_in, c_out) + norm(c_out)
            c_in = c_out
    return count + c_in * num_classes + num_classes


def test_resnet18_gn_has_resnet18s_parameters_and_output_shape():
    assert _resnet18_parameter_count(10) == 11_173_962  # kuangliu/pytorch-cifar's ResNet18
    model = resnet18_gn((32, 32, 3), 10)
    assert not model.has_train_mode and not model.has_state
    shapes = jax.eval_shape(model.init, jax.random.key(0))
    assert sum(leaf.size for leaf in jax.tree.leaves(shapes)) == 11_173_962
    assert shapes["Conv_0"]["kernel"].shape == (3, 3, 3, 64) and "bias" not in shapes["Conv_0"]
    assert shapes["Dense_0"]["kernel"].shape == (512, 10)
    images = jax.ShapeDtypeStruct((5, 32, 32, 3), jnp.float32)
    assert jax.eval_shape(model.apply, shapes, images).shape == (5, 10)
    with pytest.raises(OptionError, match=r"model.groups=3 is invalid; must divide "
                                          r"model.width=64"):
        get_model("resnet18_gn", (32, 32, 3), 10, groups=3)


def test_resnet18_gn_normalises_each_example_alone_and_ignores_padding():
    model = resnet18_gn((8, 8, 3), 10, width=8)
    params = jax.jit(model.init)(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (4, 8, 8, 3))
    y, mask = jnp.array([1, 2, 3, 0]), jnp.arange(4) < 3  # the last example is padding
    loss = model_loss(model.apply)
    logits_and_grads = jax.jit(lambda xb: (model.apply(params, xb),
                                           jax.grad(loss)(params, xb, y, mask, None)))
    logits, grads = logits_and_grads(x)
    others, _ = logits_and_grads(x.at[1:].set(5.0 * x[:3]))
    np.testing.assert_allclose(others[0], logits[0], rtol=1e-6, atol=1e-6)
    assert not np.allclose(others[1], logits[1])
    _, padding_changed = logits_and_grads(x.at[3].set(100.0))
    assert_trees_close(padding_changed, grads, rtol=1e-6, atol=1e-7)


def test_resnet18_gn_trains_a_fedavg_round_built_from_the_registries():
    spec, fedavg_spec = REGISTRY["resnet18_gn"], ALGORITHMS["fedavg"]
    model = spec.build(spec.config(width=4), (8, 8, 3), 10)
    data = DataInfo(num_clients=1, num_classes=10, feature_shape=(8, 8, 3), max_examples=6)
    algorithm = fedavg_spec.build(fedavg_spec.config(), model, data, ClientExecution())
    ids = jnp.arange(1, dtype=jnp.int32)
    batch = ClientBatch(x=jax.random.normal(jax.random.key(1), (1, 6, 8, 8, 3)),
                        y=jax.random.randint(jax.random.key(2), (1, 6), 0, 10),
                        mask=jnp.arange(6)[None] < 4, num_examples=jnp.array([4], jnp.int32),
                        client_ids=ids, rng=client_keys(experiment_key(0), 0, ids))
    state = jax.jit(algorithm.init)(jax.random.key(0))
    trained = jax.jit(algorithm.round)(state, batch)
    assert np.isfinite(trained.metrics["train_loss"]) and trained.metrics["participants"] == 1
    moved = jax.tree.map(lambda a, b: not np.allclose(a, b), trained.params, state.params)
    assert all(jax.tree.leaves(moved))
