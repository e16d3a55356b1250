"""How the clients of a round are run: one client program, several execution strategies.

Following fedjax's split between the client program and its back end, an algorithm writes what
one client does and hands it to `ClientExecution.map` (outputs stacked over clients) or
`ClientExecution.map_reduce` (a weighted sum of one output plus stacked small outputs); the
strategy is chosen separately and never hard-coded by an algorithm. Strategies:

- "auto" (the default): picked when the round is traced, from the backend, the client program and
  the cohort; `resolve` shows the choice. On CPU a program containing convolutions runs its
  clients "unrolled" (in chunks of `UNROLLED_CHUNK` when the cohort is larger), because XLA:CPU
  turns per-client convolution weights under vmap into grouped convolutions that run 10-50x
  slower (shared/XLA_CPU.md); a program with a recurrent time loop (a loop a model marks with
  `RECURRENT_SCOPE`, as the text LSTMs do) runs its clients "sequential", because under vmap
  every time step's small per-client matmuls become batched matmuls that XLA:CPU runs 1.8-3.7x
  slower than one client's plain ones (benchmarks/RESULTS.md, text rows), and so does a client
  whose update is larger than `CPU_SEQUENTIAL_BYTES` (a model whose per-client weights the
  batched matmuls of vmap would stream from memory at every step). Otherwise "vmap", or
  "chunked" when the cohort's working set
  (about `WORKING_SET_FACTOR` times the per-client inputs and outputs) exceeds `memory_budget`.
  On CPU it also warns when the program holds a 2-D convolution in another layout than
  NHWC/HWIO/NHWC: that is `lax.conv`'s own gradient (a model on `flax.linen.Conv`), which
  XLA:CPU runs on a slow generic kernel inside loops; `fedjax_lab.models.Conv` is the drop-in
  whose gradient stays canonical (models/conv.py).
- "vmap": all clients as one batched program (fastest for small models).
- "chunked": a loop over chunks of `chunk_size` clients, vmapped (or unrolled, with
  `chunk_strategy="unrolled"`) within each chunk. With `map_reduce` the loop carries a running
  weighted sum, so peak memory is set by the chunk, not the cohort.
- "sequential": a loop over single clients inside the same compiled round.
- "unrolled": a Python loop over clients traced into one program; XLA:CPU runs convolution
  backward passes fastest outside loops, at the cost of compile time that grows with the cohort.
- "sharded": the cohort split over the `clients` axis of a device mesh (`mesh`, default every
  visible device), each device running its share with `shard_strategy` ("auto": resolved on the
  shard); `map_reduce` sums across devices with one psum (core/sharding.py). "auto" picks it when
  several devices are visible and the cohort has at least as many clients as devices.
"""

import contextlib
import dataclasses
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.extend.core import jaxpr_as_fun

from fedjax_lab.core import sharding
from fedjax_lab.core.communication import tree_bytes
from fedjax_lab.core.local_training import client_alone

PyTree = Any
STRATEGIES = ("auto", "vmap", "chunked", "sequential", "unrolled", "sharded")
SHARD_STRATEGIES = ("auto", "vmap", "chunked", "sequential", "unrolled")
CHUNK_STRATEGIES = ("vmap", "unrolled")
# Clients traced side by side per chunk when "auto" unrolls a conv program: bounds compile time.
UNROLLED_CHUNK = 10
# Live copies of a client's inputs and outputs during local training (params, gradients,
# optimiser state, the update): the multiplier behind "auto"'s working-set estimate.
WORKING_SET_FACTOR = 4
_CONVOLUTIONS = ("conv_general_dilated",)
# The one 2-D convolution layout XLA:CPU's fast kernels take inside loops (shared/XLA_CPU.md).
_CANONICAL_CONV = jax.lax.conv_dimension_numbers((1,) * 4, (1,) * 4, ("NHWC", "HWIO", "NHWC"))
# The `jax.named_scope` a model puts around a recurrent time loop, so "auto" can recognise it.
RECURRENT_SCOPE = "recurrent_time_loop"
# On CPU, a client whose outputs (its update or model) exceed this many bytes runs its steps
# faster alone than vmapped: every vmapped step reads each client's own weights through batched
# matmuls. Measured (benchmarks/RESULTS.md, "How a round's cost grows"): the default job's MLP
# 64-200-200-10 (220 KB) 1.5-2.1x faster sequential than vmapped at 10-100 clients, the MLP
# 784-200-200-10 (800 KB) 1.8-3.7x at 100-1,000; logistic regression 60->10 (2.4 KB) 1.5x
# slower sequential at 1,000. Where between 2.4 and 220 KB the crossover lies was not measured.
CPU_SEQUENTIAL_BYTES = 2**16


