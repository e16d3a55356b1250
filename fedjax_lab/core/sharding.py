"""Clients sharded across devices: the mesh, the sharded client map, and state placement.

A mesh has a `clients` axis (and optionally a `model` axis left to XLA's partitioner). The
"sharded" client-execution strategy pads the cohort to a multiple of the `clients` axis size,
runs `shard_map` over that axis with an ordinary single-device strategy inside each shard (so a
conv program still runs "unrolled" on CPU, a large shard still runs "chunked"), and returns the
stacked outputs sharded along `clients`; `map_reduce`'s weighted sum is a per-shard sum followed
by one `psum`. Per-client state stacked over the population (`client_states`) and the padded
training population are placed sharded along `clients` too, so a population whose state does not
fit on one device is spread over all of them, and `on_mesh` keeps it that way across the
rounds of a scan.

Pitfalls avoided: padded slots repeat the cohort's last client (a real program on real data,
never a NaN from an empty client) with aggregation weight 0, and their outputs are sliced off
before the algorithm sees them, so padding never writes client state; the mesh is built with
`AxisType.Auto` (jax 0.10's `make_mesh` defaults to explicit axes, under which `shard_map`
refuses to reshard its inputs); an array whose leading axis does not divide by the axis size
cannot be sharded evenly (`device_put` refuses it), so it is replicated instead; `shard_map`'s
varying-across-devices type check is off, because client programs legitimately start loops from
values shared by all clients (the global model) and end them with per-client values.
"""

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

PyTree = Any
CLIENTS = "clients"
MODEL = "model"


def client_mesh(devices: Sequence[jax.Device] | None = None, *, model_axis_size: int = 1) -> Mesh:
    """A mesh with a `clients` axis over `devices` (default: every visible device, all hosts).

    With `model_axis_size > 1` the mesh is `(clients, model)`; clients are sharded along
    `clients` and the `model` axis is left to XLA's automatic partitioner.
    """
    devices = np.asarray(jax.devices() if devices is None else devices, dtype=object).ravel()
    if isinstance(model_axis_size, bool) or not isinstance(model_axis_size, int) or \
            model_axis_size < 1 or len(devices) % model_axis_size:
        raise ValueError(f"model_axis_size={model_axis_size!r} is invalid; expected a positive "
                         f"divisor of the number of devices ({len(devices)})")
    if model_axis_size == 1:
        return Mesh(devices, (CLIENTS,), axis_types=(AxisType.Auto,))
    return Mesh(devices.reshape(-1, model_axis_size), (CLIENTS, MODEL),
                axis_types=(AxisType.Auto, AxisType.Auto))


def default_mesh() -> Mesh | None:
    """`client_mesh()` when several devices are visible, None on a single device."""
    return client_mesh() if jax.device_count() > 1 else None


def inside_client_shards() -> bool:
    """True while tracing the body of a `shard_map` over `clients` (a client program nested in
    a sharded map must not shard again)."""
    return CLIENTS in getattr(jax.sharding.get_abstract_mesh(), "manual_axes", ())


def num_shards(mesh: Mesh) -> int:
    """The size of the mesh's `clients` axis."""
    return mesh.shape[CLIENTS]


