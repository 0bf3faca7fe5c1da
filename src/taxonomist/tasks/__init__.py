"""The four classification tasks: label spaces, decisions, losses and metrics.

- :mod:`.labels`: the label space of a dataset (classes, or the label tree) and target encoding.
- :mod:`.taxonomy`: taxonomy files and label-path resolution for hierarchical data.
- :mod:`.decide`: probabilities and decisions from logits, and threshold tuning (NumPy only,
  shared by evaluation and the served model).
- :mod:`.heads`: the training loss and torchmetrics of each task.
"""

TASKS = ("binary", "multiclass", "multilabel", "hierarchical")
SINGLE_LABEL_TASKS = ("binary", "multiclass", "hierarchical")
