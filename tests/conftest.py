"""Shared fixtures: tiny image sets the tests make themselves (no network, no downloads)."""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image, ImageDraw

from taxonomist.config import compose
from taxonomist.stages import ingest, preprocess

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.pop("MLFLOW_TRACKING_URI", None)

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SHAPES = ("circle", "square", "triangle")


def draw_shape(shape: str, size: int, rng: random.Random, mode: str = "RGB") -> Image.Image:
    """A filled shape on a noisy background: an easy, learnable image of class ``shape``."""
    noise = np.random.default_rng(rng.randrange(1 << 30)).integers(0, 60, (size, size, 3), dtype=np.uint8)
    img = Image.fromarray(noise, "RGB")
    draw = ImageDraw.Draw(img)
    r = rng.uniform(0.25, 0.4) * size
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    colour = tuple(rng.randrange(150, 256) for _ in range(3))
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=colour)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    if mode == "RGBA":
        img = img.convert("RGBA")
    elif mode != "RGB":
        img = img.convert(mode)
    return img


def make_image_folder(root: Path, per_class: int = 30, seed: int = 0, classes=SHAPES) -> Path:
    """A folder-per-class tree of PNG and JPEG images in several sizes and modes."""
    rng = random.Random(seed)
    modes = ("RGB", "L", "RGBA", "P")
    for label in classes:
        folder = root / label
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            size = rng.choice((24, 32, 40, 57))
            mode = modes[i % len(modes)]
            img = draw_shape(label, size, rng, mode)
            if i % 5 == 0 and mode in ("RGB", "L"):
                img.save(folder / f"{label}_{i:03d}.jpg", quality=90)
            else:
                img.save(folder / f"{label}_{i:03d}.png")
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """A tiny 3-class image folder (30 images per class)."""
    return make_image_folder(tmp_path / "shapes")


