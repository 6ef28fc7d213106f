"""Data parallelism on JAX's own runtime: one mesh over the devices of every process.

A run's batch (`trainer.batch_size`) is global: it is split along the mesh's `data` axis, each
process putting in the rows that land on its own devices (`process_rows`), while parameters and
optimizer state are replicated. jit partitions the step from these shardings (XLA inserts the
gradient all-reduce), so the metrics equal a single-device run's up to float summation order.
Several processes (hosts) join with `jax.distributed` first (`runtime.join_processes`).
"""

from typing import Any, NamedTuple

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from cnnjax.errors import ConfigError

DATA_AXIS = "data"


class Layout(NamedTuple):
    """The mesh and where arrays live on it."""

    mesh: Mesh
    replicated: NamedSharding  # parameters, optimizer state, keys, metrics
    batch: NamedSharding  # split along the leading (batch) axis over every device

    @property
    def device_count(self) -> int:
        return self.mesh.devices.size

    @property
    def process_count(self) -> int:
        return len({d.process_index for d in self.mesh.devices.flat})


def layout(devices: str | int = "all", job_num: int = 0) -> Layout:
    """A one-axis `data` mesh over every device of every process ("all"), or over one device
    of this process: number `devices`, or with "per_job" number `job_num` modulo their count
    (each job of a parallel sweep on a device of its own)."""
    local = jax.local_devices()
    if devices == "per_job":
        devices = job_num % len(local)
    if devices == "all":
        chosen = jax.devices()
    else:
        if not (isinstance(devices, int) and 0 <= devices < len(local)):
            raise ConfigError(
                f"distributed.devices={devices!r}: use all, per_job or a device number below "
                f"{len(local)} (this process has {len(local)}: {local})"
            )
        chosen = [local[devices]]
    mesh = Mesh(np.array(chosen), (DATA_AXIS,))
    return Layout(mesh, NamedSharding(mesh, P()), NamedSharding(mesh, P(DATA_AXIS)))


def in_flight_limit(lay: Layout) -> int | None:
    """How many steps the host may queue before it waits for them; None: no limit.

    XLA:CPU deadlocks a program with collectives over several devices of one process once more
    than 32 launches queue per device (jax 0.10.2): launches park the client's threads, which
    are as many as the devices, on a 32-slot semaphore, and the collective that would free a
    slot cannot gather its participants. Waiting every 16 steps stays clear of it."""
    local = [d for d in lay.mesh.devices.flat if d.process_index == jax.process_index()]
    return 16 if len(local) > 1 and local[0].platform == "cpu" else None


def check_batch_size(batch_size: int, lay: Layout, key: str) -> None:
    """A global batch must split evenly over the devices."""
    n = lay.device_count
    if batch_size % n:
        lower, upper = batch_size // n * n, (batch_size // n + 1) * n
        raise ConfigError(
            f"{key}={batch_size} does not split over {n} devices: use a multiple of {n} "
            f"(e.g. {lower or upper} or {upper})"
        )


def process_rows(lay: Layout, batch_size: int) -> slice:
    """The rows of a global batch that this process's devices hold."""
    spans = lay.batch.addressable_devices_indices_map((batch_size,)).values()
    starts = [s[0].indices(batch_size)[0] for s in spans]
    stops = [s[0].indices(batch_size)[1] for s in spans]
    return slice(min(starts), max(stops))


def shard_batch(lay: Layout, rows: dict[str, np.ndarray], batch_size: int) -> dict[str, Any]:
    """Global arrays of a batch from this process's `rows` of it (see `process_rows`). A single
    process holds the whole batch: jit splits it by its `in_shardings`, with less host work."""
    if lay.process_count == 1:
        return rows
    return {
        k: jax.make_array_from_process_local_data(lay.batch, v, (batch_size, *v.shape[1:]))
        for k, v in rows.items()
    }


def replicate(tree: Any, lay: Layout) -> Any:
    """Every array of `tree` (equal in every process) on every device of the mesh, those of
    other processes included (which `jax.device_put` cannot reach)."""

    def put(x: jax.Array | int) -> jax.Array:
        x = jax.numpy.asarray(x)  # e.g. a new state's step, a Python int
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            impl = jax.random.key_impl(x)
            return jax.random.wrap_key_data(put(jax.random.key_data(x)), impl=impl)
        return jax.make_array_from_process_local_data(lay.replicated, np.asarray(x))

    return jax.tree.map(put, tree)


def agree(text: str) -> str:
    """Process 0's `text` in every process (e.g. the run directory, which must be shared)."""
    if jax.process_count() == 1:
        return text
    data = np.zeros(4096, np.uint8)
    raw = text.encode()[: data.size]
    data[: len(raw)] = np.frombuffer(raw, np.uint8)
    data = np.asarray(multihost_utils.broadcast_one_to_all(data))
    return bytes(data[data != 0]).decode()


def ring_allreduce_bytes(n_params: int, devices: int, bytes_per_param: int = 4) -> float:
    """Bytes each device sends (and receives) to all-reduce one step's gradients with a ring:
    2 (N - 1) / N of the gradients, whatever N; 0 on one device."""
    return 2 * (devices - 1) / devices * n_params * bytes_per_param
