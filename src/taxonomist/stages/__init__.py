"""The pipeline stages: ingest, preprocess, train, evaluate, package.

Each module has a ``run(cfg)`` that loads its inputs, calls the library and writes its
outputs atomically; ``taxonomist <stage>`` runs one with ``params.yaml``.
"""

STAGES = ("ingest", "preprocess", "train", "evaluate", "package")
