"""One model across several processes: joining the JAX cluster, and host data <-> global arrays.

Each process runs the same program (``jax.distributed``, one process per host): it calls
:func:`initialize` once before any JAX computation, builds the same mesh over all global devices
(``make_mesh``), loads only the parameter slices its own devices hold (``cogvlm_jax.load(mesh=)``), and
calls ``forward``/``generate`` with the same host inputs as every other process. :func:`to_global`
turns those host inputs into global arrays (each process supplies its own devices' slices) and
:func:`to_host` gathers a result back to full numpy on every process.

Files every process writes into together (an Orbax checkpoint: each process its own shards) go through
:func:`atomic_directory`; :class:`Barriers` are barriers.

The CLI flags (``--coordinator HOST:PORT --num-processes N --process-id I``, ``--mesh``) are
:func:`add_cli_args` / :func:`init_from_args`, shared by every command that runs a model; every command
that takes ``--mesh`` builds it with :func:`mesh_from_flag`.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import math
import os
import sys
import threading
import uuid
from typing import Callable, Iterator, Optional, Sequence

import jax
import numpy as np
from orbax.checkpoint import multihost as ocp_multihost

from cogvlm_jax import files
from cogvlm_jax.models.execution import LAYOUTS
from cogvlm_jax.parallel.axes import make_mesh

DEFAULT_TIMEOUT_S = 120
EXIT_UNREACHABLE = 3  # the exit status of a process that could not join its cluster in time


class ClusterError(ValueError):
    """Bad multi-process settings; the message says which."""


# JAX has no public API for the two questions below (jax.distributed offers initialize, shutdown and
# is_initialized), so they ask its private modules; each answers "unknown" if those have moved.
def _cluster_detected() -> bool:
    """True where ``jax.distributed.initialize()`` can find its settings by itself (TPU pods, SLURM, Open MPI,
    Kubernetes with the ``kubernetes`` package). Asks the same detectors JAX does; False if they moved."""
    try:
        from jax._src.clusters import ClusterEnv
    except ImportError:
        return False
    return any(not env.opt_in_only_method and env.is_env_present() for env in ClusterEnv._cluster_types)


def _detected_coordinator() -> Optional[str]:
    """The coordinator address ``jax.distributed.initialize()`` is joining, or None if JAX does not say."""
    try:
        from jax._src import distributed
    except ImportError:
        return None
    return getattr(distributed.global_state, "coordinator_address", None)


def initialize(coordinator: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, timeout: float = DEFAULT_TIMEOUT_S, recoverable: bool = False) -> bool:
    """Join the JAX cluster: ``jax.distributed.initialize`` with a deadline. Returns True if it did.

    With no arguments it joins only where JAX detects a cluster (else it returns False: one process).
    In a process that has already joined, it checks nothing and returns True (the CLI entry points call it,
    and tests call them one after another in one process).
    A process that has not reached its coordinator, or whose peers have not all come up, within
    ``timeout`` seconds prints an error naming the coordinator and exits with status
    ``EXIT_UNREACHABLE`` (JAX itself would abort with a stack trace, or wait forever for a peer).
    ``recoverable``: a peer that dies does not abort this process (JAX's ``jax_enable_recoverability``);
    the job then watches its peers itself (``heartbeat.Heartbeat``).
    Must run before any JAX computation.
    """

    if jax.distributed.is_initialized():
        return True
    if not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0):
        raise ClusterError(f"the time to join the cluster (--init-timeout) must be a number of seconds > 0, "
                           f"got {timeout!r}")
    given = {"coordinator": coordinator, "num_processes": num_processes, "process_id": process_id}
    if any(v is not None for v in given.values()):
        missing = [k for k, v in given.items() if v is None]
        if missing:
            raise ClusterError(f"multi-process settings need all of coordinator, num_processes and process_id; "
                               f"missing {', '.join(missing)}")
        host, _, port = coordinator.rpartition(":")
        if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ClusterError(f"coordinator must be HOST:PORT with a port in [1, 65535], got {coordinator!r}")
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise ClusterError(f"process id {process_id} is not in [0, {num_processes})")
    elif not _cluster_detected():
        return False
    if jax.config.jax_cpu_collectives_implementation in (None, "none"):  # CPU processes talk over gloo
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if recoverable:
        try:
            jax.config.update("jax_enable_recoverability", True)
        except AttributeError:  # a jax without the option: a dead peer aborts the others, as by default
            pass
    joined = threading.Event()
    who = "this process" if process_id is None else f"process {process_id} of {num_processes}"

    def watchdog():
        if joined.wait(timeout):
            return
        where = coordinator or _detected_coordinator() or "(auto-detected)"
        sys.stderr.write(f"cogvlm-jax: error: {who} could not join the JAX cluster at coordinator {where} within "
                         f"{timeout:g} s: is process 0 running there with the same --num-processes, is the port "
                         f"reachable, and have all processes been started?\n")
        sys.stderr.flush()
        os._exit(EXIT_UNREACHABLE)

    threading.Thread(target=watchdog, name="cogvlm-jax-join-watchdog", daemon=True).start()
    try:  # JAX's own deadline is later than ours, so the message above is the one the user sees
        extra = {}
        if "shutdown_timeout_seconds" in inspect.signature(jax.distributed.initialize).parameters:
            extra["shutdown_timeout_seconds"] = max(int(timeout), 10)  # a peer gone at exit: do not wait 300 s
        jax.distributed.initialize(coordinator, num_processes, process_id,
                                   initialization_timeout=int(timeout) + 60, **extra)
    finally:
        joined.set()
    return True


def is_main_process() -> bool:
    """Process 0: the one that prints, serves, writes files meant once."""

    return jax.process_index() == 0


# --------------------------------------------------------------------------- host data <-> global arrays
def to_global(a: np.ndarray, sharding):
    """A global ``jax.Array`` from the same host array on every process; each supplies its own devices' slices."""

    a = np.asarray(a)
    return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])


