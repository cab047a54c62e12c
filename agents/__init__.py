"""Tool-using agents on top of the serving runtime (Lagent-style).

- ``actions``: ``Action`` tools (``python`` in the evaluation sandbox, ``calculator`` over an ast whitelist)
  and ``ActionExecutor``, which turns every bad call into an error observation.
- ``protocol``: InternLM2's agent chat format (``<|action_start|><|plugin|>`` / ``<|interpreter|>``,
  ``environment`` turns) and the ReAct text format; rendering is append-only (prefix-cache friendly).
- ``agent``: ``Agent.run`` advances many episodes together, one ``generate`` call per round.
- ``job``/``config``: ``puyu job=agent`` (sharded array + merge, trajectories and report).
- ``scripted``: a scripted policy (optionally over a real runtime) for tests and the benchmark.
"""
