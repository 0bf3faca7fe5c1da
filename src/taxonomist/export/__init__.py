"""Export: ONNX, the MLflow model that takes raw images, the model card and the registry.

Keep this package's ``__init__`` free of heavy imports: ``serving`` is loaded by MLflow in
environments that have only onnxruntime, Pillow, NumPy and pandas.
"""