@contextmanager
def tracking_variable_kept() -> Iterator[None]:
    """Put ``MLFLOW_TRACKING_URI`` back as it was (set or unset) when the block ends.

    ``mlflow.set_tracking_uri`` (a test pointing MLflow at its project) exports the variable,
    which the stages read as the user's store: it must not move the next test's runs (and
    registry) into this test's store."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = before


@pytest.fixture(autouse=True, scope="module")
def _tracking_variable_restored_per_module():
    """:func:`tracking_variable_kept` around each module (its module-scoped fixtures)."""
    with tracking_variable_kept():
        yield


@pytest.fixture(autouse=True)
def _tracking_variable_restored():
    """:func:`tracking_variable_kept` around each test."""
    with tracking_variable_kept():
        yield


def tiny_overrides(source: Path) -> list[str]:
    """Overrides that make the default pipeline run in seconds on a tiny folder."""
    return [
        f"data.source={source}",
        "data=folder",
        "model=resnet10_narrow",
        "model.name=test_resnet",
        "preprocess.image_size=32",
        "preprocess.channels=3",
        "preprocess.mean=[0.5,0.5,0.5]",
        "preprocess.std=[0.25,0.25,0.25]",
        "preprocess.val_fraction=0.2",
        "preprocess.test_fraction=0.2",
        "fit.batch_size=16",
        "trainer.max_epochs=8",
        "trainer.precision=32-true",
        "evaluate.batch_size=64",
        "package.model_name=taxonomist-test",
    ]


def with_overrides(source: Path, overrides: Sequence[str] = ()) -> list[str]:
    """:func:`tiny_overrides` then ``overrides``; a ``model=<group>`` among them replaces the tiny model."""
    base = tiny_overrides(source)
    if any(o.startswith("model=") for o in overrides):
        base = [o for o in base if not o.startswith(("model=", "model.name="))]
    return [*base, *overrides]


def write_tiny_conf(conf_dir: Path, source: Path, name: str = "tiny", overrides: Sequence[str] = ()) -> Path:
    """Write ``conf/<name>.yaml``: the default config with :func:`tiny_overrides` (then
    ``overrides``) applied, as a primary config DVC's Hydra composition can use
    (``dvc config hydra.config_name <name>``)."""
    defaults: list = ["config"]
    values: dict = {}
    for override in with_overrides(source, overrides):
        key, value = override.split("=", 1)
        if "." not in key:  # a config group choice
            defaults.append({f"override {key}": value})
            continue
        *parents, leaf = key.split(".")
        node = values
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    defaults.append("_self_")
    path = conf_dir / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"defaults": defaults, **values}, sort_keys=False))
    return path


@pytest.fixture
def staged(tmp_path):
    """An image folder with one truncated PNG and one exact duplicate, ingested and preprocessed."""
    source = make_image_folder(tmp_path / "shapes", per_class=12)
    good = (source / "circle" / "circle_001.png").read_bytes()
    (source / "circle" / "zz_truncated.png").write_bytes(good[: len(good) // 2])
    shutil.copyfile(source / "square" / "square_002.png", source / "square" / "zz_duplicate.png")
    cfg = compose(tiny_overrides(source), conf_dir=REPO / "conf")
    raw, processed = tmp_path / "data" / "raw", tmp_path / "data" / "processed"
    summary = ingest.run(cfg, out_dir=raw)
    report = preprocess.run(cfg, raw_dir=raw, out_dir=processed)
    return {"source": source, "cfg": cfg, "raw": raw, "processed": processed, "summary": summary, "report": report}


def run_cmd(
    args: list[str], cwd: Path, env: Mapping[str, str] | None = None, log: Path | None = None
) -> subprocess.CompletedProcess:
    """Run a command with the environment's ``bin`` on PATH (as DVC stages need); fail with
    its output when it fails. ``MLFLOW_TRACKING_URI`` is not inherited (a project logs to its
    own store); ``env`` adds or replaces variables, e.g. ``{"MLFLOW_TRACKING_URI": server.url}``.
    ``log``: write the output to that file instead of capturing it, for a command that leaves
    daemons behind (``dvc queue start``): they inherit its output, and a captured pipe would stay
    open, and the call blocked, for as long as one of them lives."""
    full = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "NO_ALBUMENTATIONS_UPDATE": "1"}
    full.pop("MLFLOW_TRACKING_URI", None)
    full.update(env or {})
    if log is not None:
        with log.open("w") as out:
            proc = subprocess.run(args, cwd=cwd, env=full, stdout=out, stderr=subprocess.STDOUT, timeout=1200)
        output = log.read_text()
        assert proc.returncode == 0, f"{args} failed:\n{output[-4000:]}"
        return subprocess.CompletedProcess(args, proc.returncode, output, "")
    proc = subprocess.run(args, cwd=cwd, env=full, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


GIT_USER = ["-c", "user.email=t@t", "-c", "user.name=t"]


def make_dvc_project(root: Path, source: Path, overrides: Sequence[str] = ()) -> Path:
    """Turn ``root`` into a git + DVC project running this repo's pipeline on the tiny config.

    Copies ``conf/``, ``src/``, ``dvc.yaml`` and ``.gitignore``; writes ``params.yaml`` composed
    from :func:`tiny_overrides` of ``source`` plus ``overrides``; enables DVC's Hydra composition
    of the same config (``conf/tiny.yaml``), so ``dvc exp run -S key=value`` varies it. Nothing
    runs yet: call ``run_cmd([str(BIN / "dvc"), "repro"], root)``."""
    from taxonomist.config import write_params

    root.mkdir(parents=True, exist_ok=True)
    for name in ("conf", "src"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".gitignore"):  # .gitignore keeps the MLflow store out of git, as in the repo
        shutil.copy(REPO / name, root / name)
    write_params(compose(with_overrides(source, overrides), conf_dir=root / "conf"), root / "params.yaml")
    run_cmd(["git", "init", "-q"], root)
    run_cmd(["git", *GIT_USER, "commit", "-q", "--allow-empty", "-m", "init"], root)
    dvc = str(BIN / "dvc")
    run_cmd([dvc, "init", "-q"], root)
    run_cmd([dvc, "config", "core.analytics", "false"], root)
    write_tiny_conf(root / "conf", source, overrides=overrides)
    run_cmd([dvc, "config", "hydra.enabled", "true"], root)
    run_cmd([dvc, "config", "hydra.config_name", "tiny"], root)
    return root


def ready_pipeline_project(root: Path, name: str) -> Path:
    """A git + DVC project in ``root`` holding this repo's ``conf/``, ``src/``, ``dvc.yaml`` and
    ready pipeline ``pipelines/<name>`` (its dvc.yaml and params.yaml); returns the pipeline's
    folder, where ``dvc repro`` runs it."""
    root.mkdir(parents=True, exist_ok=True)
    for folder in ("conf", "src"):
        shutil.copytree(REPO / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for file in ("dvc.yaml", ".gitignore"):
        shutil.copy(REPO / file, root / file)
    pipeline = root / "pipelines" / name
    pipeline.mkdir(parents=True)
    for file in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO / "pipelines" / name / file, pipeline / file)
    run_cmd(["git", "init", "-q"], root)
    run_cmd([str(BIN / "dvc"), "init", "-q"], root)
    run_cmd([str(BIN / "dvc"), "config", "core.analytics", "false"], root)
    return pipeline


def git_commit_all(root: Path, message: str) -> None:
    """Commit everything in the test project ``root`` (a throwaway repo)."""
    run_cmd(["git", "add", "-A"], root)
    run_cmd(["git", *GIT_USER, "commit", "-q", "-m", message], root)


# --- a real MLflow tracking server -------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it for port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group ``pgid``, from ``/proc``."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


def stop_process_group(pgid: int, grace: float = 15.0) -> list[int]:
    """SIGTERM the whole group, SIGKILL it if anything is still alive after ``grace`` seconds;
    return the processes left alive (none when all went)."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return []
        deadline = time.monotonic() + wait
        while group_members(pgid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not group_members(pgid):
            return []
    return group_members(pgid)


@dataclass(frozen=True)
class MlflowServer:
    """A running ``mlflow server``: its URL, and a small client of its REST API."""

    url: str
    pgid: int
    log: Path

    def api(self, endpoint: str, body: Mapping[str, Any] | None = None, **query: Any) -> dict:
        """Call ``/api/2.0/mlflow/<endpoint>``: POST ``body`` as JSON when given, else GET with
        ``query`` as parameters; return the JSON answer, fail with the server's on an error."""
        import requests

        address = f"{self.url}/api/2.0/mlflow/{endpoint}"
        if body is not None:
            response = requests.post(address, json=body, timeout=30)
        else:
            response = requests.get(address, params=query, timeout=30)
        assert response.ok, f"{endpoint}: HTTP {response.status_code} {response.text[:2000]}"
        return response.json()

    def artifact(self, artifact_uri: str, path: str) -> bytes:
        """Download ``path`` under ``artifact_uri`` (``mlflow-artifacts:/...``, as the server gives
        a run or logged model) through the server's artifact proxy."""
        import requests

        scheme = "mlflow-artifacts:"
        assert artifact_uri.startswith(scheme), f"not a proxied artifact location: {artifact_uri}"
        location = artifact_uri[len(scheme) :].lstrip("/")
        if artifact_uri.startswith(scheme + "//"):  # mlflow-artifacts://host:port/path
            location = location.split("/", 1)[1]
        response = requests.get(f"{self.url}/api/2.0/mlflow-artifacts/artifacts/{location}/{path}", timeout=60)
        assert response.ok, f"{path}: HTTP {response.status_code} {response.text[:500]}"
        return response.content


@contextmanager
def running_mlflow_server(
    workdir: Path, jobs: bool = False, timeout: float = 120.0, backend_store_uri: str | None = None
) -> Iterator[MlflowServer]:
    """Run ``mlflow server`` on a free loopback port: the backend store (``backend_store_uri``,
    else SQLite under ``workdir``) and proxied artifacts under ``workdir``, in its own process
    group. Yields once ``/health`` answers; on exit stops the whole group (the server starts many
    processes) and fails if any process is left.

    ``jobs=False`` leaves out the server's job runner (about eight huey processes that run
    GenAI jobs such as trace scoring; nothing Taxonomist logs uses them) to spare the CPU."""
    import requests

    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = workdir / "server.log"
    args = [
        str(BIN / "mlflow"), "server",
        "--backend-store-uri", backend_store_uri or f"sqlite:///{workdir / 'mlflow.db'}",
        "--artifacts-destination", str(workdir / "artifacts"),
        "--host", "127.0.0.1", "--port", str(port),
        "--workers", "1",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = str(jobs).lower()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            args, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    server = MlflowServer(url=f"http://127.0.0.1:{port}", pgid=proc.pid, log=log)
    try:
        deadline = time.monotonic() + timeout
        while True:
            assert proc.poll() is None, f"mlflow server exited with {proc.returncode}:\n{log.read_text()[-4000:]}"
            try:
                if requests.get(f"{server.url}/health", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, (
                f"mlflow server not healthy after {timeout} s:\n{log.read_text()[-4000:]}"
            )
            time.sleep(0.2)
        yield server
    finally:
        left = stop_process_group(server.pgid)
        proc.wait(timeout=10)
        assert not left, f"processes of the mlflow server still alive: {left}"


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """A fresh ``mlflow server`` for the test module (empty store); stopped, all processes, after it."""
    with running_mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as server:
        yield server


# --- a real PostgreSQL server ----------------------------------------------------------------


def postgres_bin() -> Path:
    """The folder of PostgreSQL's server programs (``initdb``, ``pg_ctl``): Debian keeps them
    under ``/usr/lib/postgresql/<version>/bin`` (the newest wins), other systems on ``PATH``."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    if found:
        return found[-1].parent
    on_path = shutil.which("initdb")
    assert on_path, "PostgreSQL is not installed: run scripts/setup.sh as root (it installs Debian's postgresql)"
    return Path(on_path).parent


@contextmanager
def running_postgres(user: str = "taxonomist", database: str = "mlflow") -> Iterator[str]:
    """A throwaway PostgreSQL cluster in a fresh temporary folder, listening on a free loopback
    port (and a socket in that folder, not the system's), with ``database`` owned by ``user``
    (trust authentication: loopback only); yields its SQLAlchemy URL. Durability is off
    (``fsync``): it starts in about a second and lives as long as the block; on exit ``pg_ctl
    stop`` ends it (the test fails if it is still running) and the folder is deleted.
    PostgreSQL refuses to run as root: as root, its programs run as the ``postgres`` user
    Debian's package creates (hence a folder of its own: pytest's are private to root)."""
    import tempfile

    binaries = postgres_bin()
    workdir = Path(tempfile.mkdtemp(prefix="taxonomist-pg-"))
    data, log, port = workdir / "data", workdir / "postgres.log", free_port()
    prefix: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(workdir, "postgres")
        prefix = ["runuser", "-u", "postgres", "--"]

    def pg(*args: str) -> None:
        proc = subprocess.run([*prefix, *args], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"{args[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"

    try:
        pg(str(binaries / "initdb"), "-D", str(data), "-U", user, "--auth=trust", "-E", "UTF8", "--no-sync")
        options = f"-p {port} -k {workdir} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off"
        pg(str(binaries / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60", "-o", options, "start")
        try:
            pg(str(binaries / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", user, database)
            yield f"postgresql://{user}@127.0.0.1:{port}/{database}"
        finally:
            pg(str(binaries / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "-t", "60", "stop")
            assert not (data / "postmaster.pid").exists(), f"PostgreSQL still running:\n{log.read_text()[-2000:]}"
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# --- a real SSH/SFTP server ------------------------------------------------------------------


@dataclass(frozen=True)
class SshServer:
    """A running ``sshd`` on loopback: where it listens, who may log in and with which key."""

    port: int
    user: str
    key: Path  # the client's private key (its public half is the only authorised key)
    home: Path  # a HOME whose ~/.ssh/known_hosts trusts this server's host key, and nothing else

    def url(self, path: Path) -> str:
        """``ssh://user@127.0.0.1:port/path``, as DVC takes a remote."""
        return f"ssh://{self.user}@127.0.0.1:{self.port}{path}"


@contextmanager
def running_sshd(timeout: float = 30.0) -> Iterator[SshServer]:
    """OpenSSH's ``sshd`` (Debian's ``openssh-server``, installed by ``scripts/setup.sh``) on a
    free loopback port with a throwaway host key, a config of its own and one authorised client
    key (no passwords), in its own process group; stopped, and its folder deleted, on exit."""
    import getpass
    import tempfile

    sshd = shutil.which("sshd") or "/usr/sbin/sshd"
    assert Path(sshd).is_file(), "sshd is not installed: run scripts/setup.sh as root (it installs openssh-server)"
    folder = Path(tempfile.mkdtemp(prefix="taxonomist-sshd-"))
    port = free_port()
    for name in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / name)], check=True)
    shutil.copy(folder / "client_key.pub", folder / "authorized_keys")
    (folder / "sshd_config").write_text(
        "\n".join(
            [
                f"Port {port}",
                "ListenAddress 127.0.0.1",
                f"HostKey {folder / 'host_key'}",
                f"AuthorizedKeysFile {folder / 'authorized_keys'}",
                f"PidFile {folder / 'sshd.pid'}",
                "PubkeyAuthentication yes",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "PermitRootLogin prohibit-password",
                "StrictModes no",
                "UsePAM no",
                "Subsystem sftp internal-sftp",
                "",
            ]
        )
    )
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # its privilege-separation folder
    log = folder / "sshd.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sshd, "-D", "-e", "-f", str(folder / "sshd_config")], stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + timeout
        while True:
            assert proc.poll() is None, f"sshd exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                    if sock.recv(4).startswith(b"SSH-"):
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"sshd not answering after {timeout} s:\n{log.read_text()[-3000:]}"
            time.sleep(0.1)
        home = folder / "home"
        (home / ".ssh").mkdir(parents=True)
        host_key = (folder / "host_key.pub").read_text().split()
        (home / ".ssh" / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_key[0]} {host_key[1]}\n")
        yield SshServer(port=port, user=getpass.getuser(), key=folder / "client_key", home=home)
    finally:
        left = stop_process_group(proc.pid)
        proc.wait(timeout=10)
        shutil.rmtree(folder, ignore_errors=True)
        assert not left, f"sshd processes still alive: {left}"
