"""Devices and processes of a sampling run: the local device mesh and the multi-host set-up.

Each process spreads its chunks over its own devices (a 1-D mesh over `jax.local_devices()`), so
no computation spans hosts. Processes exchange results only through the chunk files in the
experiment folder, which must be on a file system that all hosts share. The JAX distributed
runtime is used for three things: process 0 broadcasts the experiment folder name and the list of
chunks to draw, and `jax.distributed.shutdown` serves as a barrier after every process has
written its chunk files.
"""

import dataclasses
import logging
import math
import os

import numpy as np

from ncsn_jax.errors import UserError

log = logging.getLogger(__name__)

BATCH_AXIS = 'batch'

# Room for the experiment folder name in the broadcast buffer (file names are at most 255 bytes
# on common file systems).
MAX_NAME_BYTES = 1024

# How long the processes other than process 0 wait in the shutdown barrier beyond
# --gather_timeout, so that process 0 times out first and reports which chunk files are missing.
SHUTDOWN_MARGIN_SECONDS = 300


@dataclasses.dataclass(frozen=True)
class ProcessGroup:
    """This process's index and the process count of a run. The default is a single process."""

    index: int = 0
    count: int = 1
    distributed: bool = False

    @property
    def is_main(self) -> bool:
        return self.index == 0

    def share(self, chunks) -> list:
        """Return this process's share of `chunks`: every count-th one, starting at its index."""
        return list(chunks)[self.index::self.count]


def _env_int(name: str):
    value = os.environ.get(name)
    if value is None or value == '':
        return None
    try:
        return int(value)
    except ValueError:
        raise UserError(f'environment variable {name} must be an integer, got {value!r}') from None


def initialize(coordinator_address=None, num_processes=None, process_id=None, *,
               wait_seconds: float) -> ProcessGroup:
    """Start the JAX distributed runtime and return this process's `ProcessGroup`.

    Arguments left as None come from JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
    JAX_PROCESS_ID, and then from JAX's cluster detection (Cloud TPU, Slurm, Open MPI).
    `wait_seconds` bounds how long a process that finished its chunks waits for the others in the
    shutdown barrier (plus SHUTDOWN_MARGIN_SECONDS). Must run before any other JAX call.

    NOTE: a process that stops with an error while the others still run waits for them in the
    shutdown barrier at exit, so a failure on one host alone can take that long to end the run.
    A process that dies (killed, pre-empted) ends all of them after JAX's heartbeat timeout
    (100 s by default).
    """
    import jax

    if num_processes is None:
        num_processes = _env_int('JAX_NUM_PROCESSES')
    if process_id is None:
        process_id = _env_int('JAX_PROCESS_ID')
    if num_processes is not None and num_processes < 1:
        raise UserError(f'--num_processes must be >= 1, got {num_processes}')
    if process_id is not None and process_id < 0:
        raise UserError(f'--process_id must be >= 0, got {process_id}')
    if num_processes is not None and process_id is not None and process_id >= num_processes:
        raise UserError(f'--process_id must be below --num_processes ({num_processes}), got '
                        f'{process_id}; number the processes 0 to {num_processes - 1}')
    try:
        jax.distributed.initialize(
            coordinator_address, num_processes, process_id,
            shutdown_timeout_seconds=int(wait_seconds) + SHUTDOWN_MARGIN_SECONDS)
    except (ValueError, TypeError, RuntimeError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f'failed to start the JAX distributed runtime: {first_line}; pass '
                        '--coordinator_address HOST:PORT, --num_processes and --process_id, or '
                        'set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and '
                        'JAX_PROCESS_ID') from None
    group = ProcessGroup(index=jax.process_index(), count=jax.process_count(), distributed=True)
    log.info('process %d of %d, %d local devices', group.index, group.count,
             jax.local_device_count())
    return group


def broadcast_name(group: ProcessGroup, name: str) -> str:
    """Return process 0's `name` on every process (the argument of the others is ignored)."""
    if group.count == 1:
        return name
    from jax.experimental import multihost_utils

    buffer = np.zeros(MAX_NAME_BYTES, np.uint8)
    if group.is_main:
        encoded = name.encode('utf-8')
        if len(encoded) > MAX_NAME_BYTES:
            raise UserError(f'experiment folder name {name!r} is longer than '
                            f'{MAX_NAME_BYTES} bytes')
        buffer[:len(encoded)] = np.frombuffer(encoded, np.uint8)
    received = np.asarray(multihost_utils.broadcast_one_to_all(buffer))
    return bytes(received).rstrip(b'\0').decode('utf-8')


def broadcast_mask(group: ProcessGroup, mask: np.ndarray) -> np.ndarray:
    """Return process 0's boolean `mask` on every process. All processes pass the same shape."""
    if group.count == 1:
        return mask
    from jax.experimental import multihost_utils

    received = multihost_utils.broadcast_one_to_all(np.asarray(mask, np.uint8))
    return np.asarray(received).astype(bool)


def leave(group: ProcessGroup):
    """Shut down the distributed runtime. This blocks until every process has called it.

    Process 0 calls it once the chunk files of all processes are on disk, so the others stay in
    the runtime until then, and process 0 then assembles the outputs without depending on them.
    """
    if not group.distributed:
        return
    import jax

    jax.distributed.shutdown()


def local_mesh():
    """Return a 1-D mesh over this process's devices, with axis name BATCH_AXIS."""
    import jax
    from jax.sharding import Mesh

    return Mesh(np.asarray(jax.local_devices()), (BATCH_AXIS,))


def padded_size(count: int, n_devices: int) -> int:
    """Return the smallest multiple of `n_devices` that is >= `count`."""
    return math.ceil(count / n_devices) * n_devices
