"""Prediction with a packaged model: ``taxonomist predict`` over folders, globs, manifests,
archives and list files (:mod:`.inputs`), in batches (:mod:`.batch`), into a CSV, Parquet or
JSON Lines file that a rerun resumes (:mod:`.outputs`)."""
