"""Cross-validation and label errors: ``taxonomist cv`` and ``taxonomist label-errors``.

- :mod:`.folds`: the training pool (train + val of ``data/processed``) and its folds,
  stratified and grouped;
- :mod:`.run`: one model per fold (the embeddings family's classifier on cached features, or
  the train stage on a per-fold copy of the data), MLflow child runs, ``reports/cv/``
  with the out-of-fold probabilities;
- :mod:`.label_errors`: cleanlab's confident learning on those probabilities,
  ``reports/label_errors/``.
"""
