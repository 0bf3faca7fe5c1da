#!/usr/bin/env bash
# Set up everything Taxonomist needs on a fresh clone: Debian's Fashion-MNIST, Chromium, PostgreSQL, SLURM,
# MUNGE and OpenSSH server packages (when root and missing), uv, and the locked Python environment in .venv.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
        echo "==> installing dataset-fashion-mnist with apt-get"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist
    else
        echo "==> dataset-fashion-mnist is not installed and this is not root: the ingest stage" \
             "will download Fashion-MNIST instead (or run: sudo apt-get install dataset-fashion-mnist)"
    fi
fi

# The emoji sets (data=emoji_tags, data=emoji_categories) read the npm packages pinned in
# package.json / package-lock.json from node_modules.
if [ ! -f node_modules/emoji-datasource-google/emoji.json ] || [ ! -f node_modules/openmoji/data/openmoji.csv ]; then
    if ! command -v npm >/dev/null 2>&1 && [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
        echo "==> installing npm with apt-get"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq npm
    fi
    if command -v npm >/dev/null 2>&1; then
        echo "==> installing the emoji datasets (npm ci)"
        npm ci --no-audit --no-fund --loglevel=error
    else
        echo "==> npm is not installed and this is not root: the emoji pipelines (data=emoji_tags," \
             "data=emoji_categories) need it (install npm, e.g. sudo apt-get install npm, and run this again)"
    fi
fi

# The browser test (tests/test_mlflow_server.py: the MLflow UI's run comparison) drives
# Debian's Chromium through playwright.
if [ ! -x /usr/bin/chromium ]; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
        echo "==> installing chromium with apt-get (for the browser test)"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium fonts-liberation
    else
        echo "==> chromium is not installed and this is not root: the browser test needs /usr/bin/chromium" \
             "(sudo apt-get install chromium)"
    fi
fi

# The shared-tracking-server test (tests/test_mlflow_postgres.py) starts its own PostgreSQL
# cluster on loopback with Debian's server programs (no system cluster is started or needed).
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null 2>&1; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
        echo "==> installing postgresql with apt-get (for the tracking-server test)"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql
    else
        echo "==> PostgreSQL is not installed and this is not root: the tracking-server test needs it" \
             "(sudo apt-get install postgresql)"
    fi
fi

# The SLURM test (tests/test_slurm.py) brings up a one-node cluster with scripts/local_slurm.py
# from Debian's slurm-wlm and munge (no system daemon is started or configured).
if ! command -v slurmctld >/dev/null 2>&1 || ! command -v munged >/dev/null 2>&1 || ! command -v ip >/dev/null 2>&1; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
        echo "==> installing slurm-wlm and munge with apt-get (for the SLURM test)"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge iproute2
    else
        echo "==> SLURM is not installed and this is not root: the SLURM test needs slurm-wlm and munge" \
             "(sudo apt-get install slurm-wlm munge)"
    fi
fi

# The SSH remote test (tests/test_dvc_remote.py) starts OpenSSH's sshd on loopback with a config
# and keys of its own (the system's sshd is not started or configured).
if [ ! -x /usr/sbin/sshd ] || ! command -v ssh-keygen >/dev/null 2>&1; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
        echo "==> installing openssh-server with apt-get (for the SSH remote test)"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends openssh-server openssh-client
    else
        echo "==> sshd is not installed and this is not root: the SSH remote test needs it" \
             "(sudo apt-get install openssh-server)"
    fi
fi

if ! command -v uv >/dev/null 2>&1; then
    echo "==> installing uv"
    python3 -m pip install --quiet uv
fi
export UV_PYTHON_DOWNLOADS=never
echo "==> syncing the locked environment (.venv)"
# Bytecode is compiled once here: without it every stage, test and command compiles torch,
# MLflow and the rest from source on start-up (uv does not by default; PYTHONDONTWRITEBYTECODE
# environments never cache it), which cost 20-30 s per stage on 2 cores.
uv sync --frozen --python python3.11 --compile-bytecode