def to_host(x) -> np.ndarray:
    """The full value of a (possibly multi-process) array as numpy, on every process.

    Arrays spread over other processes' devices are all-gathered: a collective, so every process must
    call this for the same arrays in the same order (as it does when all run the same program).
    """

    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.sharding.is_fully_replicated:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def broadcast_bytes(data: Optional[bytes]) -> bytes:
    """Process 0's ``data`` on every process (the others pass anything, e.g. None)."""

    if jax.process_count() == 1:
        return data if data is not None else b""
    from jax.experimental import multihost_utils

    mine = np.frombuffer(data or b"", np.uint8) if is_main_process() else np.zeros(0, np.uint8)
    n = int(multihost_utils.broadcast_one_to_all(np.int64(mine.size)))
    if not n:
        return b""
    # Sent in a buffer of a power-of-two size: each size is a compiled program, and a server sends many.
    buf = np.zeros(max(256, 1 << (n - 1).bit_length()), np.uint8)
    if is_main_process():
        buf[:n] = mine
    return np.asarray(multihost_utils.broadcast_one_to_all(buf))[:n].tobytes()


def from_main(read: Callable[[], bytes]) -> bytes:
    """``read()`` on process 0, its bytes on every process (user input, an image file).

    If it fails on process 0 with a ``ValueError``/``OSError``, every process raises a ``ValueError`` with
    that message, so none is left waiting for the others.
    """

    if jax.process_count() == 1:
        return read()
    message = None
    if is_main_process():
        try:
            message = b"\x00" + read()
        except (ValueError, OSError) as e:
            message = b"\x01" + str(e).encode()
    message = broadcast_bytes(message)
    if message[:1] == b"\x01":
        raise ValueError(message[1:].decode())
    return message[1:]


