"""Job kinds and chain steps come from the packages that implement them, through one entry-point group;
the launcher imports no stage package; the main chain passes outputs between steps by name."""
from __future__ import annotations

import ast
import dataclasses
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from puyu.launcher.chain import RunOutputs
from puyu.launcher.errors import ConfigError
from puyu.launcher.registry import ChainStep, registry

ROOT = Path(__file__).resolve().parents[1]
STAGE_PACKAGES = ("data_pipeline", "parallel", "model", "serving", "evaluation", "agents")


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_the_launcher_imports_no_stage_package():
    offending = {f"{path.name}: {name}" for path in sorted((ROOT / "launcher").glob("*.py"))
                 for name in _imported_modules(path)
                 if name.split(".")[:2] in [["puyu", pkg] for pkg in STAGE_PACKAGES]
                 or name in {f"puyu.{pkg}" for pkg in STAGE_PACKAGES}}
    assert not offending, sorted(offending)
    assert "puyu.launcher.registry" in _imported_modules(ROOT / "launcher" / "cli.py")  # the check sees imports


def test_every_package_registers_its_kinds_and_the_chain_is_in_order():
    reg = registry()
    assert set(reg.jobs) == {"pipeline", "data", "pretrain", "finetune", "build_engine", "infer", "eval", "agent",
                             "probe", "status"}
    assert reg.jobs["data"].config_cls.__module__ == "puyu.data_pipeline.kinds"
    assert [s.name for s in reg.chain] == ["data", "pretrain", "agent_traces", "finetune", "serving", "eval", "agents"]
    sections = {f.name for f in dataclasses.fields(reg.jobs["pipeline"].config_cls)}
    assert {"data", "pretrain", "finetune", "engine", "infer", "eval", "agent", "agent_traces"} <= sections


def test_run_outputs_are_found_by_name_newest_first_and_a_missing_one_is_named():
    run = RunOutputs()
    run.add(ChainStep("pretrain", 20, "m:f", outputs={"model": "pretrain/model"}))
    run.add(ChainStep("finetune", 40, "m:f", outputs={"model": "finetune/model", "adapters": "finetune/ckpt"}))
    assert run.rel("model") == "finetune/model" and run.all("model") == ["pretrain/model", "finetune/model"]
    with pytest.raises(ConfigError, match=r"step eval needs 'engine', which no step before it produces "
                                          r"\(produced so far: adapters, model\)"):
        run.rel("engine", "eval")


def test_another_distribution_adds_a_job_kind_and_a_chain_step_through_the_entry_point(tmp_path):
    """What a user's own package does: a ``puyu.jobs`` entry point; ``puyu job=<its kind>`` then runs it,
    and its chain step joins ``job=pipeline`` (here seen in the pipeline's config schema)."""
    site = tmp_path / "site"
    (site / "extra_jobs-0.1.dist-info").mkdir(parents=True)
    (site / "extra_jobs-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: extra-jobs\nVersion: 0.1\n")
    (site / "extra_jobs-0.1.dist-info" / "entry_points.txt").write_text("[puyu.jobs]\nextra = extra_jobs:register\n")
    (site / "extra_jobs.py").write_text(textwrap.dedent('''
        import dataclasses
        from puyu.launcher.config import JobConfig
        from puyu.launcher.registry import ChainStep, JobSpec
        from puyu.launcher.stage import Stage

        @dataclasses.dataclass
        class HelloConfig(JobConfig):
            greeting: str = "hello"

        def hello_stages(cfg):
            return [Stage("hello", Hello(cfg.greeting))]

        @dataclasses.dataclass
        class Hello:
            greeting: str
            def __call__(self, ctx):
                print("extra job says", self.greeting, flush=True)
                return {"said": self.greeting}

        def register(registry):
            registry.add_job("hello", JobSpec(HelloConfig, stages="extra_jobs:hello_stages"))
            registry.add_chain_step(ChainStep("hello", order=99, stages="extra_jobs:hello_stages",
                                              fields=(("greeting", str, lambda: "hi"),)))
    '''))
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-m", "puyu.launcher", "job=hello", "cluster=inline", "job.greeting=salut",
                          f"run={tmp_path}/run"], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0 and "extra job says salut" in out.stdout, out.stderr[-2000:]
    bad = subprocess.run([sys.executable, "-m", "puyu.launcher", "job=pipeline", "job.greetin=x",
                          "launcher.dry_run=true"], capture_output=True, text=True, timeout=120, env=env)
    assert "did you mean job.greeting?" in bad.stderr, bad.stderr[-2000:]
