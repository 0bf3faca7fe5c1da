"""Checks for sweeps on SLURM (``hydra/launcher=slurm``, Hydra's submitit launcher), run before
anything is submitted: SLURM's client commands are on ``PATH`` and answer, the partition asked
for exists (else one line naming it and the partitions there are), and a trial's CPUs and memory
fit on one of its nodes (else ``sbatch`` would refuse every trial)."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf

from taxonomist.errors import ConfigError

SLURM_LAUNCHER = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
TIMEOUT = 30.0  # seconds for sinfo to answer


@dataclass(frozen=True)
class Partition:
    """A partition as ``sinfo`` lists it: the most CPUs and memory (MB) one of its nodes has."""

    name: str
    default: bool
    cpus: int
    memory_mb: int


def uses_slurm(base: DictConfig) -> bool:
    """Whether the composed sweep config (with its ``hydra`` node) launches trials on SLURM."""
    return OmegaConf.select(base, "hydra.launcher._target_") == SLURM_LAUNCHER


def _number(text: str) -> int:
    """``sinfo``'s ``2``, ``2+`` (nodes differ: at least) or ``n/a``: the leading integer, else 0."""
    found = re.match(r"\d+", text)
    return int(found.group()) if found else 0


def partitions() -> list[Partition]:
    """The cluster's partitions (``sinfo -o "%P %c %m"``: one line per group of like nodes)."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        raise ConfigError(
            "hydra/launcher=slurm: SLURM's sinfo and sbatch are not on PATH: run the sweep on a SLURM "
            "submit host (or drop hydra/launcher=slurm)"
        )
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%P %c %m"], capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        raise ConfigError(f"hydra/launcher=slurm: sinfo did not answer in {TIMEOUT:.0f} s: is slurmctld up?") from None
    if out.returncode != 0:
        why = " ".join(out.stderr.split()) or f"exit code {out.returncode}"
        raise ConfigError(f"hydra/launcher=slurm: sinfo failed ({why}): is slurmctld up and SLURM_CONF right?")
    found: dict[str, Partition] = {}
    for line in out.stdout.splitlines():
        fields = line.split()
        if not fields:
            continue
        name = fields[0].rstrip("*")
        cpus, memory = (_number(f) for f in [*fields[1:3], "0", "0"][:2])
        seen = found.get(name)
        found[name] = Partition(
            name,
            fields[0].endswith("*") or (seen is not None and seen.default),
            max(cpus, seen.cpus if seen else 0),
            max(memory, seen.memory_mb if seen else 0),
        )
    return sorted(found.values(), key=lambda p: p.name)


def check_launcher(base: DictConfig) -> None:
    """Fail before submitting when the SLURM launcher is chosen and the cluster cannot take the
    trials: no SLURM commands, no answer, no such partition (or no default partition), or a
    trial asking for more CPUs or memory than any node of the partition has."""
    if not uses_slurm(base):
        return
    known = partitions()
    names = ", ".join(p.name for p in known) or "none"
    launcher = base.hydra.launcher
    wanted = OmegaConf.select(launcher, "partition")
    if wanted is None:
        chosen = next((p for p in known if p.default), None)
        if chosen is None:
            raise ConfigError(
                f"hydra/launcher=slurm: the cluster has no default partition: set hydra.launcher.partition "
                f"(partitions: {names})"
            )
    else:
        chosen = next((p for p in known if p.name == str(wanted)), None)
        if chosen is None:
            raise ConfigError(f"hydra.launcher.partition={wanted}: no such SLURM partition (partitions: {names})")
    tasks = int(OmegaConf.select(launcher, "tasks_per_node") or 1)
    cpus = OmegaConf.select(launcher, "cpus_per_task")
    if cpus is not None and chosen.cpus and int(cpus) * tasks > chosen.cpus:
        raise ConfigError(
            f"hydra.launcher.cpus_per_task={cpus} x tasks_per_node={tasks}: the nodes of partition "
            f"{chosen.name!r} have at most {chosen.cpus} CPUs"
        )
    memory = OmegaConf.select(launcher, "mem_gb")
    if memory is not None and chosen.memory_mb and float(memory) * 1024 > chosen.memory_mb:
        raise ConfigError(
            f"hydra.launcher.mem_gb={memory}: the nodes of partition {chosen.name!r} have at most "
            f"{chosen.memory_mb / 1024:.1f} GB"
        )
