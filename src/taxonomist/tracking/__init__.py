"""Tracking: MLflow runs that span the train, evaluate and package stages."""
