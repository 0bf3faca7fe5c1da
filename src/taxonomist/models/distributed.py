"""Training in several processes (Lightning DDP, ``trainer=ddp``): who does what.

Lightning's DDP starts the other processes of a machine by running the same command again
(``taxonomist train``) with ``LOCAL_RANK`` set, when the first process calls ``trainer.fit``;
the processes of other machines are started there, with ``NODE_RANK``. So every process runs
the whole train stage. The rules that keep that correct:

- Only the primary process (global rank 0) has side effects: it creates the MLflow run, writes
  ``models/`` (``best.ckpt``, ``labels.json``, ``run.json``), the history CSV and its MLflow
  rows, and the resume state. The others decide nothing on their own: before ``trainer.fit``
  the primary passes the run id and the checkpoint to resume from in the environment
  (:data:`RUN_ID_VARIABLE`, :data:`RESUME_VARIABLE`), which the processes it starts inherit.
- Every epoch's order comes from ``(seed, epoch)`` as in one process; each process takes every
  ``world_size``-th image of it from its rank on (:class:`RankShard`, the split of torch's
  ``DistributedSampler``), so the shards are disjoint and one optimizer step sees the same
  images as one step of a single process with ``world_size`` times the batch.
- Validation: every process validates the whole val split with the same weights (DDP keeps the
  parameters equal and broadcasts rank 0's buffers), and the val metrics are not reduced across
  processes; they are the whole split's, exact, with no padded duplicates. (A val split cut in
  uneven shards would hang DDP: each forward pass broadcasts the buffers, a collective call.)
  Train metrics are torchmetrics states reduced over all processes, the train loss a mean over
  processes of equal shards.
- ``fit.batch_size`` is per process (as in Lightning and PyTorch's DataLoader): the global
  batch is ``fit.batch_size x devices x num_nodes``, and the learning rate is not rescaled.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Sized
from typing import Any

from omegaconf import DictConfig
from torch.utils.data import Sampler

from taxonomist.errors import ConfigError

log = logging.getLogger(__name__)

RUN_ID_VARIABLE = "TAXONOMIST_DDP_RUN_ID"  # the primary's MLflow run, for the processes it starts
RESUME_VARIABLE = "TAXONOMIST_DDP_RESUME"  # the checkpoint it resumes from ("" = a fresh start)
# Launchers' variables that give a process's global or local rank (torchrun, Lightning, SLURM, LSF).
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")


def is_primary(environ: dict[str, str] | None = None) -> bool:
    """Whether this process is the job's first (global rank 0), from the launch environment:
    true unless a launcher set a non-zero rank (Lightning's own relaunch, torchrun, SLURM ...).
    Known before any process group exists, so the stage can decide before ``trainer.fit``."""
    env = os.environ if environ is None else environ
    return all(_int(env.get(name, "0")) == 0 for name in RANK_VARIABLES)


def _int(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        return 0


def requested_devices(devices: Any) -> int | None:
    """The number of devices ``trainer.devices`` asks for per machine (None: auto or all)."""
    if isinstance(devices, list | tuple):
        return len(devices)
    text = str(devices).strip()
    if text.lstrip("-").isdigit():
        count = int(text)
        return None if count == -1 else count
    if "," in text:  # "0,1": GPU ids
        return len([d for d in text.split(",") if d.strip()])
    return None


def uses_gpu(accelerator: str) -> bool:
    """Whether ``trainer.accelerator`` runs on CUDA GPUs here."""
    import torch

    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def cpu_cores() -> int:
    """The CPU cores this process may run on (its affinity: a container's or scheduler's limit)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def check_devices(cfg: DictConfig) -> None:
    """Fail in one line, before anything runs, when ``trainer.devices`` asks for more than this
    machine has: GPUs (``torch.cuda.device_count()``) on a GPU accelerator; on CPU, where each
    device is one training process, the CPU cores this process may use (more processes than
    cores only share them, slower than fewer). Also ``sync_batchnorm`` on CPU, which torch's
    SyncBatchNorm does not support."""
    import torch

    trainer = cfg.trainer
    wanted = requested_devices(trainer.devices)
    accelerator = str(trainer.accelerator)
    gpu = uses_gpu(accelerator)
    if wanted is not None and wanted < 1:
        raise ConfigError(f"trainer.devices={trainer.devices}: use a positive number, -1 (all) or auto")
    if gpu and wanted is not None:
        have = torch.cuda.device_count()
        if wanted > have:
            raise ConfigError(
                f"trainer.devices={wanted} but this machine has {have} CUDA GPU(s): set trainer.devices={max(have, 1)} "
                "or fewer (trainer.num_nodes adds machines)"
            )
    elif wanted is not None and accelerator in ("cpu", "auto"):
        have = cpu_cores()
        if wanted > have:
            raise ConfigError(
                f"trainer.devices={wanted} asks for {wanted} training processes on CPU, but this process may use "
                f"{have} CPU core(s): set trainer.devices={have} or fewer (trainer.num_nodes adds machines)"
            )
    if bool(trainer.sync_batchnorm) and not gpu:
        raise ConfigError(
            "trainer.sync_batchnorm=true needs GPUs (torch's SyncBatchNorm has no CPU version): set it to false"
        )


def local_processes(cfg: DictConfig) -> int:
    """Training processes on this machine: one per device (on CPU ``devices: auto`` is one)."""
    return requested_devices(cfg.trainer.devices) or 1


def threads_per_process(cfg: DictConfig) -> int:
    """``fit.num_threads``, with 0 (all cores) split among this machine's CPU training processes."""
    threads = int(cfg.fit.num_threads)
    if threads > 0 or uses_gpu(str(cfg.trainer.accelerator)):
        return threads
    processes = local_processes(cfg)
    return max(1, cpu_cores() // processes) if processes > 1 else 0


class RankShard(Sampler[int]):
    """Rank ``rank``'s part of ``base``'s order: every ``replicas``-th index from ``rank`` on.

    The order is padded by wrapping around to a multiple of ``replicas`` (as torch's
    ``DistributedSampler`` does), so every process takes the same number of steps; up to
    ``replicas - 1`` images are then seen twice per epoch. ``set_epoch`` goes to ``base``, whose
    order depends on ``(seed, epoch)`` only, the same in every process. Taking every
    ``replicas``-th index keeps one step's images those of one step of a single process with
    ``replicas`` times the batch.
    """

    def __init__(self, base: Sampler[int], replicas: int, rank: int) -> None:
        if not 0 <= rank < replicas:
            raise ValueError(f"rank {rank} outside 0..{replicas - 1}")
        self.base, self.replicas, self.rank = base, int(replicas), int(rank)

    def __len__(self) -> int:
        return math.ceil(len(self.base) / self.replicas) if isinstance(self.base, Sized) else 0

    def set_epoch(self, epoch: int) -> None:
        """Use the order of ``epoch`` (Lightning calls this before each epoch)."""
        setter = getattr(self.base, "set_epoch", None)
        if setter is not None:
            setter(epoch)

    def __iter__(self) -> Iterator[int]:
        order = list(self.base)
        total = len(self) * self.replicas
        if total > len(order) and order:
            order += (order * math.ceil((total - len(order)) / len(order)))[: total - len(order)]
        return iter(order[self.rank : total : self.replicas])
