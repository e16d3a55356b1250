"""FedGKT invariants (ALGORITHMS.md §5e): KD_T, alpha = 0 is local CE, logits keyed by sample,
server-side distillation off by default."""

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from common import NUM_CLASSES, NUM_FEATURES, assert_trees_equal, make_clients, stack_clients
from fedjax_lab.algorithms.fedgkt import FedGKTConfig, build, fedgkt
from fedjax_lab.core import local_train, model_loss
from fedjax_lab.core.types import DataInfo
from fedjax_lab.core.distillation import kd_loss
from fedjax_lab.models import mlp
from fedjax_lab.models.split import split_mlp
from fedjax_lab.options import OptionError

LATENT = 4
SIZES = [9, 12, 6, 11, 8, 10]


def _models():
    return (split_mlp((NUM_FEATURES,), NUM_CLASSES, hidden=(LATENT,)),
            mlp((LATENT,), NUM_CLASSES, hidden=(8,)))


@functools.lru_cache(maxsize=None)
def _algorithm(*, lr=0.1, **options):
    """The algorithm and its jitted round, built once per setting (compiles dominate the tests)."""
    client_model, server_model = _models()
    settings = dict(num_clients=len(SIZES), max_examples=12, batch_size=4, client_epochs=2,
                    server_epochs=2)
    settings.update(options)
    algorithm = fedgkt(client_model, server_model, optax.sgd(lr), optax.sgd(0.1), **settings)
    return algorithm, jax.jit(algorithm.round)


@jax.jit
def _local_cross_entropy_training(params, x, y, mask, rng):
    return local_train(model_loss(_models()[0].apply), optax.sgd(0.1), params, x, y, mask, rng,
                       num_epochs=2, batch_size=4)


