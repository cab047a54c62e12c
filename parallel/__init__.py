"""Parallelism applied from outside the single-device model (tensor, pipeline, data parallel)."""
