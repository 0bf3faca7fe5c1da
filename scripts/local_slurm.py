"""A one-machine SLURM cluster, for trying sweeps on SLURM (and for the test that proves them).

Starts MUNGE, ``slurmctld`` and ``slurmd`` (Debian's ``munge`` and ``slurm-wlm``) from a config
written to a fresh temporary folder, runs one command against them (with ``SLURM_CONF`` set, so
``sbatch``, ``squeue`` and Hydra's submitit launcher find the cluster), then stops them all and
deletes the folder. Everything runs in a private network namespace that has only loopback: the
daemons cannot be reached from elsewhere, and they end with the command (``unshare
--kill-child``). Needs root (the namespace, and ``slurmd`` runs jobs as their user).

    sudo .venv/bin/python scripts/local_slurm.py -- \\
        .venv/bin/taxonomist sweep hydra/launcher=slurm hparams_search=optuna hydra.sweeper.n_trials=2

The cluster has one node (this machine's CPUs and memory) and one partition, ``local``.
``--keep`` leaves the folder (config, daemon logs, the state) for a look afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PARTITION = "local"
NODE = "localhost"
INSIDE = "TAXONOMIST_LOCAL_SLURM_NAMESPACE"  # set once re-executed inside the namespace
START_TIMEOUT = 60.0


def slurm_conf(folder: Path, cpus: int, memory_mb: int) -> str:
    """slurm.conf of a one-node cluster whose files are all under ``folder``."""
    return "\n".join(
        [
            "ClusterName=taxonomist-local",
            f"SlurmctldHost={NODE}(127.0.0.1)",
            "SlurmUser=root",
            "SlurmctldPort=6817",
            "SlurmdPort=6818",
            "AuthType=auth/munge",
            f"AuthInfo=socket={folder / 'munge.socket'}",
            "CredType=cred/munge",
            f"StateSaveLocation={folder / 'state'}",
            f"SlurmdSpoolDir={folder / 'spool'}",
            f"SlurmctldPidFile={folder / 'slurmctld.pid'}",
            f"SlurmdPidFile={folder / 'slurmd.pid'}",
            f"SlurmctldLogFile={folder / 'slurmctld.log'}",
            f"SlurmdLogFile={folder / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc",  # no cgroups needed
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "SchedulerType=sched/backfill",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core_Memory",
            "MpiDefault=none",
            "ReturnToService=2",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=30",
            "InactiveLimit=0",
            "KillWait=10",
            f"NodeName={NODE} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN",
            f"PartitionName={PARTITION} Nodes={NODE} Default=YES MaxTime=INFINITE State=UP",
            "",
        ]
    )


def memory_mb() -> int:
    """What the node offers jobs: 90% of the machine's memory, in MB."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(int(line.split()[1]) * 0.9 / 1024)
    return 1024


def wait_idle(env: dict[str, str], logs: list[Path], procs: list[subprocess.Popen]) -> None:
    """Wait until the node is idle (slurmd registered with slurmctld); fail with the logs."""
    deadline = time.monotonic() + START_TIMEOUT
    state = ""
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                raise SystemExit(f"local SLURM: {proc.args[0]} exited with {proc.returncode}\n{tails(logs)}")
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=env, capture_output=True, text=True)
        state = out.stdout.strip()
        if out.returncode == 0 and state.startswith("idle"):
            return
        time.sleep(0.5)
    raise SystemExit(f"local SLURM: the node is not idle after {START_TIMEOUT:.0f} s ({state!r})\n{tails(logs)}")


def tails(logs: list[Path]) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in logs if p.is_file())


def stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM every daemon (newest first), SIGKILL what is left after 15 s."""
    for proc in reversed(procs):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 15
    for proc in reversed(procs):
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_cluster(command: list[str], keep: bool) -> int:
    """Inside the namespace: bring the cluster up, run ``command``, bring it down."""
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    # SLURM resolves with AI_ADDRCONFIG, which glibc answers only when an IPv4 address other
    # than 127.0.0.1 is configured: a second loopback address (still reachable from here only).
    subprocess.run(["ip", "addr", "add", "127.0.0.2/32", "dev", "lo"], check=True)
    folder = Path(tempfile.mkdtemp(prefix="taxonomist-slurm-"))
    for sub in ("state", "spool"):
        (folder / sub).mkdir()
    key = folder / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    conf = folder / "slurm.conf"
    conf.write_text(slurm_conf(folder, os.cpu_count() or 1, memory_mb()))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    env.pop(INSIDE, None)
    procs: list[subprocess.Popen] = []
    logs = [folder / "munged.log", folder / "slurmctld.log", folder / "slurmd.log"]
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}  # their logs are files in the folder
    try:
        munged = [
            "munged", "--foreground", "--force", f"--key-file={key}", f"--socket={folder / 'munge.socket'}",
            f"--pid-file={folder / 'munged.pid'}", f"--log-file={folder / 'munged.log'}",
            f"--seed-file={folder / 'munge.seed'}",
        ]  # fmt: skip
        procs.append(subprocess.Popen(munged, env=env, **quiet))
        deadline = time.monotonic() + START_TIMEOUT
        while not (folder / "munge.socket").exists():
            if procs[0].poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"local SLURM: munged did not start\n{tails(logs)}")
            time.sleep(0.1)
        procs.append(subprocess.Popen(["slurmctld", "-D", "-i", "-f", str(conf)], env=env, **quiet))
        procs.append(subprocess.Popen(["slurmd", "-D", "-N", NODE, "-f", str(conf)], env=env, **quiet))
        wait_idle(env, logs, procs)
        print(f"local SLURM: node {NODE} idle, partition {PARTITION!r} (SLURM_CONF={conf})", flush=True)
        return subprocess.run(command, env=env).returncode
    finally:
        if procs:  # jobs still queued or running (an interrupted command) end with the cluster
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                subprocess.run(["scancel", "--full", "--user", getpass.getuser()], env=env, timeout=30, **quiet)
        stop(procs)
        if keep:
            print(f"local SLURM: kept {folder}", flush=True)
        else:
            shutil.rmtree(folder, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", action="store_true", help="keep the cluster's folder (config, logs) afterwards")
    parser.add_argument("command", nargs="+", help="the command to run against the cluster (after --)")
    args = parser.parse_args(argv)
    missing = [p for p in ("munged", "slurmctld", "slurmd", "sinfo", "unshare", "ip") if shutil.which(p) is None]
    if missing:
        raise SystemExit(
            f"local SLURM: {', '.join(missing)} not found: install Debian's slurm-wlm and munge "
            "(sudo apt-get install slurm-wlm munge; scripts/setup.sh does it as root)"
        )
    if os.geteuid() != 0:
        raise SystemExit("local SLURM: needs root (a network namespace, and slurmd runs the jobs)")
    if os.environ.get(INSIDE) != "1":
        # Re-run inside a new network namespace (loopback only); the daemons die with it.
        env = {**os.environ, INSIDE: "1"}
        cmd = ["unshare", "--net", "--kill-child", sys.executable, str(Path(__file__).resolve())]
        return subprocess.run([*cmd, *(["--keep"] if args.keep else []), "--", *args.command], env=env).returncode
    return run_cluster(args.command, args.keep)


if __name__ == "__main__":
    sys.exit(main())
