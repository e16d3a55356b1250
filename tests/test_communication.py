"""`core.communication`: byte counts stay right past 2 GiB a round, eager and jitted.

An int32 count of participants times a model's bytes wrapped to a negative `bytes_up` (here
-1.79e9 for 100 clients of a 25 MB model) before the count became a float.
"""

import jax
import jax.numpy as jnp
import pytest

from fedjax_lab.core import participants_bytes
from fedjax_lab.core.communication import model_exchange_bytes, tree_bytes

# 11M float32 parameters (ResNet-18's size): 44 MB a client, 2 GiB at 49 clients.
MODEL = jax.ShapeDtypeStruct((11_000_000,), jnp.float32)
# 60 of a cohort of 100 take part.
WEIGHTS = jnp.where(jnp.arange(100) < 60, 1 / 60, 0.0)


@pytest.mark.parametrize("transform", [lambda f: f, jax.jit], ids=["eager", "jitted"])
def test_model_exchange_past_two_gibibytes(transform):
    moved = transform(lambda weights: model_exchange_bytes(weights, MODEL))(WEIGHTS)
    # Both products are multiples of 256, exact in float32 at this size.
    assert float(moved["bytes_up"]) == 60 * 44_000_000
    assert float(moved["bytes_down"]) == 100 * 44_000_000


@pytest.mark.parametrize("transform", [lambda f: f, jax.jit], ids=["eager", "jitted"])
def test_participants_bytes_of_a_client_share_over_int32(transform):
    share = jax.ShapeDtypeStruct((600_000_000,), jnp.float32)
    assert tree_bytes(share) > jnp.iinfo(jnp.int32).max
    sent = transform(lambda weights: participants_bytes(weights, tree_bytes(share)))(
        jnp.array([0.5, 0.5, 0.0]))
    assert float(sent) == 2 * 2_400_000_000
