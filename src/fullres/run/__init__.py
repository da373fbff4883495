"""Runs: train (`train`), predict (`predict`), export (`export`), the run folder and its checkpoints
(`checkpoint`), what a run may execute (`trust`), experiment trackers (`tracking`), and the versions a
run records (`versions`)."""
