"""Distributed helpers that also work as a world of one.

Every helper here is safe to call before (or without) :func:`init_distributed`: ranks default to 0,
the world size to 1, collectives return their input and ``barrier`` does nothing. Training and
evaluation code therefore never branches on "am I distributed?".

Launchers recognised by :func:`init_distributed`, in the order the MAR original checks them:

* OpenMPI (``--dist_on_itp``): ``OMPI_COMM_WORLD_RANK``, ``OMPI_COMM_WORLD_SIZE``,
  ``OMPI_COMM_WORLD_LOCAL_RANK``; the rendezvous is ``tcp://$MASTER_ADDR:$MASTER_PORT``.
* torchrun / ``env://``: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``.
* SLURM (``srun``): ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``; ``MASTER_ADDR`` and
  ``MASTER_PORT`` must be exported by the job script for ``env://``. A single-task allocation is a
  world of one, not a distributed launch; several tasks without srun's ``SLURM_STEP_NUM_TASKS`` are an error.
* none of these: a world of one with no process group.

The backend is NCCL on CUDA and gloo otherwise. Host-side agreement (numbers, objects, barriers) runs on a gloo
group beside NCCL, so that it needs no GPU work and never synchronises the device.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

DEFAULT_TIMEOUT_MINUTES = 30.0  # a collective that waits longer is a hang (rank 0 alone: `wait_for_main_process`)
MAIN_PROCESS_WAIT_HOURS = 24.0  # how long the other ranks wait for rank 0's own phases
# The group of host-side agreement (numbers, objects, barriers): gloo beside an NCCL default group, so that
# agreeing on a save or waiting for a rank involves no GPU work and no device synchronisation; None (the default
# group) when the default group is gloo already.
_HOST_GROUP = None


class LaunchEnv(NamedTuple):
    """Process placement read from a launcher's environment variables."""

    rank: int
    world_size: int
    local_rank: int
    launcher: str  # 'openmpi' | 'torchrun' | 'slurm'


@dataclass(frozen=True)
class DistInfo:
    """What :func:`init_distributed` set up."""

    rank: int
    world_size: int
    local_rank: int
    distributed: bool  # True when a process group exists
    backend: str | None  # None for a world of one
    device: torch.device  # the device this process should use


def _env_int(env: Mapping[str, str], name: str, launcher: str) -> int:
    if name not in env:
        raise ValueError(f"{launcher} launch detected but environment variable {name} is not set")
    try:
        return int(env[name])
    except ValueError:
        raise ValueError(f"environment variable {name}={env[name]!r} is not an integer") from None


def parse_launcher_env(env: Mapping[str, str], dist_on_itp: bool = False) -> LaunchEnv | None:
    """Map launcher environment variables to ``(rank, world_size, local_rank, launcher)``.

    Pure function of ``env`` (pass ``os.environ`` in real use). ``dist_on_itp`` selects the OpenMPI
    variables, as the MAR flag of that name does. Returns None when no launcher is detected. Variables that do
    not add up raise ValueError at once rather than wait for ranks that never come: a rank outside the world, or
    SLURM's task count in a process that srun did not start (a job script's own ``python main.py``).
    """
    if dist_on_itp:
        launch = LaunchEnv(_env_int(env, "OMPI_COMM_WORLD_RANK", "OpenMPI"),
                           _env_int(env, "OMPI_COMM_WORLD_SIZE", "OpenMPI"),
                           _env_int(env, "OMPI_COMM_WORLD_LOCAL_RANK", "OpenMPI"), "openmpi")
    elif "RANK" in env and "WORLD_SIZE" in env:
        launch = LaunchEnv(_env_int(env, "RANK", "torchrun"), _env_int(env, "WORLD_SIZE", "torchrun"),
                           _env_int(env, "LOCAL_RANK", "torchrun"), "torchrun")
    elif "SLURM_PROCID" in env:
        world_size = _env_int(env, "SLURM_NTASKS", "SLURM")
        if world_size == 1:
            return None
        if "SLURM_STEP_NUM_TASKS" not in env:
            raise ValueError(f"SLURM_NTASKS={world_size} but this process was not started by srun (no "
                             "SLURM_STEP_NUM_TASKS): launch it with `srun python main.py ...`, or run one process "
                             "with `SLURM_NTASKS=1 python main.py ...`")
        launch = LaunchEnv(_env_int(env, "SLURM_PROCID", "SLURM"), world_size,
                           _env_int(env, "SLURM_LOCALID", "SLURM"), "slurm")
    else:
        return None
    if launch.world_size < 1 or not 0 <= launch.rank < launch.world_size or launch.local_rank < 0:
        raise ValueError(f"the {launch.launcher} variables do not add up: rank {launch.rank} of world size "
                         f"{launch.world_size}, local rank {launch.local_rank}")
    return launch


