"""``taxonomist``: run a pipeline stage with ``params.yaml``, recompose it, or predict.

Examples::

    taxonomist compose                      # conf/ -> params.yaml
    taxonomist compose model.name=resnet34  # with Hydra overrides
    taxonomist pipelines                    # conf/pipeline/* -> pipelines/<name>/{params,dvc}.yaml
    taxonomist check                        # fail if params.yaml or pipelines/ drift from conf/
    taxonomist train                        # one stage (what dvc.yaml runs)
    taxonomist predict img1.png img2.jpg    # with models:/<name>@champion
    taxonomist sweep optimizer.lr=1e-3,3e-3 # Hydra multirun: a grid, or hparams_search=optuna

Heavy libraries are imported only by the command that needs them.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from pathlib import Path

from taxonomist.config import PARAMS_FILE, ConfigError, compose, load_params, to_yaml, write_params
from taxonomist.stages import STAGES

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="taxonomist", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for stage in STAGES:
        p = sub.add_parser(stage, help=f"run the {stage} stage with {PARAMS_FILE}")
        p.add_argument("--params", default=PARAMS_FILE, help="params file (default: %(default)s)")
    p = sub.add_parser("compose", help=f"compose conf/ (with Hydra overrides) into {PARAMS_FILE}")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model.name=resnet34")
    p.add_argument("--conf", default="conf", help="config folder (default: %(default)s)")
    p.add_argument("--output", default=PARAMS_FILE, help="file to write (default: %(default)s)")
    p = sub.add_parser("pipelines", help="write params.yaml and dvc.yaml of every ready pipeline under pipelines/")
    p.add_argument("--conf", default="conf")
    p = sub.add_parser("check", help=f"fail if {PARAMS_FILE} or pipelines/ differ from the composition of conf/")
    p.add_argument("--conf", default="conf")
    p.add_argument("--params", default=PARAMS_FILE)
    sub.add_parser(
        "sweep",
        help="Hydra multirun of train + evaluate: a grid (a=1,2) or hparams_search=<name>; "
        "each trial an MLflow child run (see `taxonomist sweep --help`)",
        add_help=False,
    )
    p = sub.add_parser("predict", help="classify image files with a registered model")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--model", default=None, help="model URI (default: models:/<package.model_name>@champion)")
    p.add_argument("--params", default=PARAMS_FILE)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``taxonomist`` command."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["sweep"]:  # Hydra parses the rest: overrides, -m, --cfg job, hydra/launcher=joblib ...
        from taxonomist.sweeps.launch import main as sweep_main

        try:
            return sweep_main(argv[1:])
        except ConfigError as err:
            print(f"config error: {err}", file=sys.stderr)
            return 2
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "compose":
            cfg = compose(args.overrides, conf_dir=args.conf)
            write_params(cfg, args.output)
            print(f"wrote {args.output}")
            return 0
        if args.command == "pipelines":
            from taxonomist.files import atomic_write_text
            from taxonomist.pipelines import expected_files

            for path, text in expected_files(args.conf).items():
                atomic_write_text(path, text)
                print(f"wrote {path}")
            return 0
        if args.command == "check":
            return _check(args.conf, args.params)
        cfg = load_params(args.params)
        if args.command == "predict":
            return _predict(cfg, args.images, args.model)
        stage = importlib.import_module(f"taxonomist.stages.{args.command}")
        result = stage.run(cfg)
        print(json.dumps(result, indent=2, default=str))
        return 0
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        if type(err).__name__ in {"SourceError", "SplitError", "WeightsError", "TaxonomyError", "LabelError"}:
            print(f"error: {err}", file=sys.stderr)
            return 2
        raise


def _check(conf: str, params: str) -> int:
    from taxonomist.pipelines import expected_files

    expected = to_yaml(compose([], conf_dir=conf))
    actual = Path(params).read_text() if Path(params).is_file() else ""
    if expected != actual:
        print(f"{params} differs from the composition of {conf}/: run `taxonomist compose`", file=sys.stderr)
        return 1
    stale = [str(p) for p, text in expected_files(conf).items() if not p.is_file() or p.read_text() != text]
    if stale:
        print(f"out of date: {', '.join(stale)}: run `taxonomist pipelines`", file=sys.stderr)
        return 1
    print(f"{params} and pipelines/ match {conf}/")
    return 0


def answer_text(row) -> str:
    """One line for a served answer: ``label score``, ``path score``, or ``label (p), ...``."""
    if "path" in row:
        return f"{row['path'] or '(no confident answer)'}\t{row['score']:.4f}"
    if "labels" in row:
        labels = list(row["labels"])
        if not labels:
            return "(no label)"
        return ", ".join(f"{lbl} ({row[f'prob_{lbl}']:.2f})" for lbl in labels)
    return f"{row['label']}\t{row['score']:.4f}"


def _predict(cfg, images: list[str], model_uri: str | None) -> int:
    import mlflow
    import pandas as pd

    from taxonomist.tracking.runs import tracking_uri

    missing = [p for p in images if not Path(p).is_file()]
    if missing:
        print(f"error: image file(s) not found: {', '.join(missing)}", file=sys.stderr)
        return 2
    mlflow.set_tracking_uri(tracking_uri(cfg))
    uri = model_uri or f"models:/{cfg.package.model_name}@champion"
    model = mlflow.pyfunc.load_model(uri)
    frame = pd.DataFrame({"image": [Path(p).read_bytes() for p in images]})
    result = model.predict(frame)
    for path, (_, row) in zip(images, result.iterrows(), strict=True):
        print(f"{path}\t{answer_text(row)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
