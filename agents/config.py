"""``AgentJobConfig``: the ``puyu job=agent`` config, an OmegaConf-friendly dataclass like ``InferJobConfig``.

Kept free of heavy imports (no torch) so the launcher can register it in Hydra's ConfigStore cheaply.
"""
from __future__ import annotations

import dataclasses

from puyu.launcher.config import JobConfig
from puyu.serving.config import RuntimeConfig, SamplingParams, ServingError


def _agent_sampling() -> SamplingParams:
    return SamplingParams(max_tokens=256)


@dataclasses.dataclass
class AgentJobConfig(JobConfig):
    """``puyu job=agent engine=<engine dir> input=tasks.jsonl``: tool-using episodes, sharded over an array.

    Each input line is ``{"task": str}`` or ``{"question": str, "answer": str}`` (GSM8K-style; the answer
    is the gold the summary grades against, a ``#### n`` solution works too), optionally with ``"id"``.
    Output: ``<run>/agent/trajectories.jsonl`` (one record per input line, in order) and
    ``<run>/agent/report.md``. ``tools`` from ``python``, ``calculator``, ``search`` (over ``corpus``, a folder
    of the data stage's document files, e.g. ``<run>/minhash_filter/out``) and ``convert`` (units);
    ``protocol`` ``internlm2`` (the special-token agent format) or ``react`` (plain text).
    """

    engine: str = ""
    input: str = ""
    shards: int = 4
    tools: list[str] = dataclasses.field(default_factory=lambda: ["python", "calculator"])
    corpus: str = ""  # the search tool's documents (the pipeline sets its own corpus)
    protocol: str = "internlm2"
    system: str = ""  # "" = the protocol's default instructions
    max_turns: int = 4  # model turns per episode (the last one must answer)
    tool_timeout_s: float = 10.0  # per python call, in the sandbox
    tool_memory_mb: int = 512
    tool_workers: int = 2  # tool calls (sandboxes) run at once per task
    sampling: SamplingParams = dataclasses.field(default_factory=_agent_sampling)
    runtime: RuntimeConfig = dataclasses.field(default_factory=RuntimeConfig)

    def validate(self) -> None:
        from puyu.agents.actions import TOOLS
        from puyu.agents.protocol import PROTOCOLS

        if self.protocol not in PROTOCOLS:
            raise ServingError(f"job.protocol must be one of {sorted(PROTOCOLS)}, got {self.protocol!r}")
        unknown = [t for t in self.tools if t not in TOOLS]
        if unknown:
            raise ServingError(f"job.tools: unknown tool(s) {unknown}; known: {sorted(TOOLS)}")
        if "search" in self.tools and not self.corpus:
            raise ServingError("job.tools has search but job.corpus is empty: set job.corpus=<folder of the data "
                               "stage's documents, e.g. <run>/minhash_filter/out>")
        for name in ("shards", "max_turns", "tool_workers"):
            if getattr(self, name) < 1:
                raise ServingError(f"job.{name} must be >= 1, got {getattr(self, name)}")
        if not self.tool_timeout_s > 0:
            raise ServingError(f"job.tool_timeout_s must be > 0, got {self.tool_timeout_s}")
        if self.tool_memory_mb < 64:
            raise ServingError(f"job.tool_memory_mb must be >= 64, got {self.tool_memory_mb}")
        self.sampling.validate()
        self.runtime.validate()
