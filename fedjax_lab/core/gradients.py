"""One stochastic gradient per client: the client work of gradient-communicating algorithms.

signSGD, medianSGD (Chen et al., NeurIPS 2020, arXiv 1906.01736) and FetchSGD (Rothchild et al.,
ICML 2020, arXiv 2007.07682) have each client compute a single gradient g_i = grad f_i(w_t; batch)
at the broadcast model instead of running local epochs. The minibatch is the one `local_train`'s
first step draws from the same client key (the first `batch_size` entries of epoch 0's
permutation of the client's real examples, with the same step key), so one step of `local_train`
with `optax.sgd(eta)` moves w_t by -eta * g_i; padded examples never enter the batch, and a client
holding fewer than `batch_size` examples uses all of them.
"""

from typing import Any

import jax
import jax.numpy as jnp

from fedjax_lab.core.local_training import LossFn, epoch_permutation
from fedjax_lab.core.types import ClientStream

PyTree = Any


def minibatch_gradient(loss_fn: LossFn, params: PyTree, x: jax.Array, y: jax.Array,
                       mask: jax.Array, rng: jax.Array, *,
                       batch_size: int | None) -> tuple[jax.Array, PyTree]:
    """The loss and gradient of one client's minibatch at `params` (unbatched; map it).

    Args:
        loss_fn: `loss_fn(params, x_batch, y_batch, mask_batch, rng)`, mean over real examples.
        params: the broadcast model w_t.
        x: `[N, *feature_shape]` the client's padded examples.
        y: `[N]` labels.
        mask: `[N]` bool, True for real examples.
        rng: the client's round key.
        batch_size: examples in the minibatch; None uses all of the client's real examples.

    Returns:
        `(loss, gradient)`; both are 0 for a client with no examples.
    """
    x, y, mask = jnp.asarray(x), jnp.asarray(y), jnp.asarray(mask)
    step_key = jax.random.fold_in(jax.random.fold_in(
        jax.random.fold_in(rng, ClientStream.STEP), 0), 0)
    if batch_size is not None:
        size = min(batch_size, mask.shape[0])
        shuffle_key = jax.random.fold_in(jax.random.fold_in(rng, ClientStream.SHUFFLE), 0)
        indices = epoch_permutation(shuffle_key, mask)[:size]
        x, y = x[indices], y[indices]
        mask = jnp.arange(size) < jnp.sum(mask, dtype=jnp.int32)
    return jax.value_and_grad(loss_fn)(params, x, y, mask, step_key)
