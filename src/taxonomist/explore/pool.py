"""Images named on the command line, decoded to one size, their labels when they carry any, and
their embeddings.

* :func:`read_pool`: the keys :func:`taxonomist.predict.inputs.expand` finds (folders, globs,
  manifests, archives, list files), each read and decoded as preprocess decodes the cache
  (:func:`taxonomist.data.images.decode` at an :class:`~taxonomist.data.images.ImageSpec`), with
  the SHA-256 of its bytes (what ``data/processed/splits.csv`` records); an image that cannot be
  read is left out with a warning.
* :func:`key_labels`: the label of each key when the images carry one: the first folder below a
  folder argument (``<folder>/<label>/<image>``), or a manifest's ``label`` column.
* :func:`named_extractor`: an extractor from ``conf/model/features/<name>.yaml``;
  :func:`model_outputs`: a trained model's features (its own extractor for ``model=embeddings``,
  a timm network's pooled pre-logits features) and logits in one pass.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn
from tqdm.auto import tqdm

from taxonomist.data.images import ImageSpec, InvalidImage, decode
from taxonomist.errors import ConfigError, DataError, ModelError
from taxonomist.files import sha256_bytes
from taxonomist.predict.inputs import ImageReader, expand

log = logging.getLogger(__name__)
FEATURES_CONF = Path("model") / "features"
MODEL_FEATURES = "model"  # cluster.features: the trained model's own features


@dataclass
class Pool:
    """Decoded images: ``keys[i]`` is ``images[i]`` (uint8, N x H x W x C) with ``sha256[i]``;
    ``failed`` maps the keys that could not be read or decoded to why."""

    keys: list[str]
    images: np.ndarray
    sha256: list[str]
    failed: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.keys)

    def subset(self, index: Sequence[int] | np.ndarray) -> Pool:
        """The images at ``index``, in that order."""
        idx = np.asarray(index, dtype=int)
        return Pool([self.keys[i] for i in idx], self.images[idx], [self.sha256[i] for i in idx], dict(self.failed))


def read_pool(args: Sequence[str], spec: ImageSpec, what: str = "images") -> Pool:
    """Read and decode every image ``args`` name (see the module docstring).

    A :class:`DataError` in one line when an argument names no images (an empty folder) or when
    none of the images can be decoded."""
    keys = expand(args)
    kept: list[str] = []
    images: list[np.ndarray] = []
    hashes: list[str] = []
    failed: dict[str, str] = {}
    with ImageReader() as reader:
        for key in tqdm(keys, desc=f"reading {what}", unit="img", disable=len(keys) < 256, leave=False):
            try:
                data = reader.read(key)
                images.append(decode(data, spec))
            except InvalidImage as err:
                failed[key] = str(err)
                continue
            except OSError as err:
                failed[key] = f"cannot read: {err}"
                continue
            kept.append(key)
            hashes.append(sha256_bytes(data))
    for key, why in list(failed.items())[:5]:
        log.warning("%s: left out (%s)", key, why)
    if len(failed) > 5:
        log.warning("... and %d more images left out", len(failed) - 5)
    if not kept:
        raise DataError(
            f"{' '.join(args)}: none of the {len(keys)} image file(s) could be read ({next(iter(failed.values()))})"
        )
    return Pool(kept, np.stack(images), hashes, failed)


def key_labels(args: Sequence[str], keys: Sequence[str]) -> list[str | None]:
    """Each key's label, None where it has none: the first folder below a folder argument
    (``<arg>/<label>/<file>``), or the ``label`` column of a CSV/Parquet manifest argument."""
    found: dict[str, str] = {}
    for arg in args:
        path = Path(arg).expanduser()
        if path.is_dir():
            root = path.resolve()
            for key in expand([arg]):
                rel = Path(key).resolve().relative_to(root)
                if len(rel.parts) >= 2:
                    found.setdefault(key, rel.parts[0])
        elif path.is_file() and path.name.lower().endswith((".csv", ".parquet", ".pq")):
            found.update({k: v for k, v in _manifest_labels(path).items() if k not in found})
    return [found.get(key) for key in keys]


def _manifest_labels(path: Path) -> dict[str, str]:
    import pandas as pd

    from taxonomist.predict.inputs import MANIFEST_COLUMNS

    if path.suffix.lower() in (".parquet", ".pq"):
        frame = pd.read_parquet(path)
    else:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    frame.columns = [str(c).strip().lower() for c in frame.columns]
    column = next((c for c in MANIFEST_COLUMNS if c in frame.columns), None)
    if column is None or "label" not in frame.columns:
        return {}
    out = {}
    for ref, label in zip(frame[column].astype(str), frame["label"].astype(str), strict=True):
        if ref.strip() and label.strip():
            p = Path(ref.strip()).expanduser()
            out[str(p if p.is_absolute() else path.parent / p)] = label.strip()
    return out


def feature_names(conf_dir: str | Path) -> list[str]:
    """The extractor configs in ``conf/model/features/``."""
    return sorted(p.stem for p in (Path(conf_dir) / FEATURES_CONF).glob("*.yaml"))


def named_extractor(name: str, conf_dir: str | Path = "conf", in_chans: int = 3) -> tuple[nn.Module, dict[str, Any]]:
    """The extractor ``conf/model/features/<name>.yaml`` describes, and its spec."""
    from taxonomist.models.embeddings.features import build_extractor

    path = Path(conf_dir) / FEATURES_CONF / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join([*feature_names(conf_dir), MODEL_FEATURES])
        raise ConfigError(f"cluster.features={name!r}: no {path}; use one of {known}")
    spec = dict((yaml.safe_load(path.read_text()) or {}).get("features") or {})
    if "name" not in spec:
        raise ConfigError(f"{path}: no features.name")
    return build_extractor(spec, in_chans), spec


def model_spec(classifier: Any) -> ImageSpec:
    """The image geometry ``classifier`` was trained on (its resolved ``preprocess`` settings)."""
    from taxonomist.data.transforms import preprocess_settings

    pre = preprocess_settings(classifier.cfg)
    return ImageSpec(pre["image_size"], pre["channels"], pre["resize_mode"])


@torch.inference_mode()
def model_outputs(classifier: Any, images: np.ndarray, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """``(features, logits)`` of uint8 ``images`` (N, H, W, C) under a trained
    :class:`~taxonomist.models.inference.Classifier`: for ``model=embeddings`` its extractor's
    features (``model.embed``) and its head's logits; for a timm network its pooled pre-logits
    features (``forward_features`` then ``forward_head(pre_logits=True)``) and its logits."""
    from taxonomist.data.transforms import normalise, preprocess_settings
    from taxonomist.models.embeddings import EmbeddingModel

    pre = preprocess_settings(classifier.cfg)
    net = classifier.model
    timm_net = hasattr(net, "forward_features") and hasattr(net, "forward_head")
    if not isinstance(net, EmbeddingModel) and not timm_net:
        raise ModelError(
            f"cannot take features from a {type(net).__name__}: an embeddings model or a timm network is needed"
        )
    feats: list[np.ndarray] = []
    logits: list[np.ndarray] = []
    total = len(images)
    with tqdm(total=total, desc="model", unit="img", disable=total < 4 * batch_size, leave=False) as bar:
        for start in range(0, total, batch_size):
            rows = np.asarray(images[start : start + batch_size])
            if isinstance(net, EmbeddingModel):
                pixels = torch.from_numpy(rows).permute(0, 3, 1, 2).float().div_(255.0)
                f = net.embed(pixels)
                out = net.head(f)
            else:
                x = torch.from_numpy(normalise(rows, pre["mean"], pre["std"]))
                if classifier.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                pooled = net.forward_features(x)
                f = net.forward_head(pooled, pre_logits=True)
                out = net.forward_head(pooled)
            feats.append(f.float().reshape(len(rows), -1).numpy())
            logits.append(out.float().reshape(len(rows), -1).numpy())
            bar.update(len(rows))
    return np.concatenate(feats), np.concatenate(logits)
