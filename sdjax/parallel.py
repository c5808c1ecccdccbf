"""Device mesh and shardings: the one place sdjax decides where arrays live.

Sampling and training are data-parallel over a 1-D mesh axis ``"data"`` spanning every device
of every process: the batch axis is split over it, parameters are replicated. A mesh of your own
works too when it has a ``"data"`` axis: the batch splits over that axis, and any other axes hold
copies (sdjax does not split the models over them). Multi-host runs
call :func:`initialize_distributed` first, then every process runs the same program on the same
host-side inputs (SPMD); each process materialises only its own devices' shards.
"""
from __future__ import annotations

import functools
import math
import os
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def env_says_multi_process(env=os.environ) -> bool:
    """Whether the launcher's environment describes more than one process of this job."""
    def count(key):
        try:
            return int(env.get(key, "1"))
        except ValueError:
            return 1
    return ("JAX_COORDINATOR_ADDRESS" in env
            # A TPU pod slice on GKE lists its hosts (what JAX's TPU cluster reads); TPU_WORKER_ID alone
            # is also set on one-host TPU VMs (GKE's, Kaggle's), where JAX finds no coordinator.
            or len(env.get("TPU_PROCESS_ADDRESSES", env.get("TPU_WORKER_HOSTNAMES", "")).split(",")) > 1
            # srun sets SLURM_STEP_NODELIST; a batch script's own shell (one process) does not.
            or (count("SLURM_NTASKS") > 1 and "SLURM_STEP_NODELIST" in env)
            or count("OMPI_COMM_WORLD_SIZE") > 1
            or count("PMI_SIZE") > 1)   # MPICH's and Intel MPI's mpirun