def resolve_device_type(requested: str | None) -> str:
    """The one device decision: ``requested`` ('cuda', 'cpu', 'mps', ...) or, when None, CUDA if available.

    The process group's backend and the model's device both follow it: ``cpu`` means gloo and CPU tensors
    even on a host with GPUs. Raises ValueError for CUDA on a host without it.
    """
    if not requested:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device_type = torch.device(requested).type
    except RuntimeError:
        raise ValueError(f"--device {requested!r} is not a torch device type (cuda, cpu, mps, ...)") from None
    if device_type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but CUDA is not available; pass --device cpu")
    return device_type


def local_cuda_device(local_rank: int) -> torch.device:
    """The GPU of a process with ``local_rank`` among those it sees: ``local_rank % device_count``. torchrun shows
    every process the node's GPUs (the index is the local rank); SLURM with ``--gpus-per-task=1`` or a
    ``CUDA_VISIBLE_DEVICES`` per process shows one (every process uses ``cuda:0``)."""
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def launch_world_size(dist_on_itp: bool = False) -> int:
    """The world size the launcher's environment announces (1 without a launcher), before any group exists."""
    launch = parse_launcher_env(os.environ, dist_on_itp)
    return 1 if launch is None else launch.world_size


def init_distributed(device_type: str, dist_on_itp: bool = False, dist_url: str = "env://",
                     timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES) -> DistInfo:
    """Join the process group described by the launcher's environment, or run as a world of one.

    Args:
        device_type: from `resolve_device_type`. CUDA selects the NCCL backend and the GPU of the local
            rank; anything else uses gloo.
        dist_on_itp: use the OpenMPI variables (the MAR flag of that name).
        dist_url: rendezvous for torchrun/SLURM launches (``env://`` reads MASTER_ADDR/MASTER_PORT).
        timeout_minutes: the process groups' timeout: a collective that waits longer fails (a hang becomes an
            error). Phases that rank 0 runs alone are waited for by `wait_for_main_process`, not by it.
    """
    launch = parse_launcher_env(os.environ, dist_on_itp)
    if launch is None:
        device = torch.device(device_type, 0) if device_type == "cuda" else torch.device(device_type)
        return DistInfo(0, 1, 0, False, None, device)
    if launch.launcher == "openmpi":
        init_method = f"tcp://{_require_env('MASTER_ADDR')}:{_require_env('MASTER_PORT')}"
    else:
        init_method = dist_url or "env://"
        if init_method == "env://":
            _require_env("MASTER_ADDR")
            _require_env("MASTER_PORT")
    if device_type == "cuda":
        device, backend = local_cuda_device(launch.local_rank), "nccl"
        torch.cuda.set_device(device)
    else:
        device, backend = torch.device(device_type), "gloo"
    timeout = datetime.timedelta(minutes=timeout_minutes)
    store = restart_scoped_store(launch, init_method, timeout)
    if store is None:
        dist.init_process_group(backend=backend, init_method=init_method, world_size=launch.world_size,
                                rank=launch.rank, timeout=timeout)
    else:
        dist.init_process_group(backend=backend, store=store, world_size=launch.world_size, rank=launch.rank,
                                timeout=timeout)
    global _HOST_GROUP
    _HOST_GROUP = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else None
    barrier()
    return DistInfo(launch.rank, launch.world_size, launch.local_rank, True, backend, device)