def padded_size(num_clients: int, multiple: int) -> int:
    """`num_clients` rounded up to a multiple of `multiple`."""
    return -(-num_clients // multiple) * multiple


def pad_rows(tree: PyTree, size: int) -> PyTree:
    """Pads every leaf's leading axis to `size` by repeating its last row."""
    def pad(leaf):
        missing = size - leaf.shape[0]
        return leaf if missing == 0 else jnp.concatenate(
            [leaf, jnp.repeat(leaf[-1:], missing, axis=0)])
    return jax.tree.map(pad, tree)


def _num_clients(tree: PyTree) -> int:
    return jax.tree.leaves(tree)[0].shape[0]


def _shard_call(mesh: Mesh, body: Callable, args: tuple, out_specs) -> Any:
    return jax.shard_map(body, mesh=mesh, in_specs=PartitionSpec(CLIENTS), out_specs=out_specs,
                         axis_names=frozenset({CLIENTS}), check_vma=False)(*args)


def sharded_map(run_shard: Callable[[PyTree], PyTree], per_client: PyTree,
                mesh: Mesh) -> PyTree:
    """`run_shard` (a single-device client map) on each device's slice of `per_client`.

    Returns the outputs stacked over the cohort's clients, sharded along `clients`.
    """
    num_clients = _num_clients(per_client)
    padded = pad_rows(per_client, padded_size(num_clients, num_shards(mesh)))
    stacked = _shard_call(mesh, run_shard, (padded,), PartitionSpec(CLIENTS))
    return jax.tree.map(lambda leaf: leaf[:num_clients], stacked)


def sharded_map_reduce(run_shard: Callable[[PyTree, jax.Array], tuple[PyTree, PyTree]],
                       per_client: PyTree, weights: jax.Array,
                       mesh: Mesh) -> tuple[PyTree, PyTree]:
    """`run_shard(shard, shard_weights) -> (weighted sum, stacked others)` on every device.

    The shards' sums are added with one `psum` over `clients`; padded slots have weight 0.
    """
    num_clients = _num_clients(per_client)
    size = padded_size(num_clients, num_shards(mesh))
    padded = pad_rows(per_client, size)
    padded_weights = jnp.pad(weights, (0, size - num_clients))

    def body(shard, shard_weights):
        total, others = run_shard(shard, shard_weights)
        return jax.lax.psum(total, CLIENTS), others

    total, others = _shard_call(mesh, body, (padded, padded_weights),
                                (PartitionSpec(), PartitionSpec(CLIENTS)))
    return total, jax.tree.map(lambda leaf: leaf[:num_clients], others)


def client_sharding(mesh: Mesh, shape: Sequence[int]) -> NamedSharding:
    """Sharded along `clients` on the leading axis when it divides evenly, else replicated."""
    if len(shape) and shape[0] % num_shards(mesh) == 0:
        return NamedSharding(mesh, PartitionSpec(CLIENTS))
    return NamedSharding(mesh, PartitionSpec())


def state_shardings(state: PyTree, mesh: Mesh) -> PyTree:
    """Shardings for a server state: `client_states` along `clients`, the rest replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    shardings = jax.tree.map(lambda _: replicated, state)
    client_states = getattr(state, "client_states", None)
    if client_states is None or not hasattr(state, "_replace"):
        return shardings
    return shardings._replace(client_states=jax.tree.map(
        lambda leaf: client_sharding(mesh, np.shape(leaf)), client_states))


def place(tree: PyTree, shardings: PyTree) -> PyTree:
    """Puts host or device values on their shardings; works across hosts (every process
    holds the same full values, each places only its own devices' slices)."""
    def put(leaf, sharding):
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            return jax.device_put(leaf, sharding)
        value = np.asarray(leaf)
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])
    return jax.tree.map(put, tree, shardings)


def place_state(state: PyTree, mesh: Mesh) -> PyTree:
    """The server state on the mesh, `client_states` sharded along `clients`."""
    return place(state, state_shardings(state, mesh))


def place_population(population: PyTree, mesh: Mesh) -> PyTree:
    """A padded population (leaves `[num_clients, ...]`) sharded along `clients`."""
    return place(population, jax.tree.map(lambda leaf: client_sharding(mesh, np.shape(leaf)),
                                          population))


def on_mesh(algorithm, mesh: Mesh):
    """`algorithm` with its round's output state kept on `state_shardings` and its predictions
    replicated.

    Inside a scan the carry's placement is otherwise XLA's choice, which may gather the
    population's state onto every device; a sharded prediction could not be read by a host
    that does not hold all of its rows (multi-host evaluation).
    """
    replicated = NamedSharding(mesh, PartitionSpec())

    def round_fn(state, batch):
        new_state = algorithm.round(state, batch)
        return jax.lax.with_sharding_constraint(new_state, state_shardings(new_state, mesh))

    def replicate(predict):
        if predict is None:
            return None
        return lambda *args: jax.lax.with_sharding_constraint(predict(*args), replicated)

    return algorithm._replace(round=round_fn, predict=replicate(algorithm.predict),
                              predict_global=replicate(algorithm.predict_global),
                              adapted_predict=replicate(algorithm.adapted_predict))