@dataclasses.dataclass(frozen=True)
class ClientExecution:
    """An execution strategy for per-client work.

    Attributes:
        strategy: one of STRATEGIES.
        chunk_size: clients per chunk, required by (and only meaningful for) "chunked".
        chunk_strategy: how the clients within a chunk run, "vmap" or "unrolled".
        memory_budget: bytes "auto" lets the clients of one chunk occupy.
        mesh: the device mesh of "sharded" (a `clients` axis, `sharding.client_mesh`); None
            builds one over every visible device when the round is traced.
        shard_strategy: how each device runs its share under "sharded" (not "sharded").
    """

    strategy: str = "auto"
    chunk_size: int | None = None
    chunk_strategy: str = "vmap"
    memory_budget: int = 2**29
    mesh: Any = None
    shard_strategy: str = "auto"

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"execution strategy {self.strategy!r} is unknown; "
                             f"allowed: {', '.join(STRATEGIES)}")
        if self.shard_strategy not in SHARD_STRATEGIES:
            raise ValueError(f"shard_strategy {self.shard_strategy!r} is unknown; "
                             f"allowed: {', '.join(SHARD_STRATEGIES)}")
        if self.strategy == "chunked" or (self.strategy == "sharded"
                                          and self.shard_strategy == "chunked"):
            if not isinstance(self.chunk_size, int) or self.chunk_size < 1:
                raise ValueError(f"chunk_size={self.chunk_size!r} is invalid for the chunked "
                                 "strategy; expected a positive integer")
        if self.mesh is not None and sharding.CLIENTS not in self.mesh.axis_names:
            raise ValueError(f"mesh axes {self.mesh.axis_names} have no {sharding.CLIENTS!r} "
                             "axis; build the mesh with fedjax_lab.core.sharding.client_mesh")
        if self.chunk_strategy not in CHUNK_STRATEGIES:
            raise ValueError(f"chunk_strategy {self.chunk_strategy!r} is unknown; "
                             f"allowed: {', '.join(CHUNK_STRATEGIES)}")
        if not isinstance(self.memory_budget, int) or self.memory_budget < 1:
            raise ValueError(f"memory_budget={self.memory_budget!r} is invalid; expected a "
                             "positive number of bytes")

    def resolve(self, client_fn: Callable[[PyTree], PyTree],
                per_client: PyTree) -> "ClientExecution":
        """The concrete strategy "auto" picks for this client program and cohort."""
        return self._resolve_program(client_fn, per_client)[0]

    def _resolve_local(self, client: "_ClientProgram") -> "ClientExecution":
        """"auto"'s choice among the single-device strategies."""
        if self.strategy != "auto":
            return self
        num_clients = _num_clients(client.per_client)
        # One trace of the client program serves the convolution check, the working set and,
        # replayed, the clients' vmap.
        closed, outputs = client.trace(alone=False)
        program = closed.jaxpr
        if jax.default_backend() == "cpu":
            if _jaxpr_has(program, lambda equation: equation.primitive.name in _CONVOLUTIONS):
                if _jaxpr_has(program, _is_slow_conv):
                    warnings.warn("the client program has 2-D convolutions outside the "
                                  "NHWC/HWIO layout (flax.linen.Conv's gradient), which XLA:CPU "
                                  "runs about 10x slower inside loops; build the model on "
                                  "fedjax_lab.models.Conv, its drop-in with a fast gradient",
                                  stacklevel=2)
                if num_clients <= UNROLLED_CHUNK:
                    return ClientExecution("unrolled")
                return ClientExecution("chunked", UNROLLED_CHUNK, chunk_strategy="unrolled")
            if (_jaxpr_has(program, _is_recurrent_loop)
                    or tree_bytes(outputs) > CPU_SEQUENTIAL_BYTES):
                return ClientExecution("sequential")
        per_client_bytes = WORKING_SET_FACTOR * (tree_bytes(client.one_client)
                                                 + tree_bytes(outputs))
        fitting = max(1, self.memory_budget // max(per_client_bytes, 1))
        if num_clients <= fitting:
            return ClientExecution("vmap")
        # As few chunks as fit, of equal size: a last chunk shifted back over clients already
        # run repeats their work (10,000 clients in chunks of 4,978 trained 14,934).
        num_chunks = -(-num_clients // fitting)
        return ClientExecution("chunked", -(-num_clients // num_chunks))

    def map(self, client_fn: Callable[[PyTree], PyTree], per_client: PyTree) -> PyTree:
        """Applies `client_fn` to each client's slice of `per_client` (leaves `[C, ...]`).

        Values shared by all clients (the global model) are closed over by `client_fn`.
        Returns `client_fn`'s outputs stacked along a leading client axis.
        """
        concrete, client = self._resolve_program(client_fn, per_client)
        if concrete.strategy == "sharded":
            return sharding.sharded_map(
                lambda shard: concrete._in_shard(client_fn, shard).map(client_fn, shard),
                per_client, concrete._mesh())
        if concrete.strategy == "vmap":
            return jax.vmap(client.replay(alone=False))(per_client)
        if concrete.strategy == "unrolled":
            return _unrolled(client)
        chunk_size = 1 if concrete.strategy == "sequential" else concrete.chunk_size
        _, stacked = _chunked_reduce(client, None, chunk_size, concrete.chunk_strategy)
        return stacked

    def map_reduce(self, client_fn: Callable[[PyTree], tuple[PyTree, PyTree]],
                   per_client: PyTree, weights: jax.Array) -> tuple[PyTree, PyTree]:
        """Runs `client_fn(client) -> (summand, other)` on every client.

        Returns `(sum_i weights[i] * summand_i, others stacked over clients)`. Under "chunked"
        and "sequential" the sum is carried through the client loop, so the per-client summands
        (typically model updates) are never all in memory at once.
        """
        concrete, client = self._resolve_program(client_fn, per_client)
        if concrete.strategy == "sharded":
            return sharding.sharded_map_reduce(
                lambda shard, shard_weights: concrete._in_shard(client_fn, shard).map_reduce(
                    client_fn, shard, shard_weights), per_client, weights, concrete._mesh())
        if concrete.strategy in ("vmap", "unrolled"):
            summands, others = (jax.vmap(client.replay(alone=False))(per_client)
                                if concrete.strategy == "vmap" else _unrolled(client))
            return _weighted_sum(summands, weights), others
        chunk_size = 1 if concrete.strategy == "sequential" else concrete.chunk_size
        return _chunked_reduce(client, weights, chunk_size, concrete.chunk_strategy)

    def _resolve_program(self, client_fn, per_client) -> tuple["ClientExecution",
                                                                "_ClientProgram"]:
        """`resolve`'s choice and the client program it traced, to replay rather than trace
        again."""
        client = _ClientProgram(client_fn, per_client)
        if self.strategy != "auto":
            return self, client
        devices = jax.device_count() if self.mesh is None else sharding.num_shards(self.mesh)
        if 1 < devices <= _num_clients(per_client) and not sharding.inside_client_shards():
            return dataclasses.replace(self, strategy="sharded"), client
        return self._resolve_local(client), client

    def _mesh(self):
        return sharding.client_mesh() if self.mesh is None else self.mesh

    def _in_shard(self, client_fn, shard: PyTree) -> "ClientExecution":
        """The single-device strategy one device runs its shard with (auto: fit to the shard)."""
        inner = dataclasses.replace(self, strategy=self.shard_strategy, mesh=None)
        return inner._resolve_local(_ClientProgram(client_fn, shard))


class _ClientProgram:
    """A client program on the clients of `per_client` (leaves `[C, ...]`), traced for one
    client at most once per mode and replayed from its jaxpr wherever it runs.

    The mode is whether the client runs alone (`client_alone`: unrolled or one at a time) or
    under vmap, whose traces differ. A replay binds the recorded operations without running the
    Python again (a model's flax code, the local training loop): "auto"'s analysis, the shapes a
    client loop needs and each client of an unrolled chunk share one trace, where each was a
    trace of its own. The replayed program is the traced one, operation for operation.
    """

    def __init__(self, client_fn: Callable[[PyTree], PyTree], per_client: PyTree):
        self.per_client = per_client
        self.one_client = jax.tree.map(
            lambda leaf: jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype,
                                              weak_type=jax.typeof(leaf).weak_type),
            per_client)
        self._client_fn = client_fn
        self._traces = {}

    def trace(self, *, alone: bool):
        """(the closed jaxpr of one client, its outputs' shapes)."""
        if alone not in self._traces:
            # A function of its own per mode: JAX caches traces by function, and the mode is a
            # context it does not see.
            def in_mode(client):
                with client_alone() if alone else contextlib.nullcontext():
                    return self._client_fn(client)

            self._traces[alone] = jax.make_jaxpr(in_mode, return_shape=True)(self.one_client)
        return self._traces[alone]

    def replay(self, *, alone: bool) -> Callable[[PyTree], PyTree]:
        """`client_fn` for one client's slice, replayed from the trace."""
        closed, shapes = self.trace(alone=alone)
        outputs = jax.tree.structure(shapes)
        run = jaxpr_as_fun(closed)
        return lambda client: jax.tree.unflatten(outputs, run(*jax.tree.leaves(client)))


def _num_clients(per_client: PyTree) -> int:
    return jax.tree.leaves(per_client)[0].shape[0]


def _weighted_sum(stacked: PyTree, weights: jax.Array) -> PyTree:
    return jax.tree.map(lambda leaf: jnp.tensordot(weights.astype(leaf.dtype), leaf, axes=1),
                        stacked)


def _unrolled(client: _ClientProgram, per_client: PyTree | None = None) -> PyTree:
    """Each client of `per_client` (default the program's own) run alone, side by side."""
    per_client = client.per_client if per_client is None else per_client
    run = client.replay(alone=True)
    outputs = [run(jax.tree.map(lambda leaf: leaf[i], per_client))
               for i in range(_num_clients(per_client))]
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *outputs)


def _chunked_reduce(client: _ClientProgram, weights: jax.Array | None, chunk_size: int,
                    chunk_strategy: str) -> tuple[PyTree, PyTree]:
    """A `lax.scan` over chunks of `client`'s clients carrying the weighted sum of the summands
    (its outputs are `(summand, other)`), or, with `weights` None, only stacking its outputs.

    Each chunk is sliced from the cohort inside the loop, never copied out of it beforehand, so
    memory holds the cohort once plus one chunk's work. When the chunk size does not divide the
    cohort, the last chunk is shifted back to end at the last client; the clients it repeats are
    not counted twice (weight 0 in the sum, their first outputs kept).
    """
    per_client = client.per_client
    num_clients = _num_clients(per_client)
    chunk_size = min(chunk_size, num_clients)
    num_chunks = -(-num_clients // chunk_size)
    # One client at a time runs unbatched, so its program keeps its own control flow (a
    # skipped inactive step stays skipped instead of becoming vmap's select).
    vmapped = chunk_strategy == "vmap" and chunk_size > 1
    run_chunk = (jax.vmap(client.replay(alone=False)) if vmapped
                 else lambda chunk: _unrolled(client, chunk))
    shapes = client.trace(alone=not vmapped)[1]
    if weights is None:
        (summand_shape, other_shape), split = (None, shapes), lambda outputs: (None, outputs)
    else:
        (summand_shape, other_shape), split = shapes, lambda outputs: outputs

    def body(carry, chunk_index):
        total, others = carry
        first_new = chunk_index * chunk_size
        start = jnp.minimum(first_new, num_clients - chunk_size)
        take = lambda leaf: jax.lax.dynamic_slice_in_dim(leaf, start, chunk_size)
        is_new = start + jnp.arange(chunk_size) >= first_new
        summands, chunk_others = split(run_chunk(jax.tree.map(take, per_client)))
        if summands is not None:
            chunk_weights = jnp.where(is_new, take(weights), 0)
            total = jax.tree.map(jnp.add, total, _weighted_sum(summands, chunk_weights))

        def write(buffer, values):
            keep = is_new.reshape((-1,) + (1,) * (values.ndim - 1))
            values = jnp.where(keep, values, take(buffer))
            return jax.lax.dynamic_update_slice_in_dim(buffer, values, start, axis=0)

        return (total, jax.tree.map(write, others, chunk_others)), None

    zeros = lambda shape, lead=(): jnp.zeros(lead + shape.shape, shape.dtype)
    init = (jax.tree.map(zeros, summand_shape),
            jax.tree.map(lambda shape: zeros(shape, (num_clients,)), other_shape))
    (total, others), _ = jax.lax.scan(body, init, jnp.arange(num_chunks))
    return total, others


def _is_recurrent_loop(equation) -> bool:
    return equation.primitive.name in ("scan", "while") \
        and RECURRENT_SCOPE in str(equation.source_info.name_stack)


def _is_slow_conv(equation) -> bool:
    """A 2-D convolution in another layout than NHWC/HWIO/NHWC (`lax.conv`'s own gradient)."""
    if equation.primitive.name not in _CONVOLUTIONS:
        return False
    numbers = equation.params["dimension_numbers"]
    return len(numbers.lhs_spec) == 4 and numbers != _CANONICAL_CONV


def _jaxpr_has(jaxpr, predicate) -> bool:
    """Whether an equation of `jaxpr`, or of a program nested in it, satisfies `predicate`."""
    for equation in jaxpr.eqns:
        if predicate(equation):
            return True
        for value in equation.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns") and _jaxpr_has(inner, predicate):
                    return True
    return False
