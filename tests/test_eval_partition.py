"""The size partitioner and model resolution: bounded task cost, stable keys, one-line errors."""
from __future__ import annotations

import dataclasses

import pytest

from puyu.evaluation.config import EvalJobConfig, InferenceConfig
from puyu.evaluation.items import Dataset, EvalError, Item
from puyu.evaluation.partition import ModelSpec, plan_tasks, resolve_models, split_by_cost


def test_split_by_cost_bounds_every_range_and_covers_all_items_in_order():
    costs = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]
    ranges = split_by_cost(costs, max_cost=8)
    assert [i for r in ranges for i in r] == list(range(len(costs)))
    assert [list(r) for r in ranges] == [[0, 1, 2], [3, 4], [5], [6, 7], [8, 9]]
    # an item costlier than the bound gets a task of its own; it is never dropped
    assert all(sum(costs[i] for i in r) <= 8 or len(r) == 1 for r in ranges)
    assert split_by_cost([], 5) == []
    assert [list(r) for r in split_by_cost([1, 1, 1], 100)] == [[0, 1, 2]]


def _cfg(**kw) -> EvalJobConfig:
    return EvalJobConfig(kind="eval", **kw)


def _datasets():
    mc = Dataset("toy_mc", "mc", [Item(f"toy_mc/{i}", f"q{i}", ["a", "b"], 0) for i in range(10)])
    gen = Dataset("toy_gen", "gen", [Item(f"toy_gen/{i}", f"q{i}", answer="1") for i in range(3)])
    return {"toy_mc": mc, "toy_gen": gen}


def test_plan_cuts_each_model_and_dataset_separately_with_stable_keys():
    models = [ModelSpec("a", "/x/a"), ModelSpec("b", "/x/b")]
    cost = lambda ds, item, infer: 10.0 if ds.kind == "mc" else 100.0  # noqa: E731
    cfg = _cfg(max_task_cost=35)
    plan = plan_tasks(models, _datasets(), cfg, cost)
    assert [(t.model.name, t.dataset, t.start, t.stop) for t in plan] == [
        ("a", "toy_mc", 0, 3), ("a", "toy_mc", 3, 6), ("a", "toy_mc", 6, 9), ("a", "toy_mc", 9, 10),
        ("a", "toy_gen", 0, 1), ("a", "toy_gen", 1, 2), ("a", "toy_gen", 2, 3),
        ("b", "toy_mc", 0, 3), ("b", "toy_mc", 3, 6), ("b", "toy_mc", 6, 9), ("b", "toy_mc", 9, 10),
        ("b", "toy_gen", 0, 1), ("b", "toy_gen", 1, 2), ("b", "toy_gen", 2, 3)]
    assert plan == plan_tasks(models, _datasets(), cfg, cost)  # same config, same keys
    assert len({t.key for t in plan}) == len(plan)
    # inference settings are part of the key: a change means a recompute, never a stale reuse
    other = plan_tasks(models, _datasets(), dataclasses.replace(cfg, infer=InferenceConfig(circular="none")), cost)
    assert all(a.key != b.key for a, b in zip(plan, other))
    with pytest.raises(EvalError, match="max_task_cost"):
        plan_tasks(models, _datasets(), _cfg(max_task_cost=0), cost)


def test_models_resolve_by_name_or_engine_directory_and_unknown_names_fail_in_one_line(tmp_path):
    for name in ("one/engine", "two/engine"):
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "manifest.json").write_text("{}")
    cfg = _cfg(models=[str(tmp_path / "one/engine"), str(tmp_path / "two/engine")])
    assert [m.name for m in resolve_models(cfg)] == ["one_engine", "two_engine"]
    cfg = _cfg(models=[f"first:{tmp_path / 'one/engine'}", "base"], model_paths={"base": str(tmp_path / "two/engine")})
    assert [(m.name, m.path) for m in resolve_models(cfg)] == [("first", str(tmp_path / "one/engine")),
                                                                ("base", str(tmp_path / "two/engine"))]
    cfg = _cfg(model_paths={"base": str(tmp_path / "one/engine")})
    assert [(m.name, m.in_run) for m in resolve_models(cfg, {"pretrained": "build_engine/engine"})] == [
        ("base", False), ("pretrained", True)]
    with pytest.raises(EvalError, match=r"unknown model 'nosuch'.*known: base\)") as err:
        resolve_models(_cfg(models=["nosuch"], model_paths={"base": str(tmp_path / "one/engine")}))
    assert "\n" not in str(err.value)
    (tmp_path / "hf" / "Qwen2-0.5B").mkdir(parents=True)  # a Hugging Face model directory is a model too
    (tmp_path / "hf" / "Qwen2-0.5B" / "config.json").write_text('{"model_type": "qwen2"}')
    assert [m.name for m in resolve_models(_cfg(models=[str(tmp_path / "hf" / "Qwen2-0.5B")]))] == ["Qwen2-0.5B"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvalError, match="neither an engine directory.*nor a Hugging Face model directory"):
        resolve_models(_cfg(models=[str(tmp_path / "empty")]))
    with pytest.raises(EvalError, match="nothing to evaluate"):
        resolve_models(_cfg())