def initialize_distributed(**kwargs) -> None:
    """``jax.distributed.initialize`` for multi-host runs (TPU pods, multi-task Slurm steps or MPI
    jobs, or explicit ``coordinator_address``/``num_processes``/``process_id`` kwargs). A no-op when
    already done or when nothing says this is a multi-process run (a one-task sbatch script or
    ``mpirun -n 1`` is one process, which then sees every local device).

    A launch by hand names the coordinator in ``JAX_COORDINATOR_ADDRESS`` (which JAX reads) and
    the process count and this process's number in ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``
    (which sdjax passes on; JAX reads no variable for them). A setup JAX cannot complete is a
    ValueError saying what to set."""
    if jax.distributed.is_initialized():
        return
    if not (kwargs or env_says_multi_process()):
        return
    for key, env in (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID")):
        if key not in kwargs and env in os.environ:
            try:
                kwargs[key] = int(os.environ[env])
            except ValueError:
                raise ValueError(f"{env}={os.environ[env]!r} is not an integer") from None
    try:
        jax.distributed.initialize(**kwargs)
    except ValueError as e:  # JAX's own says which setting is missing, not where to give it
        raise ValueError(f"cannot start the multi-process run ({e}); {_what_to_set()}") from e


def _what_to_set(env=os.environ) -> str:
    """How to describe the run to JAX, where it found no coordinator: no launcher it knows, or an
    MPI whose processes it does not find (it reads Open MPI 4's ``OMPI_MCA_orte_hnp_uri``, which
    Open MPI 5 and MPICH do not set)."""
    variables = "JAX_COORDINATOR_ADDRESS=HOST:PORT, JAX_NUM_PROCESSES and JAX_PROCESS_ID on every process"
    launchers = "or launch with srun, Open MPI 4's mpirun or on a TPU VM"
    for size, rank, mpi in (("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "Open MPI 5's mpirun"),
                            ("PMI_SIZE", "PMI_RANK", "this mpirun (MPICH, Intel MPI)")):
        if size in env and "OMPI_MCA_orte_hnp_uri" not in env:
            return (f"JAX {jax.__version__} does not find the processes of {mpi} (it finds Open MPI 4's): set "
                    f"{variables} (the last two from ${size} and ${rank}), {launchers}")
    return f"the launcher did not describe it: set {variables}, {launchers}"


def data_size(mesh: Mesh) -> int:
    """How many ways the batch splits: the size of the mesh's ``"data"`` axis. Raises ValueError
    for a mesh without one."""
    if DATA_AXIS not in mesh.axis_names:
        raise ValueError(f"sdjax splits the batch over a mesh axis named {DATA_AXIS!r}; this mesh has axes "
                         f"{tuple(mesh.axis_names)} (make one with sdjax.parallel.data_mesh(devices), or name "
                         f"the batch axis of yours {DATA_AXIS!r})")
    return mesh.shape[DATA_AXIS]


def data_mesh(devices=None) -> Mesh:
    """A 1-D mesh with axis ``"data"`` over ``devices`` (default: every device of every process)."""
    devices = np.asarray(jax.devices() if devices is None else devices)
    return Mesh(devices.reshape(-1), (DATA_AXIS,))


def batch_sharding(mesh: Mesh, axis: int = 0) -> NamedSharding:
    """Split ``axis`` (the batch) over the data axis; other axes whole."""
    return NamedSharding(mesh, P(*([None] * axis), DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """Whole on every device of the mesh."""
    return NamedSharding(mesh, P())


def spread_sharding(shape: tuple, mesh: Mesh) -> NamedSharding:
    """Split over the data axis along the largest axis of ``shape`` that divides evenly over it;
    whole on every device when none does (scalars, small vectors)."""
    k = data_size(mesh)
    axes = [(size, axis) for axis, size in enumerate(shape) if size >= k and size % k == 0]
    if k == 1 or not axes:
        return replicated(mesh)
    _, axis = max(axes)
    return NamedSharding(mesh, P(*([None] * axis), DATA_AXIS))


def spread_shardings(tree: Any, mesh: Mesh) -> Any:
    """`spread_sharding` for every array (or ``jax.ShapeDtypeStruct``) of ``tree``."""
    return jax.tree.map(lambda a: spread_sharding(np.shape(a), mesh), tree)


def make_spread(fn, *args, mesh: Mesh) -> Any:
    """``fn(*args)`` computed straight into the `spread_sharding` placement (each device makes only
    its part: nothing is whole on a device first), on one process or several (a collective)."""
    return jax.jit(fn, out_shardings=spread_shardings(jax.eval_shape(fn, *args), mesh))(*args)


def padded_size(n: int, mesh: Mesh) -> int:
    """The smallest batch >= n that divides evenly over the mesh's data axis."""
    k = data_size(mesh)
    return max(k, math.ceil(n / k) * k)


def _is_key_array(array) -> bool:
    """Typed PRNG keys (`sdjax.sampling.image_keys`), which numpy cannot hold."""
    return isinstance(array, jax.Array) and jax.dtypes.issubdtype(array.dtype, jax.dtypes.prng_key)


_Batch = TypeVar("_Batch", np.ndarray, jax.Array)


def pad_batch(array: _Batch, size: int) -> _Batch:
    """Pad axis 0 to ``size`` by repeating the last row (padded results are trimmed away). A numpy
    array stays one; a JAX array (typed PRNG keys too) stays a JAX array."""
    n = np.shape(array)[0] if np.ndim(array) else 0
    if not 1 <= n <= size:
        raise ValueError(f"pad_batch: an array of shape {np.shape(array)} cannot be padded to {size} rows "
                         f"(it needs 1 to {size} rows along axis 0)")
    if n == size:
        return array
    xp = jnp if isinstance(array, jax.Array) else np
    return xp.concatenate([array, xp.repeat(array[-1:], size - n, axis=0)], axis=0)


def _check_batch_axis(shape: tuple, mesh: Mesh, axis: int) -> None:
    if not 0 <= axis < len(shape):
        raise ValueError(f"batch axis {axis} is not an axis of an array of shape {shape}")
    if shape[axis] % data_size(mesh):
        raise ValueError(f"a batch of {shape[axis]} (axis {axis} of shape {shape}) does not split over "
                         f"{data_size(mesh)} devices: pad it first (pad_batch(array, padded_size(n, mesh)))")


_wrap_key_data = jax.jit(jax.random.wrap_key_data, static_argnames="impl")   # compiled once per shape


def shard_batch(host_array: np.ndarray | jax.Array, mesh: Mesh, axis: int = 0) -> jax.Array:
    """A global array split over the data axis from the same host array on every process. The batch
    (``axis``) must divide over the mesh: pad it with ``pad_batch(a, padded_size(n, mesh))``. Typed
    PRNG keys (one per image, `sdjax.sampling.image_keys`) are split as their key data."""
    if _is_key_array(host_array):
        data = shard_batch(jax.random.key_data(host_array), mesh, axis)
        return _wrap_key_data(data, impl=jax.random.key_impl(host_array))
    host_array = np.asarray(host_array)
    _check_batch_axis(host_array.shape, mesh, axis)
    return jax.make_array_from_callback(host_array.shape, batch_sharding(mesh, axis), lambda index: host_array[index])


def shard_process_batch(local_array: np.ndarray, mesh: Mesh, axis: int = 0) -> jax.Array:
    """A global array from each process's own rows (its slice of the global batch along ``axis``)."""
    return jax.make_array_from_process_local_data(batch_sharding(mesh, axis), np.asarray(local_array))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Put every array of ``tree`` (e.g. an NNX state) on every device of the mesh. An array already
    replicated over the mesh is returned as it is (no copy)."""
    sharding = replicated(mesh)
    leaves, treedef = jax.tree.flatten(tree)
    # Arrays split over several processes are gathered on the devices, all in one compiled program
    # (one per leaf was a compile per weight at every call: ~700 for SD's UNet, at each sample of a run).
    split = [i for i, a in enumerate(leaves) if isinstance(a, jax.Array) and a.sharding != sharding
             and not a.is_fully_addressable]
    gathered = dict(zip(split, _gather_replicated(sharding)([leaves[i] for i in split]))) if split else {}

    def put(i, a):
        # Equal, not merely equivalent: on one device a SingleDeviceSharding is equivalent, but jit
        # compiles again for it when the same array comes back with this NamedSharding.
        if isinstance(a, jax.Array) and a.sharding == sharding:
            return a
        if i in gathered:
            return gathered[i]
        if jax.process_count() == 1:
            return jax.device_put(a, sharding)
        return jax.make_array_from_callback(np.shape(a), sharding, lambda idx: np.asarray(a)[idx])
    return jax.tree.unflatten(treedef, [put(i, a) for i, a in enumerate(leaves)])


@functools.lru_cache(maxsize=None)
def _gather_replicated(sharding: NamedSharding):
    """The identity, compiled to give its outputs ``sharding`` (cached: the same tree compiles once)."""
    return jax.jit(lambda arrays: arrays, out_shardings=sharding)


def to_host(array: jax.Array) -> np.ndarray:
    """The whole (possibly multi-process) array as one numpy array on every process."""
    if jax.process_count() > 1 and not array.is_fully_addressable:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(array, tiled=True))
    return np.asarray(array)


def gather_from_processes(values: np.ndarray) -> np.ndarray:
    """Every process's ``values`` (a small int32 array), stacked: [process_count, ...]. A collective:
    every process must call it. One process: ``values[None]``, without communicating."""
    values = np.asarray(values, np.int32)
    if jax.process_count() == 1:
        return values[None]
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(values))


def processes_that_failed(ok: bool) -> list[int]:
    """The indices of the processes whose ``ok`` is False, the same list on every process (a
    collective: every process must call it). So that all of them stop when one cannot go on,
    instead of the others waiting for it in the next collective forever."""
    return [i for i, fine in enumerate(gather_from_processes(np.array([ok]))[:, 0]) if not fine]

