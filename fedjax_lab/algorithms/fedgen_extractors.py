"""FedGen's head sharing: each client keeps an extractor of its own architecture; only heads move.

References:
    Zhu, Hong, Zhou. "Data-Free Knowledge Distillation for Heterogeneous Federated Learning."
    ICML 2021, arXiv 2105.10056 (the communication-light mode that shares the predictor only).

Clients may use extractors of different architectures as long as they all produce the latent
width the shared head and the generator use. The population's extractors are the per-client state
`FedGenClientState`: one parameter tree per architecture, each stacked over the whole population
(a client's rows of the other architectures are never read nor changed), so a round gathers and
scatters them like any per-client state and a `lax.switch` runs a client's own one.
"""

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lab.core.personal_models import replicate
from fedjax_lab.models.split import SplitModel

PyTree = Any


class FedGenClientState(NamedTuple):
    """Head sharing's per-client state, stacked over the population.

    Attributes:
        extractors: one extractor parameter tree per client architecture, each `[num_clients,
            ...]`; a client trains and uses only the one of its own architecture.
    """

    extractors: tuple[PyTree, ...]


class ClientExtractors(NamedTuple):
    """The clients' own extractors as pure functions (built by `client_extractors`).

    Attributes:
        init: `init(first_extractor, key) -> FedGenClientState`, architecture 0 starting from
            `first_extractor` (the shared model's) and the others from `fold_in(key, j)`.
        architecture_of: `architecture_of(client_ids [C]) -> [C]` each client's architecture.
        extract: `extract(architecture, extractors, x) -> features` with the client's own one.
        keep_own: `keep_own(architecture [C], trained, previous) -> extractors`: each client's
            trained extractor of its own architecture; its rows of the others unchanged.
    """

    init: Callable
    architecture_of: Callable
    extract: Callable
    keep_own: Callable


def client_extractors(model: SplitModel, architectures: Sequence[SplitModel],
                      architecture_of_client: Sequence[int] | None,
                      num_clients: int) -> ClientExtractors:
    """Checks the architectures against `model` and builds the per-client extractor functions.

    Args:
        model: the shared model (its head is shared; its extractor is architecture 0's start).
        architectures: the models whose extractors clients use (their heads are ignored).
        architecture_of_client: `[num_clients]` index into `architectures`; None when there is
            one architecture.
        num_clients: the population size.
    """
    assignment = jnp.asarray(_assignment(model, architectures, architecture_of_client,
                                         num_clients))
    branches = [lambda p, x, arch=arch, j=j: arch.extractor.apply(p[j], x)
                for j, arch in enumerate(architectures)]

    def init(first_extractor, key):
        extractors = tuple(first_extractor if j == 0 else
                           arch.init(jax.random.fold_in(key, j))["extractor"]
                           for j, arch in enumerate(architectures))
        return FedGenClientState(replicate(extractors, num_clients))

    def extract(architecture, extractors, x):
        if len(branches) == 1:
            return branches[0](extractors, x)
        return jax.lax.switch(architecture, branches, extractors, x)

    def keep_own(architecture, trained, previous):
        def keep(j, new, old):
            own = (architecture == j).reshape((-1,) + (1,) * (new.ndim - 1))
            return jnp.where(own, new, old)

        return tuple(jax.tree.map(lambda new, old, j=j: keep(j, new, old), t, p)
                     for j, (t, p) in enumerate(zip(trained, previous)))

    return ClientExtractors(init=init, architecture_of=lambda client_ids: assignment[client_ids],
                            extract=extract, keep_own=keep_own)


def _assignment(model, architectures, architecture_of_client, num_clients) -> np.ndarray:
    for j, arch in enumerate(architectures):
        if (arch.latent_dim, arch.num_classes, tuple(arch.feature_shape)) != (
                model.latent_dim, model.num_classes, tuple(model.feature_shape)):
            raise ValueError(f"client_architectures[{j}] maps {arch.feature_shape} to "
                             f"{arch.latent_dim} features; expected {model.feature_shape} to "
                             f"{model.latent_dim} like model")
    if architecture_of_client is None:
        if len(architectures) > 1:
            raise ValueError("client_architectures has several models; give "
                             "architecture_of_client, one index per client")
        return np.zeros(num_clients, np.int32)
    assignment = np.asarray(architecture_of_client)
    if assignment.shape != (num_clients,) or not np.issubdtype(assignment.dtype, np.integer) \
            or assignment.min() < 0 or assignment.max() >= len(architectures):
        raise ValueError(f"architecture_of_client={architecture_of_client!r} is invalid; "
                         f"expected {num_clients} integers in [0, {len(architectures)})")
    return assignment.astype(np.int32)