def leave(status: int = 0) -> None:
    """End a process other than 0 of a job that joined with ``recoverable=True``, without disconnecting
    from the coordination service. Process 0's service then does not wait for the others at exit, so a
    disconnect could find it gone, which JAX answers by aborting the process; with no disconnect the
    process ends with ``status``. Flushes stdout and stderr first."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


# --------------------------------------------------------------------------- files written together
class Barriers:
    """A sequence of barriers every process passes in the same order (nothing with one process).

    Orbax needs a name never used before for each barrier: the n-th barrier of the sequence is named by
    ``scope``, n and what it waits for. ``scope`` must be the same on every process and used by no other
    sequence in this process: ``atomic_directory`` uses the temporary directory process 0 made,
    :meth:`agreed` a name process 0 draws."""

    def __init__(self, scope: str):
        self.scope = scope
        self.passed = 0

    @classmethod
    def agreed(cls) -> "Barriers":
        """A new sequence whose scope process 0 draws and sends to the others: a collective, so every process
        calls this at the same point (where none waits long: it has no timeout)."""
        return cls(from_main(lambda: uuid.uuid4().hex.encode()).decode())

    def sync(self, what: str, timeout: float = 600) -> None:
        """Wait until every process gets here. ``what`` names the barrier in errors. Gives up after
        ``timeout`` seconds."""
        if jax.process_count() == 1:
            return
        self.passed += 1
        ocp_multihost.sync_global_processes(f"cogvlm-jax:{self.scope}:{self.passed}:{what}", timeout=int(timeout))


@contextlib.contextmanager
def atomic_directory(out_dir: str, overwrite: bool = False) -> Iterator[str]:
    """``files.atomic_directory`` for a directory every process writes into (an Orbax save, each process
    its own shards): process 0 makes the temporary directory and tells the others its name; when every
    process has left the block, process 0 renames it into place, and then all return. The directory must
    be on storage every process sees (the same path). With one process this is
    ``files.atomic_directory`` itself.

    Process 0's refusal of the destination (not empty, not a directory) is raised on every process.
    """

    if jax.process_count() == 1:
        with files.atomic_directory(out_dir, overwrite) as tmp:
            yield tmp
        return
    if not is_main_process():
        tmp = from_main(lambda: b"").decode()  # raises process 0's error, if any
        barriers = Barriers(tmp)
        yield tmp
        barriers.sync(f"written {out_dir}")
        barriers.sync(f"renamed {out_dir}")
        return
    with contextlib.ExitStack() as stack:
        def make() -> bytes:
            return stack.enter_context(files.atomic_directory(out_dir, overwrite)).encode()

        tmp = from_main(make).decode()
        barriers = Barriers(tmp)  # the temporary directory's name: unique, and the same on every process
        yield tmp
        barriers.sync(f"written {out_dir}")
    barriers.sync(f"renamed {out_dir}")


# --------------------------------------------------------------------------- CLI
def parse_mesh(text: str) -> tuple[int, int, int]:
    """``"DATA,FSDP,TENSOR"`` -> three ints, each >= 1 (a clear error otherwise)."""
    try:
        data, fsdp, tensor = (int(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"--mesh must be DATA,FSDP,TENSOR (three integers), got {text!r}") from None
    for axis, size in (("DATA", data), ("FSDP", fsdp), ("TENSOR", tensor)):
        if size < 1:
            raise ValueError(f"--mesh must be DATA,FSDP,TENSOR, each a device count >= 1, got {text!r} "
                             f"({axis} is {size})")
    return data, fsdp, tensor


def mesh_arg(text: str) -> str:
    """An argparse type for ``--mesh``: :func:`parse_mesh`'s check, the text kept as given."""
    try:
        parse_mesh(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--mesh ")) from None
    return text


def add_cli_args(p: argparse.ArgumentParser, mesh: bool = True) -> None:
    """``--mesh`` (unless ``mesh=False``: the command has its own) and the multi-process flags, for every
    command that runs a model."""
    g = p.add_argument_group("devices and processes")
    if mesh:
        g.add_argument("--mesh", metavar="DATA,FSDP,TENSOR", type=mesh_arg,
                       help="shard the model over this mesh of all (global) devices; default: one device, or "
                            "1,PROCESSES,DEVICES-PER-PROCESS when several processes run")
        g.add_argument("--layout", choices=LAYOUTS,
                       help="how the programs split over the mesh: exact (no split contraction: one device's "
                            "numbers) or megatron (one all-reduce per attention and MLP); default: exact on "
                            "CPU, megatron on TPU and GPU")
    g.add_argument("--coordinator", metavar="HOST:PORT",
                   help="multi-process: the address of process 0 (omit on clusters JAX detects: TPU pods, SLURM, "
                        "Open MPI)")
    g.add_argument("--num-processes", type=int, metavar="N", help="multi-process: how many processes in all")
    g.add_argument("--process-id", type=int, metavar="I", help="multi-process: this process's index, 0..N-1")
    g.add_argument("--init-timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
                   help=f"give up joining the cluster after this long (default {DEFAULT_TIMEOUT_S} s)")


def default_mesh_shape() -> Optional[tuple[int, int, int]]:
    """The mesh a command uses when none is given: None (one device) in one process, else fsdp over the
    processes and tensor over each process's devices."""

    if jax.process_count() > 1:
        return 1, jax.process_count(), jax.local_device_count()
    return None


def mesh_from_flag(mesh: str | Sequence[int], cpu: bool = False):
    """The mesh of a ``--mesh DATA,FSDP,TENSOR`` value (the text or its three sizes) over the first
    DATA x FSDP x TENSOR devices; across several processes it must take all of them.

    ``cpu``: over this process's CPU devices, made up to the count needed where the backends are not up yet
    (``convert --mesh``: only the mesh's shape matters there, it sets the stored chunk layout).
    """
    shape = parse_mesh(mesh) if isinstance(mesh, str) else tuple(mesh)
    n = shape[0] * shape[1] * shape[2]
    name = ",".join(map(str, shape))
    if cpu:
        try:
            jax.config.update("jax_num_cpu_devices", n)
        except RuntimeError:  # backends already up: use the CPU devices there are
            pass
    devices = jax.devices("cpu") if cpu else jax.devices()
    if n > len(devices):
        raise ValueError(f"mesh {name} needs {n} {'CPU ' if cpu else ''}devices, {len(devices)} available")
    if jax.process_count() > 1 and n != len(devices):
        raise ValueError(f"mesh {name} covers {n} of the {len(devices)} devices of {jax.process_count()} "
                         "processes; a mesh across processes uses them all")
    return make_mesh(*shape, devices=devices[:n])


def init_from_args(args: argparse.Namespace, recoverable: bool = False):
    """Join the cluster the flags (or the environment) describe; -> the mesh to load with, or None.
    ``recoverable``: see :func:`initialize`."""
    initialize(args.coordinator, args.num_processes, args.process_id, args.init_timeout, recoverable=recoverable)

    shape = args.mesh or default_mesh_shape()
    return None if shape is None else mesh_from_flag(shape)


__all__: Sequence[str] = [
    "Barriers", "ClusterError", "DEFAULT_TIMEOUT_S", "EXIT_UNREACHABLE", "add_cli_args", "atomic_directory",
    "broadcast_bytes", "default_mesh_shape", "from_main", "init_from_args", "initialize", "is_main_process",
    "leave", "mesh_arg", "mesh_from_flag", "parse_mesh", "to_global", "to_host",
]
