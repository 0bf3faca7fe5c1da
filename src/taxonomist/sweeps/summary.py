"""The end of a sweep: a table of its trials, a plot, and the best trial on the parent run.

Files go to ``sweeps/<name>/`` (``summary.csv``, ``summary.md``, ``summary.png``) and to the
parent run's ``sweep/`` artifacts. The parent gets the best trial's swept values as params
``best.<key>``, its objective and test metrics as ``best/<metric>``, and tags naming the run.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import DictConfig

from taxonomist.files import atomic_write_text, read_json
from taxonomist.sweeps.state import OBJECTIVE_METRIC, STATE_FILE, child_runs, pipeline_config
from taxonomist.tracking import runs
from taxonomist.tracking.redact import redact

log = logging.getLogger(__name__)
# Test metrics shown in the table, in this order, when the task logs them (the runs keep them all).
TABLE_METRICS = (
    "test/f1_macro",
    "test/acc",
    "test/f1",
    "test/precision",
    "test/recall",
    "test/auroc",
    "test/f1_micro",
    "test/ap_macro",
    "test/subset_acc",
    "test/hf1",
    "test/acc_level1",
)
TEST_COLUMNS = 4


def trials_table(children: list[Any], swept: list[str], objective: str) -> pd.DataFrame:
    """One row per finished trial: number, run, swept values, objective, top-level test metrics."""

    rows = []
    for run in children:
        metrics = run.data.metrics
        if run.info.status != "FINISHED" or OBJECTIVE_METRIC not in metrics:
            continue
        values = json.loads(run.data.tags.get("sweep.overrides", "{}"))
        row: dict[str, Any] = {"trial": int(run.data.tags.get("sweep.trial", -1)), "run": run.info.run_name}
        row.update({k: values.get(k, "") for k in swept})
        row[objective] = metrics[OBJECTIVE_METRIC]
        tests = [k for k in TABLE_METRICS if k in metrics]
        row.update({k: metrics[k] for k in tests[:TEST_COLUMNS]})
        row["run_id"] = run.info.run_id
        rows.append(row)
    return pd.DataFrame(rows)


def numeric(values: pd.Series) -> pd.Series | None:
    """``values`` as floats, or None when any is not a number."""
    converted = pd.to_numeric(values, errors="coerce")
    return None if converted.isna().any() else converted


def plot(table: pd.DataFrame, swept: list[str], objective: str, maximize: bool, title: str, out: Path) -> Path:
    """Objective per trial, and objective against each swept key (log axis for wide ranges)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels = 1 + len(swept)
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.4), squeeze=False)
    ax = axes[0][0]
    ax.plot(table["trial"], table[objective], "o", color="tab:blue")
    best = table[objective].cummax() if maximize else table[objective].cummin()
    ax.step(table["trial"], best, where="post", color="tab:orange", label="best so far")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("trial")
    ax.set_ylabel(objective)
    ax.legend(loc="lower right", fontsize=8)
    for ax, key in zip(axes[0][1:], swept, strict=True):
        values = numeric(table[key])
        if values is not None:
            ax.plot(values, table[objective], "o")
            positive = values[values > 0]
            if len(positive) == len(values) and positive.max() / positive.min() > 20:
                ax.set_xscale("log")
        else:
            labels = table[key].astype(str)
            order = sorted(labels.unique())
            ax.plot([order.index(v) for v in labels], table[objective], "o")
            ax.set_xticks(range(len(order)), order, rotation=20, fontsize=8)
        ax.set_xlabel(key)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def summarise(config: DictConfig, root: Path, parent_run_id: str) -> pd.DataFrame:
    """Write the sweep summary, log it and the best trial to the parent run, close the parent."""
    import mlflow

    sweep_dir = root / str(config.hydra.sweep.dir)
    state = read_json(sweep_dir / STATE_FILE)
    cfg = pipeline_config(config, root)
    experiment_id = runs.setup(cfg)
    client = mlflow.MlflowClient()
    objective, swept, maximize = state["objective"], state["swept"], state["direction"] == "maximize"
    table = trials_table(child_runs(client, experiment_id, parent_run_id), swept, objective)
    if table.empty:
        log.warning("sweep %s: no trial finished", state["name"])
        client.set_terminated(parent_run_id, status="FAILED")
        return table
    table = table.sort_values(objective, ascending=not maximize, kind="stable").reset_index(drop=True)
    best = table.iloc[0]
    shown = table.drop(columns=["run_id"])
    atomic_write_text(sweep_dir / "summary.csv", shown.to_csv(index=False))
    markdown = shown.to_markdown(index=False, floatfmt=".4f")
    atomic_write_text(sweep_dir / "summary.md", markdown + "\n")
    title = f"sweep {state['name']}: {objective} ({state['direction']}), {len(table)} trials"
    plot(table.sort_values("trial"), swept, objective, maximize, title, sweep_dir / "summary.png")
    for name in ("summary.csv", "summary.md", "summary.png"):
        client.log_artifact(parent_run_id, str(sweep_dir / name), artifact_path="sweep")

    from mlflow.entities import Metric, Param

    # Params cannot change: a sweep extended later keeps its first best.* params; the tags follow the best.
    existing = client.get_run(parent_run_id).data.params
    params = [Param(f"best.{k}", redact(best[k])) for k in swept if f"best.{k}" not in existing]
    for k in swept:
        client.set_tag(parent_run_id, f"best.{k}", redact(best[k]))
    best_metrics = {objective: float(best[objective])}
    best_metrics.update({k: float(best[k]) for k in table.columns if k.startswith("test/") and not _nan(best[k])})
    now = _now_ms()
    metrics = [Metric(runs.metric_name(f"best/{k}"), v, now, len(table)) for k, v in best_metrics.items()]
    metrics.append(Metric("sweep/trials", float(len(table)), now, len(table)))
    client.log_batch(parent_run_id, metrics=metrics, params=params)
    client.set_tag(parent_run_id, "best_run_id", str(best["run_id"]))
    client.set_tag(parent_run_id, "best_run_name", str(best["run"]))
    client.set_terminated(parent_run_id, status="FINISHED")
    log.info("sweep %s: best %s = %.4f in %s\n%s", state["name"], objective, best[objective], best["run"], markdown)
    return table


def _nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)
