"""scikit-learn classifiers on feature vectors, and the same fitted classifiers as torch modules.

``model.classifier`` names one of :data:`CLASSIFIERS`:

- ``logistic``: :class:`~sklearn.linear_model.LogisticRegression`;
- ``linear_svm``: :class:`~sklearn.svm.LinearSVC`;
- ``svm``: an RBF-kernel SVM, as :class:`~sklearn.kernel_approximation.Nystroem` (``components``
  landmark images) then :class:`~sklearn.svm.LinearSVC`: a kernel SVM that trains in seconds
  on tens of thousands of images, where ``SVC`` takes minutes to hours;
- ``svc``: the exact RBF-kernel SVM, :class:`~sklearn.svm.SVC` (one-vs-one): no approximation,
  but training time grows with the square of the number of images (about 30 s for 10,000 HOG
  vectors on 2 cores, 17 min for 60,000) and the model keeps every support vector, so for data
  sets up to a few tens of thousands;
- ``knn``: :class:`~sklearn.neighbors.KNeighborsClassifier` (the training features are kept
  in the model);
- ``random_forest``: :class:`~sklearn.ensemble.RandomForestClassifier`.

Optionally (``scale: true``) a :class:`~sklearn.preprocessing.StandardScaler` first. scikit-learn
fits the classifier; :func:`to_torch` then writes the fitted numbers into a torch module (an
affine map, the Nystroem map, a linear layer, the kernel on the support vectors with the
one-vs-one votes, a nearest-neighbour vote, a forest walked level by level) that gives the same
scores, so the packaged model is one torch graph (exported to ONNX) from raw pixels to logits.
The tests pin each module to scikit-learn's own ``decision_function`` / ``predict_proba``.
Logits are the decision values of the SVMs and logistic regression and ``log p`` of the
vote / forest probabilities; evaluate's calibration then fits a
temperature on val as for any network.

Buffers whose sizes come from the data (neighbours, trees) take the sizes of the state dict
they are loaded from (:class:`Fitted`), so a checkpoint rebuilds from the config alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

LOG_FLOOR = 1e-4  # probabilities -> logits: log(max(p, LOG_FLOOR))
ABSENT = -1e4  # the logit of a class the training split did not hold


class Fitted(nn.Module):
    """A module whose buffers are sized by the fitted estimator, or by the state dict it loads."""

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected, errors):
        for name, buf in list(self._buffers.items()):
            key = prefix + name
            if key in state_dict and buf is not None and state_dict[key].shape != buf.shape:
                self._buffers[name] = torch.empty_like(state_dict[key])
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected, errors)

    def set(self, **arrays: np.ndarray) -> None:
        """Replace buffers with the fitted arrays."""
        for name, value in arrays.items():
            tensor = torch.as_tensor(np.ascontiguousarray(value))
            self._buffers[name] = tensor.float() if tensor.is_floating_point() else tensor.long()


class Affine(Fitted):
    """``(x - mean) / scale`` (a fitted StandardScaler)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(0))
        self.register_buffer("scale", torch.ones(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.scale


def _sq_distances(x: torch.Tensor, points: torch.Tensor, points_sq: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances (N, M) between rows of ``x`` and ``points``."""
    return ((x * x).sum(1, keepdim=True) - 2 * x @ points.T + points_sq).clamp_min(0)


class RBFMap(Fitted):
    """The Nystroem feature map of an RBF kernel: ``exp(-gamma |x - c|^2) @ normalization.T``."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("components", torch.zeros(0, 0))
        self.register_buffer("components_sq", torch.zeros(0))
        self.register_buffer("normalization", torch.zeros(0, 0))
        self.register_buffer("gamma", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = torch.exp(-self.gamma * _sq_distances(x, self.components, self.components_sq))
        return kernel @ self.normalization.T


class Linear(Fitted):
    """``x @ weight.T + bias``: the decision values of a linear classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("weight", torch.zeros(0, 0))
        self.register_buffer("bias", torch.zeros(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.T + self.bias


class KernelSVM(Fitted):
    """A fitted :class:`~sklearn.svm.SVC` (RBF kernel): its ``decision_function``.

    Each pair of classes (i < j) has a decision value ``kernel(x, support) @ pair_weight + bias``
    (positive: i). With more than two classes they are combined as scikit-learn's one-vs-rest
    shape does: the votes each class won plus its summed decision values squashed below 1/3,
    ``c / (3 (|c| + 1))``; with two, the one value is the second class's logit (the first's 0),
    or the logit itself for a binary task's single output. Classes absent from training get
    :data:`ABSENT`.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("support", torch.zeros(0, 0))
        self.register_buffer("support_sq", torch.zeros(0))
        self.register_buffer("gamma", torch.zeros(()))
        self.register_buffer("pair_weight", torch.zeros(0, 0))  # (pairs, support vectors)
        self.register_buffer("pair_bias", torch.zeros(0))
        self.register_buffer("first", torch.zeros(0, 0))  # (pairs, outputs): one-hot of class i
        self.register_buffer("second", torch.zeros(0, 0))  # ... of class j
        self.register_buffer("out_bias", torch.zeros(0))  # 0, or ABSENT for a class not trained on
        self.register_buffer("two_classes", torch.zeros(()))  # 1.0: trained on two classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = torch.exp(-self.gamma * _sq_distances(x, self.support, self.support_sq))
        decision = kernel @ self.pair_weight.T + self.pair_bias
        two = -decision @ self.second  # two classes: the second's logit is minus the pair's value
        won = (decision >= 0).to(decision.dtype) @ self.first + (decision < 0).to(decision.dtype) @ self.second
        summed = decision @ (self.first - self.second)
        more = won + summed / (3 * (summed.abs() + 1))
        return self.two_classes * two + (1 - self.two_classes) * more + self.out_bias  # (no branch in the graph)


class ProbabilityLogits(nn.Module):
    """Class probabilities (N, K) -> logits: ``log p`` for K outputs, ``log p1 - log p0`` for one."""

    def __init__(self, outputs: int) -> None:
        super().__init__()
        self.outputs = outputs

    def forward(self, probs: torch.Tensor) -> torch.Tensor:
        logp = torch.log(probs.clamp_min(LOG_FLOOR))
        if self.outputs == 1:
            return logp[:, 1:2] - logp[:, 0:1]
        return logp


class NearestNeighbours(Fitted):
    """The share of each class among the ``k`` nearest training vectors (Euclidean)."""

    def __init__(self, k: int, classes: int, distance_weighted: bool = False) -> None:
        super().__init__()
        self.k, self.classes, self.distance_weighted = int(k), int(classes), bool(distance_weighted)
        self.register_buffer("points", torch.zeros(0, 0))
        self.register_buffer("points_sq", torch.zeros(0))
        self.register_buffer("labels", torch.zeros(0, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dist = _sq_distances(x, self.points, self.points_sq)
        near, index = torch.topk(dist, min(self.k, self.points.shape[0]), dim=1, largest=False)
        labels = self.labels[index]  # (N, k)
        onehot = (labels.unsqueeze(-1) == torch.arange(self.classes, device=x.device)).float()
        if self.distance_weighted:
            weights = 1.0 / near.sqrt().clamp_min(1e-12)
            onehot = onehot * weights.unsqueeze(-1)
        votes = onehot.sum(1)
        return votes / votes.sum(1, keepdim=True)


class Forest(Fitted):
    """The mean over trees of the class shares in the leaf each vector reaches.

    The trees' nodes are stacked into flat arrays (a leaf points to itself), and every vector
    steps down all trees at once, one level per step, ``depth`` steps.
    """

    def __init__(self) -> None:
        super().__init__()
        for name in ("feature", "left", "right", "roots"):
            self.register_buffer(name, torch.zeros(0, dtype=torch.long))
        self.register_buffer("threshold", torch.zeros(0))
        self.register_buffer("value", torch.zeros(0, 0))
        self.register_buffer("levels", torch.zeros(0))  # one entry per level: the depth is a static shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        node = self.roots.unsqueeze(0).expand(x.shape[0], -1)  # (N, trees)
        for _ in range(self.levels.shape[0]):
            value = x.gather(1, self.feature[node])
            node = torch.where(value <= self.threshold[node], self.left[node], self.right[node])
        return self.value[node].mean(1)


@dataclass(frozen=True)
class Classical:
    """A classifier family: how to build the scikit-learn estimator from the config's
    ``params``, and the torch module (before the outputs) for a config."""

    estimator: Callable[[dict[str, Any], int], Any]
    modules: Callable[[dict[str, Any], int], list[nn.Module]]
    probabilities: bool  # the module gives probabilities (turned into logits), not decision values


def _split(params: dict[str, Any], *own: str) -> tuple[dict[str, Any], dict[str, Any]]:
    mine = {k: params[k] for k in own if k in params}
    return mine, {k: v for k, v in params.items() if k not in own}


def _logistic(params: dict[str, Any], seed: int) -> Any:
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(**{"max_iter": 1000, "random_state": seed, **params})


def _linear_svm(params: dict[str, Any], seed: int) -> Any:
    from sklearn.svm import LinearSVC

    return LinearSVC(**{"random_state": seed, **params})


def _svm(params: dict[str, Any], seed: int) -> Any:
    from sklearn.kernel_approximation import Nystroem
    from sklearn.pipeline import make_pipeline

    own, rest = _split(params, "components", "gamma")
    # gamma "scale" is set from the data when the pipeline is fitted (fit_classifier)
    return make_pipeline(
        Nystroem(kernel="rbf", n_components=int(own.get("components", 2000)), random_state=seed),
        _linear_svm(rest, seed),
    )


def _svc(params: dict[str, Any], seed: int) -> Any:
    from sklearn.svm import SVC

    return SVC(**{"kernel": "rbf", "gamma": "scale", "cache_size": 1000, "random_state": seed, **params})


def _knn(params: dict[str, Any], seed: int) -> Any:
    from sklearn.neighbors import KNeighborsClassifier

    return KNeighborsClassifier(**{"n_neighbors": 10, "n_jobs": -1, **params})


def _forest(params: dict[str, Any], seed: int) -> Any:
    from sklearn.ensemble import RandomForestClassifier

    return RandomForestClassifier(**{"n_estimators": 100, "n_jobs": -1, "random_state": seed, **params})


CLASSIFIERS: dict[str, Classical] = {
    "logistic": Classical(_logistic, lambda p, k: [Linear()], probabilities=False),
    "linear_svm": Classical(_linear_svm, lambda p, k: [Linear()], probabilities=False),
    "svm": Classical(_svm, lambda p, k: [RBFMap(), Linear()], probabilities=False),
    "svc": Classical(_svc, lambda p, k: [KernelSVM()], probabilities=False),
    "knn": Classical(
        _knn,
        lambda p, k: [NearestNeighbours(int(p.get("n_neighbors", 10)), k, p.get("weights") == "distance")],
        probabilities=True,
    ),
    "random_forest": Classical(_forest, lambda p, k: [Forest()], probabilities=True),
}


def classical(spec: dict[str, Any]) -> Classical:
    """The :class:`Classical` entry ``model.classifier.name`` names."""
    from taxonomist.errors import ConfigError

    name = str(spec.get("name"))
    if name not in CLASSIFIERS:
        raise ConfigError(f"model.classifier.name: {name!r} is not a classifier (one of {', '.join(CLASSIFIERS)})")
    return CLASSIFIERS[name]


def build_head(spec: dict[str, Any], num_classes: int, outputs: int) -> nn.Sequential:
    """The head's torch modules for ``model.classifier`` (sizes filled by :func:`to_torch` or a state dict)."""
    family = classical(spec)
    params = dict(spec.get("params") or {})
    steps: list[nn.Module] = [Affine()] if spec.get("scale", True) else []
    steps += family.modules(params, num_classes)
    if family.probabilities:
        steps.append(ProbabilityLogits(outputs))
    return nn.Sequential(*steps)


def fit_classifier(spec: dict[str, Any], features: np.ndarray, targets: np.ndarray, seed: int) -> Any:
    """Fit the scikit-learn pipeline ``model.classifier`` describes on ``features``."""
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    family = classical(spec)
    params = dict(spec.get("params") or {})
    estimator = family.estimator(params, seed)
    steps = [("scale", StandardScaler())] if spec.get("scale", True) else []
    steps.append(("classify", estimator))
    pipeline = Pipeline(steps)
    if spec.get("name") == "svm":
        gamma = params.get("gamma", "scale")
        if gamma == "scale":  # as SVC's gamma="scale": 1 / (features x variance) of the (scaled) inputs
            scaled = StandardScaler().fit_transform(features) if spec.get("scale", True) else features
            gamma = 1.0 / (features.shape[1] * float(scaled.var()) or 1.0)
        pipeline.set_params(classify__nystroem__gamma=float(gamma))
    return pipeline.fit(features, targets)


def _linear_weights(estimator: Any, num_classes: int, outputs: int) -> tuple[np.ndarray, np.ndarray]:
    coef, intercept = np.atleast_2d(estimator.coef_), np.atleast_1d(estimator.intercept_)
    classes = np.asarray(estimator.classes_, dtype=int)
    if outputs == 1:  # binary task: the one logit of the positive class
        return coef[:1], intercept[:1]
    if coef.shape[0] == 1:  # two classes: sklearn keeps one row (the second class's margin)
        coef = np.vstack([np.zeros_like(coef), coef])
        intercept = np.concatenate([[0.0], intercept])
    weight = np.zeros((num_classes, coef.shape[1]))
    bias = np.full(num_classes, ABSENT)
    weight[classes], bias[classes] = coef, intercept
    return weight, bias


def _forest_arrays(forest: Any, num_classes: int) -> dict[str, np.ndarray]:
    features, thresholds, lefts, rights, values, roots = [], [], [], [], [], []
    offset, depth = 0, 0
    classes = np.asarray(forest.classes_, dtype=int)
    for tree in forest.estimators_:
        t = tree.tree_
        n = t.node_count
        leaf = t.children_left < 0
        ids = np.arange(n)
        features.append(np.where(leaf, 0, t.feature))
        # scikit-learn compares float32 features with float64 thresholds: the largest float32 at
        # most the threshold gives the same answer in float32.
        thr32 = t.threshold.astype(np.float32)
        over = thr32.astype(np.float64) > t.threshold
        thr32[over] = np.nextafter(thr32[over], np.float32(-np.inf))
        thresholds.append(np.where(leaf, np.float32(np.inf), thr32))
        lefts.append(np.where(leaf, ids, t.children_left) + offset)
        rights.append(np.where(leaf, ids, t.children_right) + offset)
        share = t.value[:, 0, :] / np.maximum(t.value[:, 0, :].sum(1, keepdims=True), 1e-12)
        full = np.zeros((n, num_classes))
        full[:, classes] = share
        values.append(full)
        roots.append(offset)
        offset += n
        depth = max(depth, t.max_depth)
    return {
        "feature": np.concatenate(features),
        "threshold": np.concatenate(thresholds).astype(np.float32),
        "left": np.concatenate(lefts),
        "right": np.concatenate(rights),
        "value": np.concatenate(values),
        "roots": np.asarray(roots),
        "levels": np.zeros(depth, dtype=np.float32),
    }


def _kernel_svm_arrays(svc: Any, num_classes: int, outputs: int) -> dict[str, np.ndarray]:
    """The buffers of :class:`KernelSVM` for a fitted ``SVC``. Its private ``_dual_coef_`` and
    ``_intercept_`` are libsvm's (the public ones are negated for two classes): the support
    vectors of class i weigh in pair (i, j) by row j - 1 of the coefficients, those of j by row i."""
    classes = np.asarray(svc.classes_, dtype=int)
    starts = np.r_[0, np.cumsum(svc.n_support_)]
    count = len(classes)
    pairs = [(i, j) for i in range(count) for j in range(i + 1, count)]
    weight = np.zeros((len(pairs), len(svc.support_vectors_)))
    first, second = np.zeros((len(pairs), outputs)), np.zeros((len(pairs), outputs))
    for k, (i, j) in enumerate(pairs):
        weight[k, starts[i] : starts[i + 1]] = svc._dual_coef_[j - 1, starts[i] : starts[i + 1]]
        weight[k, starts[j] : starts[j + 1]] = svc._dual_coef_[i, starts[j] : starts[j + 1]]
        if outputs == 1:  # a binary task: the single logit is the positive class's
            second[k, 0] = 1.0
        else:
            first[k, classes[i]], second[k, classes[j]] = 1.0, 1.0
    out_bias = np.zeros(outputs)
    if outputs > 1:
        out_bias[np.setdiff1d(np.arange(num_classes), classes)] = ABSENT
    support = np.asarray(svc.support_vectors_)
    return {
        "support": support,
        "support_sq": (support.astype(np.float64) ** 2).sum(1),
        "gamma": np.asarray(svc._gamma),
        "pair_weight": weight,
        "pair_bias": np.asarray(svc._intercept_),
        "first": first,
        "second": second,
        "out_bias": out_bias,
        "two_classes": np.asarray(float(count == 2)),
    }


def to_torch(pipeline: Any, spec: dict[str, Any], num_classes: int, outputs: int) -> nn.Sequential:
    """The fitted scikit-learn ``pipeline`` as a torch head with ``outputs`` logits."""
    head = build_head(spec, num_classes, outputs)
    modules = list(head)
    if spec.get("scale", True):
        scaler = pipeline.named_steps["scale"]
        modules.pop(0).set(mean=scaler.mean_, scale=scaler.scale_)
    estimator = pipeline.named_steps["classify"]
    name = spec.get("name")
    if name == "svm":
        nystroem, estimator = estimator.named_steps["nystroem"], estimator.named_steps["linearsvc"]
        comps = nystroem.components_
        modules.pop(0).set(
            components=comps,
            components_sq=(comps * comps).sum(1),
            normalization=nystroem.normalization_,
            gamma=np.asarray(nystroem.gamma),
        )
    if name in ("logistic", "linear_svm", "svm"):
        weight, bias = _linear_weights(estimator, num_classes, outputs)
        modules[0].set(weight=weight, bias=bias)
    elif name == "svc":
        modules[0].set(**_kernel_svm_arrays(estimator, num_classes, outputs))
    elif name == "knn":
        points = np.asarray(estimator._fit_X, dtype=np.float32)
        labels = np.asarray(estimator.classes_, dtype=int)[estimator._y]
        modules[0].set(points=points, points_sq=(points.astype(np.float64) ** 2).sum(1), labels=labels)
    elif name == "random_forest":
        modules[0].set(**_forest_arrays(estimator, num_classes))
    return head.eval()
