"""The agent loop: model turn -> parse -> tool -> observation, until a final answer or ``max_turns``.

Why episodes advance together: Lagent runs one agent, one conversation, one model call at a time. A batch
job has thousands of episodes, and the serving runtime is fastest when it is given many requests at once
(continuous batching fills every forward pass; the prefix cache serves the shared system prompt and each
episode's earlier turns). So ``Agent.run`` keeps every unfinished episode in step: each round, all their
prompts go to ``model.generate`` in *one* call, then all their tool calls run (``workers`` sandboxes at
once), then the next round. An episode that finishes simply leaves the batch. ``run_sequential`` is the
Lagent way (one episode to its end, then the next), kept for comparison: same prompts, same results.

The model is anything with ``generate(prompts: list[str], sampling: list[SamplingParams]) -> outputs``
whose items have ``.text``, ``.error`` and optionally ``.finish_reason``, ``.token_ids``,
``.prompt_token_ids`` (the runtime's ``LLM`` does; tests pass a scripted policy).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any

from puyu.agents.actions import ActionExecutor, ActionResult
from puyu.serving.config import SamplingParams

# finish reasons of an episode
ANSWER = "answer"  # the model gave a final answer
TRUNCATED = "truncated"  # the final answer hit max_tokens (kept as it is)
MAX_TURNS = "max_turns"  # still calling tools when the turn budget ran out
MODEL_ERROR = "error"  # the runtime refused the request (e.g. the conversation outgrew the context)


@dataclasses.dataclass
class Turn:
    text: str  # the model's reply as generated (stop string cut)
    finish_reason: str | None  # the runtime's: stop | length
    output_tokens: int
    prompt_tokens: int
    thought: str = ""
    call: dict | None = None  # {"name", "parameters"}
    observation: dict | None = None  # {"status", "output", "seconds"}
    parse_error: str | None = None

    def to_record(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None and v != ""}


@dataclasses.dataclass
class Episode:
    task: str
    index: int = 0
    turns: list[Turn] = dataclasses.field(default_factory=list)
    final: str | None = None
    finish_reason: str | None = None
    error: str | None = None
    # (stored reply, observation) pairs the protocol renders; the tools' per-episode state
    history: list[tuple[str, str | None]] = dataclasses.field(default_factory=list)
    state: dict = dataclasses.field(default_factory=dict)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def to_record(self) -> dict:
        calls = [t for t in self.turns if t.call is not None]
        rec: dict[str, Any] = {
            "final": self.final, "finish_reason": self.finish_reason,
            "num_turns": len(self.turns), "tool_calls": len(calls),
            "tool_errors": sum(1 for t in calls if t.observation and t.observation["status"] != "ok"),
            "parse_errors": sum(1 for t in self.turns if t.parse_error),
            "prompt_tokens": sum(t.prompt_tokens for t in self.turns),
            "output_tokens": sum(t.output_tokens for t in self.turns),
            "turns": [t.to_record() for t in self.turns]}
        if self.error:
            rec["error"] = self.error
        return rec


class Agent:
    """Runs episodes of ``protocol`` over ``model`` with the tools of ``executor``.

    ``sampling`` is the base for every model turn; the protocol's stop strings are added, and, when it has
    no seed, each (episode, turn) gets its own, so sampled episodes do not depend on how they were batched.
    """

    def __init__(self, model, protocol, executor: ActionExecutor, sampling: SamplingParams | None = None,
                 max_turns: int = 4, seed: int = 0):
        if max_turns < 1:
            raise ValueError(f"max_turns must be >= 1, got {max_turns}")
        self.model, self.protocol, self.executor = model, protocol, executor
        base = sampling or SamplingParams(max_tokens=256)
        self.sampling = dataclasses.replace(base, stop=list(base.stop) + [s for s in protocol.stop if s not in base.stop])
        self.sampling.validate()
        self.max_turns, self.seed = max_turns, seed
        self.stats = {"model_calls": 0, "model_seconds": 0.0, "tool_seconds": 0.0, "prefix_cache_block_hits": 0}

    def _params(self, ep: Episode) -> SamplingParams:
        if self.sampling.seed is not None:
            return self.sampling
        return dataclasses.replace(self.sampling, seed=(self.seed * 1_000_003 + ep.index) * 64 + len(ep.turns))

    def new_episodes(self, tasks: list[str], indices: list[int] | None = None) -> list[Episode]:
        indices = list(range(len(tasks))) if indices is None else indices
        return [Episode(t, i) for t, i in zip(tasks, indices)]

    def run(self, tasks: list[str], indices: list[int] | None = None) -> list[Episode]:
        """All episodes, advanced together: one ``generate`` call per round for every unfinished episode.
        ``indices`` (default 0..n-1) name the episodes in seeds, so a shard's episodes match a whole run's."""
        episodes = self.new_episodes(tasks, indices)
        while True:
            active = [ep for ep in episodes if not ep.done]
            if not active:
                return episodes
            self.step(active)

    def run_sequential(self, tasks: list[str], indices: list[int] | None = None) -> list[Episode]:
        """The Lagent way: one episode at a time, one model call per turn (for comparison and benchmarks)."""
        episodes = self.new_episodes(tasks, indices)
        for ep in episodes:
            while not ep.done:
                self.step([ep])
        return episodes

    def step(self, active: list[Episode]) -> None:
        """One round for ``active`` (unfinished) episodes: a model turn each, then their tool calls."""
        prompts = [self.protocol.render(ep.task, ep.history) for ep in active]
        t0 = time.perf_counter()
        outs = self.model.generate(prompts, [self._params(ep) for ep in active])
        self.stats["model_seconds"] += time.perf_counter() - t0
        self.stats["model_calls"] += 1
        self.stats["prefix_cache_block_hits"] += getattr(self.model, "stats", {}).get("prefix_cache_block_hits", 0)
        pending = []  # (episode, step, turn) whose tool call runs this round
        for ep, out in zip(active, outs):
            if getattr(out, "error", None):
                ep.error, ep.finish_reason = out.error, MODEL_ERROR
                continue
            text = out.text or ""
            step = self.protocol.parse(text)
            turn = Turn(text, getattr(out, "finish_reason", None), len(getattr(out, "token_ids", None) or []),
                        len(getattr(out, "prompt_token_ids", None) or []), step.thought)
            ep.turns.append(turn)
            if step.final is not None:
                ep.final = step.final
                ep.finish_reason = TRUNCATED if turn.finish_reason == "length" else ANSWER
                ep.history.append((self.protocol.reply(text, step), None))
                continue
            if step.error is not None:
                turn.parse_error = step.error
                self._observe(ep, text, step, None)
            else:
                turn.call = step.call.to_record()
                pending.append((ep, text, step))
        if pending:
            t0 = time.perf_counter()
            results = self.executor.execute_many([(step.call, ep.state) for ep, _, step in pending])
            self.stats["tool_seconds"] += time.perf_counter() - t0
            for (ep, text, step), result in zip(pending, results):
                ep.turns[-1].observation = result.to_record()
                self._observe(ep, text, step, result)
        for ep in active:
            if ep.done:  # its python interpreter (and any other per-episode tool state) goes
                self.executor.release(ep.state)

    def _observe(self, ep: Episode, text: str, step, result: ActionResult | None) -> None:
        ep.history.append((self.protocol.reply(text, step), self.protocol.observation(step, result)))
        if len(ep.turns) >= self.max_turns:
            ep.finish_reason = MAX_TURNS
