"""Errors puyu reports to the user as one line (no traceback): bad input and failed stages."""
from __future__ import annotations


class PuyuError(Exception):
    """Bad input or a failed run, explained in one line that names the key, file or task at fault.

    The ``puyu`` command prints these as ``puyu: error: <message>`` without a traceback; any other
    exception is a bug and keeps its traceback.
    """


class ConfigError(PuyuError, ValueError):
    """A job's config or input is wrong (a stage builder's or a stage's own check of what the user gave).

    Also a ``ValueError``, so callers that catch ``ValueError`` keep working.
    """


class StageFailed(PuyuError):
    def __init__(self, stage: str, task: str, state: str, log_path: str, detail: str = ""):
        self.stage, self.task, self.state, self.log_path = stage, task, state, log_path
        tail = f": {detail}" if detail else ""
        super().__init__(f"stage {stage!r} task {task} ended {state}{tail} (log: {log_path})")
