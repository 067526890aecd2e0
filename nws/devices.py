"""Where a run executes: the CPUs (and so the compute threads) a process may use, the device it evaluates on,
and its rank in a distributed run."""

from __future__ import annotations

import os
import warnings

import torch

from nws.config import TrainerConfig

def uses_cuda(trainer_cfg: TrainerConfig) -> bool:
    """Whether training runs on CUDA GPUs: asked for (or ``auto``) and available."""
    return trainer_cfg.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()


def available_cpus() -> int:
    """The CPUs this process may run on: its affinity mask (``taskset``, a container's or a cluster's CPU set),
    within a SLURM job at most its CPUs per task."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    per_task = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if os.environ.get("SLURM_JOB_ID") and per_task.isdigit() and int(per_task) > 0:
        cpus = min(cpus, int(per_task))
    return max(1, cpus)


def use_threads(trainer_cfg: TrainerConfig) -> int:
    """Set torch's compute threads to ``trainer.threads``; by default, where the environment does not set them
    (``OMP_NUM_THREADS``), to :func:`available_cpus`. Returns the number used."""
    if trainer_cfg.threads is None and os.environ.get("OMP_NUM_THREADS", "").strip():
        return torch.get_num_threads()
    threads = trainer_cfg.threads or available_cpus()
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


def eval_device(trainer_cfg: TrainerConfig) -> torch.device:
    """Where to evaluate after training: this process's GPU when training may use GPUs, else the CPU."""
    if trainer_cfg.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def is_global_zero() -> bool:
    """Whether this process is rank 0 of its (possibly not yet started) distributed run: the one that writes.

    Before Lightning initialises the process group, the rank comes from the launcher's environment
    (``RANK``, Lightning's ``LOCAL_RANK``/``NODE_RANK``, torchrun's ``GROUP_RANK``, SLURM's ``SLURM_PROCID``).
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    env = os.environ
    if any(int(env.get(key, "0") or 0) != 0 for key in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK")):
        return False
    from lightning.fabric.plugins.environments import SLURMEnvironment

    with warnings.catch_warnings():  # "srun is available but not used": a run may well be started without it
        warnings.simplefilter("ignore")
        slurm = SLURMEnvironment.detect()
    return not (slurm and int(env.get("SLURM_PROCID", "0") or 0) != 0)


def barrier() -> None:
    """Wait for every rank of the distributed run (no-op in a single process)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if torch.distributed.get_world_size() == 1:
        return
    if torch.distributed.get_backend() == "nccl":
        torch.distributed.barrier(device_ids=[torch.cuda.current_device()])
    else:
        torch.distributed.barrier()


def shutdown_distributed() -> None:
    """End this process's part of a distributed run: wait for every rank, then destroy the process group.

    Lightning leaves the group alive after ``fit``; a process that exits with it alive can abort in the
    communication backend's thread destructors ("terminate called without an active exception").
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        barrier()
        torch.distributed.destroy_process_group()