def restart_scoped_store(launch: LaunchEnv, init_method: str, timeout: datetime.timedelta):
    """Under a one-node `torchrun --max-restarts`, a rendezvous store keyed by the restart count; else None.

    torchrun's agent keeps one store across worker restarts, and ``env://`` reads the previous attempt's keys:
    the restarted ranks dial the dead ranks' gloo addresses and fail (or hang). A prefix per restart gives each
    attempt its own keys. Only on one node, where one agent counts the restarts for every rank; across nodes
    the counts are per agent, and torch's c10d rendezvous hosts a fresh store for each round instead.
    """
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    one_node = os.environ.get("LOCAL_WORLD_SIZE") == str(launch.world_size)
    if launch.launcher != "torchrun" or restart is None or not one_node or init_method != "env://":
        return None
    agent_hosts_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    store = dist.TCPStore(_require_env("MASTER_ADDR"), int(_require_env("MASTER_PORT")), launch.world_size,
                          is_master=launch.rank == 0 and not agent_hosts_store, timeout=timeout)
    return dist.PrefixStore(f"transdiff/restart{restart}/", store)


def _require_env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise ValueError(f"distributed launch needs the environment variable {name} "
                         "(torchrun sets it; with srun or mpirun export it in the job script)")
    return value


def is_initialized() -> bool:
    """True when a process group exists."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """Global rank; 0 without a process group."""
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    """Number of processes; 1 without a process group."""
    return dist.get_world_size() if is_initialized() else 1


def is_main_process() -> bool:
    """True on global rank 0."""
    return get_rank() == 0


def barrier() -> None:
    """Wait for every rank, on the host (`_HOST_GROUP`); no-op without a process group."""
    if is_initialized():
        dist.barrier(group=_HOST_GROUP)


def print0(*args: Any, **kwargs: Any) -> None:
    """``print`` on rank 0 only."""
    if is_main_process():
        print(*args, **kwargs)


def all_reduce_sum(values: Sequence[float]) -> list[float]:
    """Element-wise sum of a list of host numbers over all ranks (float64, on the host group: no GPU work); the
    input without a group."""
    values = [float(v) for v in values]
    if not is_initialized():
        return values
    buffer = torch.tensor(values, dtype=torch.float64)  # [N], on the host
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=_HOST_GROUP)
    return buffer.tolist()


def all_reduce_mean(x: float | torch.Tensor) -> float:
    """Mean of a scalar over all ranks, as a Python float. A tensor is reduced where it lives (NCCL for a GPU
    tensor) and read once, after the reduction."""
    if not isinstance(x, torch.Tensor):
        return all_reduce_sum([x])[0] / get_world_size()
    if x.numel() != 1:
        raise ValueError(f"all_reduce_mean takes a scalar, got a tensor of shape {tuple(x.shape)}")
    if is_initialized():
        x = x.detach().clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x.item() / get_world_size()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Return rank ``src``'s ``obj`` on every rank (picklable objects); ``obj`` without a group."""
    if not is_initialized():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src, group=_HOST_GROUP)
    return holder[0]


def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Make every parameter and persistent buffer of ``module`` rank ``src``'s, in place; nothing without a group."""
    if not is_initialized():
        return
    with torch.no_grad():
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, src)


def gather_object(obj: Any) -> list[Any] | None:
    """Every rank's ``obj`` on rank 0, in rank order (None on the other ranks); ``[obj]`` without a group."""
    if not is_initialized():
        return [obj]
    gathered: list[Any] | None = [None] * get_world_size() if is_main_process() else None
    dist.gather_object(obj, gathered, dst=0, group=_HOST_GROUP)
    return gathered


def wait_for_main_process(hours: float = MAIN_PROCESS_WAIT_HOURS) -> None:
    """Wait, on the host, for rank 0 to finish a phase of its own (metrics, a folder listing); a barrier with its
    own long timeout, so that the process groups' timeout can stay short. No-op without a group."""
    if is_initialized():
        dist.monitored_barrier(group=_HOST_GROUP, timeout=datetime.timedelta(hours=hours), wait_all_ranks=True)


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (picklable objects); ``[obj]`` without a group."""
    if not is_initialized():
        return [obj]
    gathered: list[Any] = [None] * get_world_size()
    dist.all_gather_object(gathered, obj, group=_HOST_GROUP)
    return gathered


def ddp_sync(module: torch.nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """Context for one micro-step: skips DDP's gradient all-reduce when ``sync`` is False.

    Use ``sync=False`` on every gradient-accumulation micro-step except the last one. For modules
    that are not DDP-wrapped this is a null context.
    """
    if isinstance(module, DistributedDataParallel) and not sync:
        return module.no_sync()
    return contextlib.nullcontext()


def cleanup() -> None:
    """Destroy the process groups if there are any."""
    global _HOST_GROUP
    if is_initialized():
        dist.destroy_process_group()
    _HOST_GROUP = None

