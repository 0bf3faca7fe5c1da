"""``taxonomist``: run a pipeline stage with ``params.yaml``, recompose it, or predict.

Examples::

    taxonomist compose                      # conf/ -> params.yaml
    taxonomist compose model.name=resnet34  # with Hydra overrides
    taxonomist pipelines                    # conf/pipeline/* -> pipelines/<name>/{params,dvc}.yaml
    taxonomist check                        # fail if params.yaml or pipelines/ drift from conf/
    taxonomist train                        # one stage (what dvc.yaml runs)
    taxonomist cv                           # k-fold cross-validation (section cv) -> reports/cv
    taxonomist label-errors                 # cleanlab on the out-of-fold probabilities -> reports/label_errors
    taxonomist predict img1.png img2.jpg    # with models:/<name>@champion
    taxonomist predict photos/ -o out.csv   # a folder into a CSV (rerun: resumes)
    taxonomist explain img1.png photos/     # heatmap overlays of models/best.ckpt into reports/explain
    taxonomist sweep optimizer.lr=1e-3,3e-3 # Hydra multirun: a grid, or hparams_search=optuna
    taxonomist cluster photos/              # group unlabelled images into reports/clusters/
    taxonomist suggest pool/ --budget 50    # what to label next, into reports/suggest/
    taxonomist push                         # dvc push to the default remote (checked first)
    taxonomist pull                         # dvc pull from it (then `dvc repro` reruns nothing)

Output: Taxonomist's own progress and results go to the console; what the libraries log
(ONNX optimiser passes, MLflow notes, Lightning's set-up lines) and Python warnings go to
``logs/taxonomist.log`` (``TAXONOMIST_LOG_FILE`` moves it); ``--verbose`` shows them all on
the console too. A problem the user can fix (:class:`~taxonomist.errors.TaxonomistError`)
prints ``error: <message>`` and exits with code 2; ``--debug`` (or ``TAXONOMIST_DEBUG=1``)
shows its traceback instead. The log file always gets the traceback.

Heavy libraries are imported only by the command that needs them.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import json
import logging
import logging.handlers
import os
import sys
from collections.abc import Callable
from pathlib import Path

from taxonomist.config import PARAMS_FILE, compose, load_params, to_yaml, write_params
from taxonomist.errors import DataError, RegistryError, TaxonomistError
from taxonomist.stages import STAGES
from taxonomist.stages.paths import MODELS_DIR

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

log = logging.getLogger(__name__)
LOG_FILE = Path("logs") / "taxonomist.log"
LOG_FILE_ENV = "TAXONOMIST_LOG_FILE"
DEBUG_ENV = "TAXONOMIST_DEBUG"
GLOBAL_FLAGS = {"--debug": "debug", "--verbose": "verbose", "-v": "verbose"}
OWN_LOGGERS = ("taxonomist", "__main__")
# Library loggers that log to the file only, even at WARNING: Python warnings (MLflow's schema
# hints, deprecations) repeat in every run.
FILE_ONLY_LOGGERS = ("py.warnings",)
# Library warnings every package run repeats, with nothing for the user to do: file only.
# (logger, part of the message)
KNOWN_CHATTER = (
    ("mlflow.pyfunc", "Passing a Python object as `python_model` causes it to be serialized using CloudPickle"),
    ("mlflow.utils.environment", "Failed to resolve installed pip version"),
    ("mlflow.utils.requirements_utils", "contains a local version label"),  # torch 2.x+cpu
)
_FORMAT = "%(levelname)s %(name)s: %(message)s"


class _ConsoleFilter(logging.Filter):
    """Taxonomist's own records from INFO up; other libraries' from WARNING up, except
    ``FILE_ONLY_LOGGERS`` and ``KNOWN_CHATTER``."""

    def filter(self, record: logging.LogRecord) -> bool:
        name = record.name
        if any(name == own or name.startswith(own + ".") for own in OWN_LOGGERS):
            return record.levelno >= logging.INFO
        if any(name == quiet or name.startswith(quiet + ".") for quiet in FILE_ONLY_LOGGERS):
            return False
        if any(name == logger and text in record.getMessage() for logger, text in KNOWN_CHATTER):
            return False
        return record.levelno >= logging.WARNING


def setup_logging(verbose: bool = False, log_file: Path | None = None) -> Path | None:
    """Route log records: Taxonomist's progress (INFO) and libraries' warnings to stderr, and
    everything (libraries' INFO, Python warnings, Taxonomist's DEBUG) to ``log_file``.

    ``log_file`` defaults to ``$TAXONOMIST_LOG_FILE`` or ``logs/taxonomist.log`` (relative to the
    working directory, where ``params.yaml`` is); if it cannot be created, nothing is logged to a
    file. With ``verbose`` the console gets everything the file gets. Calling it again replaces
    the handlers it installed before. Returns the log file used (None: none).
    """
    # Let MLflow's records propagate here instead of to its own stderr handler (read at `import mlflow`);
    # if mlflow was imported first and installed that handler, take it away.
    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
    # Lightning installs its own stderr handler too ("GPU available: False", tips): route both through ours.
    for name in ("mlflow", "lightning.pytorch", "lightning.fabric"):
        library = logging.getLogger(name)
        for handler in list(library.handlers):
            library.removeHandler(handler)
        library.propagate = True
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_taxonomist", False)]:
        root.removeHandler(handler)
        handler.close()
    root.setLevel(logging.INFO)
    logging.getLogger("taxonomist").setLevel(logging.DEBUG)
    logging.captureWarnings(True)

    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter(_FORMAT))
    if verbose:
        console.setLevel(logging.INFO)
    else:
        console.addFilter(_ConsoleFilter())
    handlers: list[logging.Handler] = [console]

    path = Path(log_file or os.environ.get(LOG_FILE_ENV) or LOG_FILE)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        to_file = logging.handlers.RotatingFileHandler(path, maxBytes=10 * 1024**2, backupCount=2, encoding="utf-8")
    except OSError:
        path = None  # a read-only folder: console only
    else:
        to_file.setLevel(logging.DEBUG)
        to_file.setFormatter(logging.Formatter("%(asctime)s " + _FORMAT))
        handlers.append(to_file)
    for handler in handlers:
        handler._taxonomist = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    return path


def _global_flags(argv: list[str]) -> tuple[dict[str, bool], list[str]]:
    """Take ``--debug`` and ``--verbose``/``-v`` from the front of ``argv`` (before the command)."""
    flags = {"debug": os.environ.get(DEBUG_ENV, "") not in ("", "0", "false"), "verbose": False}
    rest = list(argv)
    while rest and rest[0] in GLOBAL_FLAGS:
        flags[GLOBAL_FLAGS[rest.pop(0)]] = True
    return flags, rest


def _add_output_flags(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument("--debug", action="store_true", default=default, help="show tracebacks of errors")
    parser.add_argument(
        "-v", "--verbose", action="store_true", default=default, help="show the libraries' log on the console too"
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="taxonomist", description=__doc__.split("\n")[0])
    _add_output_flags(parser, False)
    # The same flags after the command; SUPPRESS keeps a sub-command from resetting them.
    common = argparse.ArgumentParser(add_help=False)
    _add_output_flags(common, argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    for stage in STAGES:
        p = sub.add_parser(stage, parents=[common], help=f"run the {stage} stage with {PARAMS_FILE}")
        p.add_argument("--params", default=PARAMS_FILE, help="params file (default: %(default)s)")
    p = sub.add_parser("compose", parents=[common], help=f"compose conf/ (with Hydra overrides) into {PARAMS_FILE}")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model.name=resnet34")
    p.add_argument("--conf", default="conf", help="config folder (default: %(default)s)")
    p.add_argument("--output", default=PARAMS_FILE, help="file to write (default: %(default)s)")
    p = sub.add_parser(
        "pipelines", parents=[common], help="write params.yaml and dvc.yaml of every ready pipeline under pipelines/"
    )
    p.add_argument("--conf", default="conf")
    for command, direction in (("push", "to"), ("pull", "from")):
        p = sub.add_parser(
            command,
            parents=[common],
            help=f"dvc {command}: data, processed cache and models {direction} the DVC remote (checked first)",
        )
        p.add_argument("-r", "--remote", default=None, help="remote name (default: the default remote)")
        p.add_argument("targets", nargs="*", help="DVC outputs or stages (default: all)")
    p = sub.add_parser(
        "check", parents=[common], help=f"fail if {PARAMS_FILE} or pipelines/ differ from the composition of conf/"
    )
    p.add_argument("--conf", default="conf")
    p.add_argument("--params", default=PARAMS_FILE)
    p = sub.add_parser(
        "cv",
        parents=[common],
        help="k-fold cross-validation over the training pool (config section cv): reports/cv/, MLflow child runs",
    )
    p.add_argument("--params", default=PARAMS_FILE, help="params file (default: %(default)s)")
    p = sub.add_parser(
        "label-errors",
        parents=[common],
        help="likely mislabelled training images (cleanlab on reports/cv/oof.npz): reports/label_errors/",
    )
    p.add_argument("--params", default=PARAMS_FILE, help="params file (default: %(default)s)")
    sub.add_parser(
        "sweep",
        help="Hydra multirun of train + evaluate: a grid (a=1,2) or hparams_search=<name>; "
        "each trial an MLflow child run (see `taxonomist sweep --help`)",
        add_help=False,
    )
    p = sub.add_parser(
        "predict",
        parents=[common],
        help="classify images (files, folders, globs, manifests, archives, list files) with a packaged model",
    )
    p.add_argument(
        "images", nargs="+", help="image files, folders, quoted globs, .csv/.parquet manifests, archives, .txt lists"
    )
    p.add_argument(
        "--model",
        default=None,
        help="models:/<name>@<alias>, models:/<name>/<version> or a dist/ folder (default: models:/<name>@champion)",
    )
    p.add_argument("--output", "-o", type=Path, default=None, help="rows into this .csv/.parquet/.jsonl (resumable)")
    p.add_argument("--format", choices=("csv", "parquet", "jsonl"), default=None, help="default: --output's suffix")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=3, help="labels with probabilities per row (default: %(default)s)")
    p.add_argument("--probs", action="store_true", help="add every output's probability (prob_<name> columns)")
    p.add_argument("--overwrite", action="store_true", help="replace --output instead of resuming it")
    p.add_argument("--params", default=PARAMS_FILE)
    p = sub.add_parser(
        "explain",
        parents=[common],
        help="heatmaps of where the trained model looked (Grad-CAM for CNNs, integrated gradients for ViTs)",
    )
    p.add_argument("images", nargs="+", help="image files, folders, quoted globs, manifests, archives, .txt lists")
    p.add_argument(
        "--checkpoint", type=Path, default=MODELS_DIR / "best.ckpt", help="training checkpoint (default: %(default)s)"
    )
    p.add_argument(
        "--out", type=Path, default=Path("reports/explain"), help="folder of <stem>.png overlays (default: %(default)s)"
    )
    p.add_argument("--target", default=None, help="explain this label (default: each image's predicted label)")
    p.add_argument("--batch-size", type=int, default=16, help="images per batch (default: %(default)s)")
    p = sub.add_parser(
        "cluster",
        parents=[common],
        help="group (unlabelled) images by their embeddings (k-means or a Gaussian mixture) into reports/clusters",
    )
    p.add_argument("images", nargs="+", help="image files, folders, quoted globs, manifests, archives, .txt lists")
    p.add_argument("--out", type=Path, default=Path("reports/clusters"), help="report folder (default: %(default)s)")
    p.add_argument("--features", default=None, help="cluster.features: a conf/model/features/ name, or model")
    p.add_argument("--method", choices=("kmeans", "gmm"), default=None, help="cluster.method")
    p.add_argument("-k", default=None, help="cluster.k: an integer, or auto")
    p.add_argument(
        "--checkpoint", type=Path, default=MODELS_DIR / "best.ckpt", help="for --features model (default: %(default)s)"
    )
    p.add_argument("--no-tracking", action="store_true", help="do not log the run to MLflow")
    p.add_argument("--conf", default="conf", help="config folder, for the feature configs (default: %(default)s)")
    p.add_argument("--params", default=PARAMS_FILE)
    p = sub.add_parser(
        "suggest",
        parents=[common],
        help="rank an unlabelled pool for labelling (uncertainty, optionally diversity): a CSV, a Label Studio file",
    )
    p.add_argument("images", nargs="+", help="the pool: image files, folders, quoted globs, manifests, archives, lists")
    p.add_argument(
        "--checkpoint", type=Path, default=MODELS_DIR / "best.ckpt", help="trained model (default: %(default)s)"
    )
    p.add_argument("--budget", type=int, default=None, help="images to suggest (default: suggest.budget)")
    p.add_argument("--out", type=Path, default=Path("reports/suggest"), help="output folder (default: %(default)s)")
    p.add_argument("--no-tracking", action="store_true", help="do not log the run to MLflow")
    p.add_argument(
        "--processed",
        type=Path,
        default=Path("data/processed"),
        help="the training data's split table, to leave out pool images already in it (default: %(default)s)",
    )
    p.add_argument("--params", default=PARAMS_FILE)
    p = sub.add_parser(
        "serve", parents=[common], help="serve a registered model over HTTP (MLflow's server, with request guards)"
    )
    p.add_argument("--model", default=None, help="model URI or MLflow model folder (default: models:/<name>@champion)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=5001, help="port (default: %(default)s)")
    p.add_argument("--max-body-mb", type=float, default=None, help="largest request body (default: from the model)")
    p.add_argument("--concurrency", type=int, default=None, help="requests handled at once (default: the cores)")
    p.add_argument("--params", default=PARAMS_FILE)
    return parser


def _reported(run: Callable[[], int], debug: bool) -> int:
    """Run a command; a :class:`TaxonomistError` prints ``error: <message>`` and gives 2 (with
    ``debug``: raised, with its traceback), and so does a full disk (one line, whatever stage
    it stopped). Other exceptions are bugs and keep their traceback."""
    try:
        return run()
    except TaxonomistError as err:
        log.debug("%s: %s", type(err).__name__, err, exc_info=True)  # the traceback, in the log file
        if debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        log.debug("%s", err, exc_info=True)
        if debug:
            raise
        where = f" writing {err.filename}" if err.filename else ""
        print(
            f"error: no space left on the device{where}: free some space and run again (a stage builds its "
            "output beside the previous one, which stays as it was until the new one is complete)",
            file=sys.stderr,
        )
        return 2


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``taxonomist`` command."""
    flags, argv = _global_flags(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["sweep"]:  # Hydra parses the rest: overrides, -m, --cfg job, hydra/launcher=joblib ...
        from taxonomist.sweeps.launch import main as sweep_main

        return _reported(lambda: sweep_main(argv[1:]), flags["debug"])
    args = _parser().parse_args(argv)
    debug = flags["debug"] or args.debug
    setup_logging(verbose=flags["verbose"] or args.verbose)
    return _reported(lambda: _run(args), debug)


def _run(args: argparse.Namespace) -> int:
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
    if args.command in ("push", "pull"):
        from taxonomist.remote import transfer

        return transfer(args.command, args.remote, args.targets)
    if args.command == "predict":
        return _predict(args)
    if args.command == "serve":
        return _serve(args)
    if args.command == "explain":
        return _explain(args)
    if args.command in ("cv", "label-errors"):
        module = "taxonomist.crossval." + ("run" if args.command == "cv" else "label_errors")
        result = importlib.import_module(module).run(load_params(args.params))
        print(json.dumps(result, indent=2, default=str))
        return 0
    if args.command == "cluster":
        return _cluster(args)
    if args.command == "suggest":
        return _suggest(args)
    cfg = load_params(args.params)
    stage = importlib.import_module(f"taxonomist.stages.{args.command}")
    result = stage.run(cfg)
    print(json.dumps(result, indent=2, default=str))
    return 0


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


def _model_uri(given: str | None, params: str) -> str:
    """``given``, or the champion of the project's registered model; for a ``models:/`` URI the
    project's MLflow store (``params``) is put in force."""
    from taxonomist.export.registry import model_name
    from taxonomist.tracking.runs import tracking_uri, use_store

    if given is not None and not given.startswith("models:/"):
        return given
    if not Path(params).is_file():
        raise RegistryError(f"{params} not found: give --model (a models:/ URI needs the project's MLflow store)")
    cfg = load_params(params)
    use_store(tracking_uri(cfg))
    return given or f"models:/{model_name(cfg)}@champion"


def _serve(args: argparse.Namespace) -> int:
    from mlflow.exceptions import MlflowException

    from taxonomist.export.registry import resolve_version
    from taxonomist.export.server import serve

    uri = _model_uri(args.model, args.params)
    if uri.startswith("models:/"):
        from mlflow import MlflowClient

        resolve_version(MlflowClient(), uri)  # a missing model or alias: one line naming what exists
    print(f"loading {uri}; then serving it on http://{args.host}:{args.port}/invocations (Ctrl-C stops)", flush=True)
    try:
        serve(uri, args.host, args.port, args.max_body_mb, args.concurrency)
    except MlflowException as err:
        raise RegistryError(f"cannot load {uri}: {err.message}") from None
    return 0


def _predict(args: argparse.Namespace) -> int:
    import tempfile

    from taxonomist.export.registry import load_model
    from taxonomist.predict.batch import batches, classify_batch, predict_to_file
    from taxonomist.predict.inputs import ImageReader, expand
    from taxonomist.predict.outputs import output_format
    from taxonomist.tasks.uncertainty import unsure_text

    keys = expand(args.images)
    uri = _model_uri(args.model, args.params)
    with tempfile.TemporaryDirectory(prefix="taxonomist-predict-") as tmp:
        model, identity = load_model(uri, Path(tmp))
    log.info("%s: %d image(s) to classify with %s", " ".join(args.images), len(keys), identity["model"])
    if args.output is not None:
        fmt = output_format(args.output, args.format)
        summary = predict_to_file(
            model, identity, keys, args.output, fmt, args.batch_size, args.top_k, args.probs, args.overwrite
        )
        rate = f" ({summary['images_per_second']} images/s)" if summary["images_per_second"] else ""
        resumed = f", {summary['resumed_from']} from an earlier run" if summary["resumed_from"] else ""
        print(
            f"{args.output}: {summary['images']} image(s), {summary['classified_now']} classified now{rate}, "
            f"{summary['errors_now']} with an error{resumed}"
        )
        return 0
    with ImageReader(max_bytes=int(model.limits.max_request_mb * 1e6)) as reader:
        for batch in batches(keys, max(1, args.batch_size)):
            rows = classify_batch(model, reader, batch, args.top_k)
            for _, row in rows.iterrows():
                answer = f"error: {row.error}" if row.error else model.task.answer_text(row) + unsure_text(row)
                print(f"{row['path']}\t{answer}")
    return 0


def _explain(args: argparse.Namespace) -> int:
    """``taxonomist explain``: one ``<out>/<stem>.png`` (image | heatmap overlay) and one line
    (path, label, score, method, file) per image; an image that cannot be read or decoded gets
    ``<path>\terror: <why>`` and the others go on. Exit code 1 when any image failed."""
    import numpy as np
    import torch
    from PIL import Image
    from tqdm import tqdm

    from taxonomist.data.images import ImageSpec, InvalidImage, decode
    from taxonomist.data.transforms import normalise, preprocess_settings
    from taxonomist.evaluation.explain import explain_images, output_names, output_scores, side_by_side
    from taxonomist.models.inference import load_classifier
    from taxonomist.predict.inputs import ImageReader, expand

    classifier = load_classifier(args.checkpoint)
    names = output_names(classifier.task)
    target = None
    if args.target is not None:
        if args.target not in names:
            raise DataError(f"--target {args.target!r} is not one of the model's outputs: {', '.join(names)}")
        target = names.index(args.target)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    classifier.to(device)
    pre = preprocess_settings(classifier.cfg)
    spec = ImageSpec(pre["image_size"], pre["channels"], pre["resize_mode"])
    failed = 0
    found: dict[str, None] = {}
    for arg in args.images:  # an argument that names nothing is one error line, like an unreadable image
        try:
            found.update(dict.fromkeys(expand([arg])))
        except DataError as err:
            print(f"{arg}\terror: {err}")
            failed += 1
    keys = list(found)
    args.out.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    size = max(1, args.batch_size)
    with ImageReader() as reader, tqdm(total=len(keys), desc="explain", unit="img", disable=len(keys) < 8) as bar:
        for start in range(0, len(keys), size):
            lines: dict[str, str] = {}  # printed in the order of the keys
            batch_keys, images = [], []
            for key in keys[start : start + size]:
                try:
                    images.append(decode(reader.read(key), spec))
                    batch_keys.append(key)
                except InvalidImage as err:
                    lines[key] = f"{key}\terror: {err}"
                except OSError as err:
                    lines[key] = f"{key}\terror: cannot read: {err}"
            failed += len(lines)
            if images:
                stack = np.stack(images)
                with torch.no_grad():
                    logits = classifier(torch.from_numpy(normalise(stack, pre["mean"], pre["std"])).to(device))
                logits = logits.float().cpu().numpy()
                units = logits.argmax(axis=1) if target is None else np.full(len(logits), target)
                scores = output_scores(classifier.task, logits)
                maps, method = explain_images(classifier, stack, pre["mean"], pre["std"], units.tolist())
                for k, key in enumerate(batch_keys):
                    path = args.out / f"{_unique_stem(key, used)}.png"
                    Image.fromarray(side_by_side(stack[k], maps[k])).save(path)
                    unit = int(units[k])
                    lines[key] = f"{key}\t{names[unit]}\t{scores[k, unit]:.4f}\t{method}\t{path}"
            for key in keys[start : start + size]:
                tqdm.write(lines[key])
            bar.update(len(keys[start : start + size]))
    return 1 if failed else 0


def _cluster(args: argparse.Namespace) -> int:
    """``taxonomist cluster``: :mod:`taxonomist.explore.cluster` with params.yaml's ``cluster`` section."""
    from omegaconf import OmegaConf

    from taxonomist.config import validate
    from taxonomist.explore.cluster import run

    cfg = load_params(args.params)
    changes = {"features": args.features, "method": args.method, "k": args.k}
    changes = {key: value for key, value in changes.items() if value is not None}
    if "k" in changes and changes["k"] != "auto":
        try:
            changes["k"] = int(changes["k"])
        except ValueError:
            raise DataError(f"-k {changes['k']}: an integer, or auto") from None
    if changes:
        cfg = validate(OmegaConf.merge(cfg, {"cluster": changes}), origin="the command line")
    summary = run(list(args.images), cfg, args.out, args.checkpoint, args.conf, track=not args.no_tracking)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def _suggest(args: argparse.Namespace) -> int:
    """``taxonomist suggest``: :mod:`taxonomist.explore.suggest` with params.yaml's ``suggest`` section."""
    from taxonomist.explore.suggest import run

    cfg = load_params(args.params)
    budget = int(cfg.suggest.budget) if args.budget is None else args.budget
    if budget < 1:
        raise DataError(f"--budget {budget}: suggest at least one image")
    summary = run(list(args.images), cfg, args.checkpoint, budget, args.out, args.processed, track=not args.no_tracking)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def _unique_stem(key: str, used: set[str]) -> str:
    """The file stem of ``key`` (an archive member's own name), made unique with -2, -3, ..."""
    stem = Path(key.replace(":", "/")).stem or "image"
    name, n = stem, 1
    while name in used:
        n += 1
        name = f"{stem}-{n}"
    used.add(name)
    return name


if __name__ == "__main__":
    sys.exit(main())
