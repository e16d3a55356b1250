"""Multi-host runs: `jax.distributed` wiring and per-host feeding of the cohort's clients.

Every host runs the same program (JAX's multi-controller model): each builds the same data set,
samples the same cohorts from the seed, and the compiled round spans all hosts' devices through
the mesh's `clients` axis. A host-fed population (`HostCohortStream`) would otherwise make every
host gather and pad the whole cohort; `ProcessCohortStream` gathers only the rows this host's
devices hold and assembles the global batch with `jax.make_array_from_process_local_data`.

Launch (docs/SCALE_OUT.md has the full recipe): on every host set FEDJAX_COORDINATOR (host:port
of process 0), FEDJAX_NUM_PROCESSES and FEDJAX_PROCESS_ID, and call `initialize()` before any
other JAX call; on TPU pods and SLURM clusters `initialize(detect_cluster=True)` lets JAX find
the coordinator and the processes itself.

Pitfalls avoided: a cohort that does not divide over the devices cannot be split into equal
per-host slices; padding it in the data would add clients the algorithm sees (and counts, in
`bytes_down` for one), so such a cohort is fed whole by every host and padded inside the round
by the "sharded" strategy, whose padded slots have weight 0 and are sliced off before any
client state is written; the slices follow the mesh's device order, not the process id order,
so a host feeds exactly the rows its own devices hold.
"""

import os
from typing import NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fedjax_lab.core import sharding
from fedjax_lab.core.types import ClientBatch, client_keys
from fedjax_lab.data.sampling import cohort_schedule
from fedjax_lab.data.stream import HostCohortStream

ENV_COORDINATOR = "FEDJAX_COORDINATOR"
ENV_NUM_PROCESSES = "FEDJAX_NUM_PROCESSES"
ENV_PROCESS_ID = "FEDJAX_PROCESS_ID"


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, detect_cluster: bool = False,
               **options) -> bool:
    """Starts `jax.distributed` from arguments or the FEDJAX_* environment variables.

    Args:
        coordinator_address: "host:port" of process 0 (default: FEDJAX_COORDINATOR).
        num_processes: processes in the job (default: FEDJAX_NUM_PROCESSES).
        process_id: this process, 0..num_processes-1 (default: FEDJAX_PROCESS_ID).
        detect_cluster: with none of the three given, let JAX detect a TPU pod or SLURM job
            instead of running locally.
        **options: passed to `jax.distributed.initialize` (e.g. local_device_ids).

    Returns:
        True if a multi-process job was initialised, False for a single process (nothing set
        is not an error: the run is simply local).
    """
    coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR)
    num_processes = _env_int(ENV_NUM_PROCESSES) if num_processes is None else num_processes
    process_id = _env_int(ENV_PROCESS_ID) if process_id is None else process_id
    given = [v is not None for v in (coordinator_address, num_processes, process_id)]
    if any(given) and not all(given):
        raise ValueError(f"multi-host needs all of {ENV_COORDINATOR}, {ENV_NUM_PROCESSES} and "
                         f"{ENV_PROCESS_ID} (or the arguments); got coordinator="
                         f"{coordinator_address!r}, num_processes={num_processes!r}, "
                         f"process_id={process_id!r}")
    if num_processes == 1 or not (any(given) or detect_cluster):
        return False
    if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):
        # The CPU backend needs a cross-process collectives library for psum across hosts
        # (accelerators bring their own; this setting only concerns the CPU client).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id, **options)
    return jax.process_count() > 1


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is invalid; expected an integer") from None


class CohortSlice(NamedTuple):
    """Rows [start, stop) of the cohort this process feeds."""

    start: int
    stop: int


def process_slice(cohort_size: int, mesh: Mesh,
                  process_index: int | None = None) -> CohortSlice:
    """The rows of a cohort that one process's devices hold when it is sharded along `clients`.

    The cohort must divide evenly over the `clients` axis, and a process's devices must be
    contiguous along it (true of `client_mesh()`, whose device order is JAX's, host by host).
    """
    process_index = jax.process_index() if process_index is None else process_index
    shards = sharding.num_shards(mesh)
    if cohort_size % shards:
        raise ValueError(f"cohort_size={cohort_size} does not divide over the {shards} devices "
                         f"of the {sharding.CLIENTS!r} axis")
    per_device = cohort_size // shards
    devices = mesh.devices if mesh.devices.ndim == 1 else mesh.devices[:, 0]
    positions = [i for i, d in enumerate(devices) if d.process_index == process_index]
    if not positions or positions != list(range(positions[0], positions[-1] + 1)):
        raise ValueError(f"process {process_index}'s devices are not one contiguous block of "
                         f"the mesh's {sharding.CLIENTS!r} axis; build it with client_mesh()")
    return CohortSlice(positions[0] * per_device, (positions[-1] + 1) * per_device)


class ProcessCohortStream:
    """A `HostCohortStream` whose blocks are global arrays over every process's devices.

    With a cohort that divides over the `clients` axis, each process gathers only its own rows
    and the block is sharded along `clients` on the cohort axis. Otherwise every process feeds
    the whole cohort (replicated) and the "sharded" strategy pads it inside the round: padding
    the data instead would add clients the algorithm sees (and counts, e.g. in `bytes_down`).
    """

    def __init__(self, stream: HostCohortStream, mesh: Mesh):
        self.stream, self.mesh = stream, mesh
        if stream.cohort_size % sharding.num_shards(mesh) == 0:
            self.slice = process_slice(stream.cohort_size, mesh)
            self.sharding = NamedSharding(mesh, PartitionSpec(None, sharding.CLIENTS))
        else:
            self.slice = CohortSlice(0, stream.cohort_size)
            self.sharding = NamedSharding(mesh, PartitionSpec())

    def block(self, start_round: int, num_rounds: int) -> ClientBatch:
        """Rounds start_round.. stacked: every field `[num_rounds, K, ...]`, a global array."""
        stream = self.stream
        ids = cohort_schedule(stream.key, num_rounds, stream.clients.num_clients,
                              stream.cohort_size, start_round=start_round,
                              probabilities=stream.probabilities, cohorts=stream.cohorts)
        local = ids[:, self.slice.start:self.slice.stop]
        x, y, mask, sizes = stream.clients.gather(local.ravel(), stream.padded_length)
        rounds = np.arange(start_round, start_round + num_rounds, dtype=np.int32)
        keys = np.asarray(jax.random.key_data(_block_keys(stream.key, rounds, local)))
        shape = local.shape
        fields = ClientBatch(x=x.reshape(shape + x.shape[1:]), y=y.reshape(shape + y.shape[1:]),
                             mask=mask.reshape(shape + mask.shape[1:]),
                             num_examples=sizes.reshape(shape), client_ids=local, rng=keys)
        batch = jax.tree.map(
            lambda leaf: jax.make_array_from_process_local_data(
                self.sharding, leaf, (num_rounds, stream.cohort_size) + leaf.shape[2:]),
            fields)
        # Typed keys travel as their raw data and are re-wrapped once global.
        return batch._replace(rng=jax.random.wrap_key_data(
            batch.rng, impl=jax.random.key_impl(stream.key)))


@jax.jit
def _block_keys(key, rounds, client_ids):
    return jax.vmap(client_keys, in_axes=(None, 0, 0))(key, rounds, client_ids)
