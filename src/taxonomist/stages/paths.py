"""Where each stage reads and writes, relative to the folder the pipeline runs in.

The one place these paths are written in code; ``dvc.yaml`` lists the same paths as each
stage's deps and outs.
"""

from pathlib import Path

RAW_DIR = Path("data/raw")  # ingest -> preprocess
PROCESSED_DIR = Path("data/processed")  # preprocess -> train, evaluate, package
HEALTH_DIR = Path("reports/data")  # preprocess: the data set health report (-> train logs it to MLflow)
MODELS_DIR = Path("models")  # train -> evaluate, package (best.ckpt, labels.json, run.json)
# train's resume state (last epoch's checkpoint, best so far, the MLflow run): outside the DVC
# outs, which DVC deletes before it reruns a stage; gitignored; deleted when the stage finishes
RESUME_DIR = Path(".taxonomist/resume/train")
HISTORY_FILE = Path("reports/train_history.csv")  # train -> evaluate's plots, dvc plots
REPORTS_DIR = Path("reports/eval")  # evaluate -> package
METRICS_FILE = Path("reports/metrics.json")  # evaluate -> package, dvc metrics
DECISION_FILE = "decision.json"  # in REPORTS_DIR: the tuned decision the package ships
DIST_DIR = Path("dist")  # package


def health_dir_for(processed_dir: Path) -> Path:
    """Where the health report of ``processed_dir`` goes: :data:`HEALTH_DIR` for the pipeline's
    own ``data/processed``, else a ``health/`` folder beside it (sweeps, tests)."""
    return HEALTH_DIR if Path(processed_dir) == PROCESSED_DIR else Path(processed_dir).parent / "health"
