"""Checks for sweeps on SLURM (``hydra/launcher=slurm``, Hydra's submitit launcher), run before
anything is submitted: SLURM's client commands are on ``PATH`` and answer, and the partition
asked for exists (else one line naming it and the partitions there are)."""

from __future__ import annotations

import shutil
import subprocess

from omegaconf import DictConfig, OmegaConf

from taxonomist.errors import ConfigError

SLURM_LAUNCHER = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
TIMEOUT = 30.0  # seconds for sinfo to answer


def uses_slurm(base: DictConfig) -> bool:
    """Whether the composed sweep config (with its ``hydra`` node) launches trials on SLURM."""
    return OmegaConf.select(base, "hydra.launcher._target_") == SLURM_LAUNCHER


def partitions() -> tuple[list[str], str | None]:
    """The cluster's partitions (as ``sinfo`` lists them) and its default one, if any."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        raise ConfigError(
            "hydra/launcher=slurm: SLURM's sinfo and sbatch are not on PATH: run the sweep on a SLURM "
            "submit host (or drop hydra/launcher=slurm)"
        )
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        raise ConfigError(f"hydra/launcher=slurm: sinfo did not answer in {TIMEOUT:.0f} s: is slurmctld up?") from None
    if out.returncode != 0:
        why = " ".join(out.stderr.split()) or f"exit code {out.returncode}"
        raise ConfigError(f"hydra/launcher=slurm: sinfo failed ({why}): is slurmctld up and SLURM_CONF right?")
    names = [line.strip() for line in out.stdout.splitlines() if line.strip()]
    default = next((n.rstrip("*") for n in names if n.endswith("*")), None)
    return sorted({n.rstrip("*") for n in names}), default


def check_launcher(base: DictConfig) -> None:
    """Fail before submitting when the SLURM launcher is chosen and the cluster cannot take the
    trials: no SLURM commands, no answer, or no such partition (or no default partition)."""
    if not uses_slurm(base):
        return
    known, default = partitions()
    wanted = OmegaConf.select(base, "hydra.launcher.partition")
    if wanted is None:
        if default is None:
            raise ConfigError(
                f"hydra/launcher=slurm: the cluster has no default partition: set hydra.launcher.partition "
                f"(partitions: {', '.join(known) or 'none'})"
            )
        return
    if str(wanted) not in known:
        raise ConfigError(
            f"hydra.launcher.partition={wanted}: no such SLURM partition (partitions: {', '.join(known) or 'none'})"
        )