def _to_float64(tree):
    return jax.tree.map(lambda a: a.astype(jnp.float64)
                        if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def _batch(ids, *, round_index=0, seed=0, dtype=np.float32):
    xs, ys = make_clients(SIZES, dtype=dtype)
    return stack_clients([xs[i] for i in ids], [ys[i] for i in ids], 12, round_index=round_index,
                         seed=seed, client_ids=ids)


def test_kd_is_zero_exactly_when_logits_differ_by_a_row_constant():
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        student = jnp.asarray(rng.normal(size=(6, 5)))
        shift = jnp.asarray(rng.normal(size=(6, 1)) * 10)
        mask = jnp.ones(6, bool)
        for temperature in (1.0, 3.0):
            assert abs(float(kd_loss(student, student + shift, mask, temperature))) < 1e-12
            assert float(kd_loss(student, 2.0 * student, mask, temperature)) > 1e-3
            bumped = student.at[2, 1].add(0.5)  # one row no longer differs by a constant
            assert float(kd_loss(student, bumped, mask, temperature)) > 1e-6
        different = student.at[5].add(jnp.arange(5.0))
        assert float(kd_loss(student, different, mask.at[5].set(False), 3.0)) < 1e-12


@pytest.mark.parametrize("temperature", [1.0, 3.0, 10.0])
def test_kd_gradient_has_the_temperature_scaling(temperature):
    with jax.enable_x64(True):
        rng = np.random.default_rng(1)
        student, teacher = (jnp.asarray(rng.normal(size=(5, 4)) * 3) for _ in range(2))
        mask = jnp.array([True, True, False, True, True])
        grad_student, grad_teacher = jax.grad(kd_loss, argnums=(0, 1))(student, teacher, mask,
                                                                        temperature)
        expected = temperature * (jax.nn.softmax(student / temperature)
                                  - jax.nn.softmax(teacher / temperature)) / 4
        expected = jnp.where(mask[:, None], expected, 0)
        np.testing.assert_allclose(grad_student, expected, rtol=1e-12, atol=1e-15)
        np.testing.assert_array_equal(grad_teacher, 0)


@pytest.mark.parametrize("jit", [False, True])
def test_alpha_beta_zero_client_training_is_local_cross_entropy_training(jit):
    algorithm, jitted = _algorithm(alpha=0.0, beta=0.0)
    round_fn = jitted if jit else algorithm.round
    ids = [0, 2, 4]
    state = jitted(algorithm.init(jax.random.key(0)), _batch(ids))
    second = _batch(ids, round_index=1)
    after = round_fn(state, second)
    assert bool(jnp.all(state.client_states.has_server_logits[jnp.array(ids)]))
    for row, client in enumerate(ids):
        start = jax.tree.map(lambda p: p[client], state.client_states.params)
        local = _local_cross_entropy_training(start, second.x[row], second.y[row],
                                              second.mask[row], second.rng[row])
        assert_trees_equal(jax.tree.map(lambda p: p[client], after.client_states.params),
                           local.params)


def test_first_round_has_no_kd_term_and_later_rounds_do():
    ids = [1, 3]
    (with_kd, kd_round), (_, ce_round) = _algorithm(), _algorithm(alpha=0.0, beta=0.0)
    state = with_kd.init(jax.random.key(0))
    first = [round_fn(state, _batch(ids)) for round_fn in (kd_round, ce_round)]
    assert_trees_equal(first[0].client_states.params, first[1].client_states.params)
    second = [round_fn(first[0], _batch(ids, round_index=1)) for round_fn in (kd_round, ce_round)]
    assert float(second[0].metrics["train_loss"]) > float(second[1].metrics["train_loss"])


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_server_distillation_is_off_by_default_so_client_logits_cannot_move_the_server(beta):
    """beta = 0 is the original scripts' default (`--whether_distill_on_the_server 0`): S trains
    on CE(S(H), y) alone. With frozen clients (rate 0), changing their heads changes the logits z_c
    they upload but not their features H, so it moves the server only when beta > 0."""
    assert inspect.signature(fedgkt).parameters["beta"].default == 0.0 == FedGKTConfig().beta
    algorithm, round_fn = _algorithm(lr=0.0) if beta == 0 else _algorithm(lr=0.0, beta=beta)
    state = algorithm.init(jax.random.key(0))
    params = state.client_states.params
    other_heads = state._replace(client_states=state.client_states._replace(params={
        **params, "head": jax.tree.map(lambda h: 3 * h + 1, params["head"])}))
    batch = _batch([0, 2, 4])
    server, other_server = (round_fn(s, batch).params for s in (state, other_heads))
    if beta == 0:
        assert_trees_equal(server, other_server)
    else:
        assert not all(np.allclose(a, b) for a, b in zip(jax.tree.leaves(server),
                                                        jax.tree.leaves(other_server)))


def test_build_names_an_unknown_server_model():
    with pytest.raises(OptionError, match="server_model='resnet' is invalid"):
        build(FedGKTConfig(server_model="resnet"), _models()[0],
              DataInfo(len(SIZES), NUM_CLASSES, (NUM_FEATURES,), 12))


def test_server_logits_are_stored_per_sample_and_unsampled_clients_are_untouched():
    algorithm, round_fn = _algorithm()
    client_model, server_model = _models()
    state = algorithm.init(jax.random.key(3))
    ids = [4, 0, 2]
    after = round_fn(state, _batch(ids))
    batch = _batch(ids)
    for row, client in enumerate(ids):
        params = jax.tree.map(lambda p: p[client], after.client_states.params)
        expected = server_model.apply(after.params, client_model.extract(params, batch.x[row]))
        n = SIZES[client]
        np.testing.assert_allclose(after.client_states.server_logits[client, :n], expected[:n],
                                   rtol=1e-5, atol=1e-6)
        assert not np.allclose(after.client_states.server_logits[client, :n], 0)
    for client in (1, 3, 5):
        assert_trees_equal(jax.tree.map(lambda leaf: leaf[client], after.client_states),
                           jax.tree.map(lambda leaf: leaf[client], state.client_states))


def test_reordering_the_local_batches_does_not_change_which_logit_a_sample_gets():
    """With a zero learning rate a round's loss is the mean over samples of CE + alpha KD, which
    does not depend on the order the batches visit them only if z_s is looked up by sample id.
    Rolling the cached logits by one sample (batch-position keying after a reshuffle) changes it."""
    with jax.enable_x64(True):
        algorithm, round_fn = _algorithm(lr=0.0, alpha=1.0, client_epochs=1, batch_size=3)
        state = _to_float64(algorithm.init(jax.random.key(0)))
        cached = jax.random.normal(jax.random.key(1), state.client_states.server_logits.shape,
                                   jnp.float64)
        state = state._replace(client_states=state.client_states._replace(
            server_logits=3 * cached, has_server_logits=jnp.ones(len(SIZES), bool)))
        ids = [0, 1, 2]  # 9, 12 and 6 examples: whole batches of 3, so every batch mean counts

        def loss(state, seed):
            batch = _batch(ids, round_index=1, seed=seed, dtype=np.float64)
            return float(round_fn(state, batch).metrics["train_loss"])

        losses = [loss(state, seed) for seed in range(3)]
        np.testing.assert_allclose(losses, losses[0], rtol=1e-12)
        without_logits = state._replace(client_states=state.client_states._replace(
            has_server_logits=jnp.zeros(len(SIZES), bool)))
        assert losses[0] > loss(without_logits, 0) + 1e-3
        rolled = state._replace(client_states=state.client_states._replace(
            server_logits=jnp.roll(state.client_states.server_logits, 1, axis=1)))
        assert abs(loss(rolled, 0) - losses[0]) > 1e-3


@pytest.mark.parametrize("prediction", ["server", "client"])
def test_prediction_uses_the_server_model_on_client_features_or_the_client_head(prediction):
    algorithm, round_fn = _algorithm()
    client_model, server_model = _models()
    state = round_fn(algorithm.init(jax.random.key(0)), _batch([3, 5]))
    algorithm, _ = _algorithm(prediction=prediction)
    batch = _batch([5, 3])
    logits = jax.jit(algorithm.predict)(state, batch)
    for row, client in enumerate([5, 3]):
        params = jax.tree.map(lambda p: p[client], state.client_states.params)
        features = client_model.extract(params, batch.x[row])
        expected = (server_model.apply(state.params, features) if prediction == "server"
                    else client_model.head.apply(params["head"], features))
        np.testing.assert_allclose(logits[row], expected, rtol=1e-5, atol=1e-6)


def test_bytes_moved_are_features_logits_and_labels_never_parameters():
    ids = [0, 3, 4]
    algorithm, round_fn = _algorithm()
    metrics = round_fn(algorithm.init(jax.random.key(0)), _batch(ids)).metrics
    examples = sum(SIZES[i] for i in ids)
    assert float(metrics["bytes_up"]) == examples * (LATENT * 4 + NUM_CLASSES * 4 + 4)
    assert float(metrics["bytes_down"]) == examples * NUM_CLASSES * 4
    assert float(metrics["bytes_features"]) == examples * LATENT * 4
    assert float(metrics["bytes_parameters"]) == 0.0


def test_fedgkt_validates_its_options_and_the_batch_length():
    client_model, server_model = _models()
    build = lambda **kw: fedgkt(client_model, kw.pop("server", server_model), optax.sgd(0.1),
                                optax.sgd(0.1), **{"num_clients": 4, "max_examples": 12, **kw})
    with pytest.raises(ValueError, match="alpha=-1.0 is invalid; expected alpha >= 0"):
        build(alpha=-1.0)
    with pytest.raises(ValueError, match="temperature=0.0 is invalid"):
        build(temperature=0.0)
    with pytest.raises(ValueError, match="prediction 'both' is unknown"):
        build(prediction="both")
    with pytest.raises(ValueError, match="max_examples=0 is invalid"):
        build(max_examples=0)
    with pytest.raises(ValueError, match=r"expected \(4,\) \(the client features\)"):
        build(server=mlp((7,), NUM_CLASSES))
    algorithm = build(max_examples=20)
    with pytest.raises(ValueError, match="padded to 12 examples; expected max_examples=20"):
        algorithm.round(algorithm.init(jax.random.key(0)), _batch([0, 1]))
