"""Attack simulation (core/attacks.py): seeded malicious set and the three Ditto attacks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import make_clients, stack_clients
from fedjax_lab.core.attacks import Attack


def test_malicious_set_has_the_chosen_size_is_seeded_and_fixed():
    attack = Attack("gaussian", fraction=0.3, num_clients=20, seed=4)
    chosen = np.asarray(attack.malicious_clients())
    assert chosen.sum() == 6
    np.testing.assert_array_equal(chosen, np.asarray(attack.malicious_clients()))
    other = np.asarray(Attack("gaussian", fraction=0.3, num_clients=20, seed=5)
                       .malicious_clients())
    assert not np.array_equal(chosen, other)
    ids = jnp.asarray([3, 0, 17], jnp.int32)
    np.testing.assert_array_equal(attack.is_malicious(ids), chosen[[3, 0, 17]])


def test_a_traced_seed_chooses_the_clients_and_labels_of_its_int():
    xs, ys = make_clients([30] * 6)
    batch = stack_clients(xs, ys)

    def attacked(seed):
        attack = Attack("random_labels", fraction=0.5, num_clients=6, num_classes=3, seed=seed)
        return attack.malicious_clients(), attack.poison_batch(batch).y

    traced = jax.jit(attacked)
    for seed in (0, 1, 7):
        for got, want in zip(traced(jnp.asarray(seed, jnp.int32)), attacked(seed)):
            np.testing.assert_array_equal(got, want)
    assert traced._cache_size() == 1


def batch_with_all_malicious(num_clients=4, seed=0):
    xs, ys = make_clients([6] * num_clients, seed=seed)
    return stack_clients(xs, ys)


def test_random_labels_change_only_malicious_clients_and_stay_fixed_across_rounds():
    xs, ys = make_clients([30] * 6)
    attack = Attack("random_labels", fraction=0.5, num_clients=6, num_classes=3, seed=1)
    malicious = np.asarray(attack.malicious_clients())
    round_0 = attack.poison_batch(stack_clients(xs, ys, round_index=0))
    round_9 = attack.poison_batch(stack_clients(xs, ys, round_index=9))
    np.testing.assert_array_equal(round_0.y, round_9.y)
    clean = np.stack(ys)
    np.testing.assert_array_equal(np.asarray(round_0.y)[~malicious], clean[~malicious])
    assert np.mean(np.asarray(round_0.y)[malicious] != clean[malicious]) > 0.4
    assert set(np.unique(np.asarray(round_0.y))) <= {0, 1, 2}


def test_gaussian_updates_have_the_true_updates_scale_and_are_fresh_noise():
    with jax.enable_x64(True):
        batch = batch_with_all_malicious()
        rng = np.random.default_rng(0)
        updates = {"w": jnp.asarray(rng.normal(0.0, 3.0, (4, 200, 10))),
                   "b": jnp.asarray(rng.normal(0.0, 3.0, (4, 10)))}
        attack = Attack("gaussian", fraction=1.0, num_clients=4)
        sent = attack.corrupt_updates(updates, batch)
        for i in range(4):
            true = np.concatenate([np.asarray(updates["w"][i]).ravel(),
                                   np.asarray(updates["b"][i])])
            noise = np.concatenate([np.asarray(sent["w"][i]).ravel(), np.asarray(sent["b"][i])])
            np.testing.assert_allclose(noise.std(), true.std(), rtol=0.05)
            assert abs(np.corrcoef(noise, true)[0, 1]) < 0.1


def test_scaled_updates_boost_by_the_cohort_size_by_default_and_honest_rows_are_untouched():
    batch = batch_with_all_malicious()
    updates = {"v": jnp.arange(12.0).reshape(4, 3)}
    attack = Attack("scaled", fraction=0.5, num_clients=4, seed=2)
    malicious = np.asarray(attack.is_malicious(batch.client_ids))
    sent = np.asarray(attack.corrupt_updates(updates, batch)["v"])
    expected = np.where(malicious[:, None], 4 * np.asarray(updates["v"]), updates["v"])
    np.testing.assert_array_equal(sent, expected)
    boosted = Attack("scaled", fraction=1.0, num_clients=4, boost=2.5).corrupt_updates(updates,
                                                                                    batch)
    np.testing.assert_array_equal(boosted["v"], 2.5 * np.asarray(updates["v"]))
    assert attack.poison_batch(batch) is batch
    ditto_a3 = Attack("scaled", fraction=1.0, num_clients=4, num_classes=3, poison_labels=True)
    assert not np.array_equal(ditto_a3.poison_batch(batch).y, batch.y)


def test_no_attack_is_the_identity_and_bad_options_are_named():
    batch = batch_with_all_malicious()
    updates = {"v": jnp.ones((4, 2))}
    none = Attack()
    assert none.poison_batch(batch) is batch
    assert none.corrupt_updates(updates, batch) is updates
    with pytest.raises(ValueError, match="attack 'flip' is unknown"):
        Attack("flip")
    with pytest.raises(ValueError, match="fraction=1.5 is invalid"):
        Attack("scaled", fraction=1.5, num_clients=3)
    with pytest.raises(ValueError, match="num_classes=None is invalid"):
        Attack("random_labels", fraction=0.1, num_clients=3)
    with pytest.raises(ValueError, match="num_classes=None is invalid"):
        Attack("scaled", fraction=0.1, num_clients=3, poison_labels=True)
