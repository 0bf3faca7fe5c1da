"""Evaluation: test-split metrics, per-class tables and plots."""
