"""Sharded, resumable benchmark evaluation with CircularEval and reports."""
