"""The ``puyu`` command: ``puyu job=<kind> cluster=<local|slurm|inline> key=value ...``.

Hydra composes the config (``-m`` sweeps too, e.g. ``hydra/launcher=submitit_slurm`` runs a sweep
as one Slurm array). Before Hydra runs, the overrides are composed once more here so that bad
input — an unknown key, job kind or config value — ends in one line that names it, instead of
Hydra's multi-line report, and before anything is submitted.
"""
from __future__ import annotations

import difflib
import re
import sys
import traceback
from pathlib import Path

import hydra
from hydra import compose, initialize_config_module
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from puyu.launcher.config import ClusterKind, register_configs
from puyu.launcher.errors import PuyuError, StageFailed
from puyu.launcher.pipeline import Pipeline
from puyu.launcher.registry import job_kinds

HYDRA_FLAGS = {"-h", "--help", "--hydra-help", "--info", "-i", "--cfg", "-c", "--shell-completion", "-sc"}


# ---------------------------------------------------------------------------- bad input
def _preflight_overrides(args: list[str]) -> list[str]:
    """The user's overrides as one run would see them: no Hydra flags or hydra/ keys, sweeps -> 1st value."""
    plain = [a for a in args if not a.startswith("-")]
    parsed = OverridesParser.create().parse_overrides(plain)
    out = []
    for ov, text in zip(parsed, plain):
        if ov.get_key_element().lstrip("+~").startswith("hydra"):
            continue
        if ov.is_sweep_override():
            first = next(iter(ov.sweep_string_iterator()))
            out.append(f"{ov.get_key_element()}={first}")
        else:
            out.append(text)
    return out


def _valid_keys(cfg: DictConfig, dotted_parent: str) -> list[str]:
    node = OmegaConf.select(cfg, dotted_parent, throw_on_resolution_failure=False) if dotted_parent else cfg
    return sorted(node.keys()) if isinstance(node, DictConfig) else []


def _compose_without_unknown_keys(overrides: list[str], full: str) -> DictConfig | None:
    """The config without the override of ``full`` (and of any other unknown key), to list what is valid."""
    dropped = {full}
    for _ in range(len(overrides) + 1):
        kept = [o for o in overrides if o.partition("=")[0].lstrip("+~") not in dropped]
        try:
            return compose(config_name="config", overrides=kept)
        except (HydraException, OmegaConfBaseException) as exc:
            cause = exc.__cause__ if isinstance(exc.__cause__, OmegaConfBaseException) else exc
            key = getattr(cause, "full_key", None)
            if not isinstance(cause, (ConfigAttributeError, ConfigKeyError)) or not key or key in dropped:
                return None
            dropped.add(key)
    return None


def explain(exc: Exception, overrides: list[str]) -> str:
    """One line for a composition error: which key/kind/value is wrong and what would be valid."""
    msg = str(exc)
    missing = re.search(r"Could not find '([^']+)'", msg)
    if missing:
        group, _, name = missing.group(1).rpartition("/")
        options = re.findall(r"^\t(\S+)$", msg, flags=re.M)
        what = "job kind" if group == "job" else f"{group} option"
        return f"unknown {what} {name!r} (available: {', '.join(options)})"
    cause = exc.__cause__ if isinstance(exc.__cause__, OmegaConfBaseException) else exc
    full = getattr(cause, "full_key", None)
    reason = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and full:
        parent, _, leaf = full.rpartition(".")
        base = _compose_without_unknown_keys(overrides, full)
        valid = _valid_keys(base, parent) if base is not None else []
        prefix = parent + "." if parent else ""
        close = difflib.get_close_matches(leaf, valid, n=1)
        nested = [f"{prefix}{k}.{leaf}" for k in valid if base is not None and leaf in _valid_keys(base, prefix + k)]
        hint = f"; did you mean {prefix}{close[0]}?" if close else f"; did you mean {nested[0]}?" if nested else ""
        return f"unknown config key {full!r}{hint} (valid keys of {parent or 'the top level'}: {', '.join(valid)})"
    if isinstance(cause, ValidationError) and full:
        return f"bad value for {full}: {reason}"
    return f"bad config: {msg.splitlines()[0] if msg else reason}"


def preflight(args: list[str]) -> DictConfig | None:
    if HYDRA_FLAGS & set(args):
        return None
    try:
        overrides = _preflight_overrides(args)
    except HydraException as exc:
        raise PuyuError(f"cannot parse the command line: {str(exc).splitlines()[0]}") from exc
    with initialize_config_module(config_module="puyu.conf", version_base="1.3"):
        try:
            cfg = compose(config_name="config", overrides=overrides)
            OmegaConf.resolve(cfg)
            return cfg
        except (HydraException, OmegaConfBaseException, ValueError) as exc:
            raise PuyuError(explain(exc, overrides)) from exc


# ---------------------------------------------------------------------------- running a job
def _running_under_submitit_sweep() -> bool:
    hc = HydraConfig.get()
    return hc.mode == RunMode.MULTIRUN and "submitit" in str(hc.launcher.get("_target_", ""))


def run_job(cfg: DictConfig) -> int:
    """Build the job's stages and run them as a pipeline (or run the job's action on this node)."""
    OmegaConf.resolve(cfg)  # `${now:...}` etc. fixed once, here, not again in every task
    spec = job_kinds()[cfg.job.kind]
    if spec.action:
        return spec.load("action")(cfg)
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        cfg.run = HydraConfig.get().runtime.output_dir  # one run directory per sweep point
        if _running_under_submitit_sweep():  # Hydra's launcher already put us in a Slurm task
            cfg.cluster.kind = ClusterKind.inline
    run_dir = Path(cfg.run).absolute()
    job_cfg = OmegaConf.to_object(cfg.job)
    # A builder's checks of the job's config and inputs raise PuyuError (ConfigError, ServingError,
    # EvalError, ...), printed as one line by _hydra_entry; anything else is a bug and keeps its traceback.
    stages = spec.load("stages")(job_cfg)
    pipeline = Pipeline(stages, run_dir, OmegaConf.to_object(cfg.cluster), OmegaConf.to_object(cfg.launcher),
                        config_yaml=OmegaConf.to_yaml(cfg))
    results = pipeline.run()
    if results is not None:
        report = spec.load("report")(job_cfg, run_dir, results) if spec.report else None
        print(f"run directory: {run_dir}")
        if report:
            print(f"report: {report}")
    return 0


@hydra.main(config_path="pkg://puyu.conf", config_name="config", version_base="1.3")
def _hydra_entry(cfg: DictConfig) -> None:
    try:
        code = run_job(cfg)
    except PuyuError as exc:
        cause = exc.__cause__
        if isinstance(exc, StageFailed) and cause is not None and not isinstance(cause, PuyuError):
            # an inline task's bug: its traceback went nowhere else ("log: this process's output")
            traceback.print_exception(cause, file=sys.stderr)
        print(f"puyu: error: {exc}", file=sys.stderr, flush=True)
        sys.exit(1)
    except KeyboardInterrupt:
        print("puyu: interrupted; unfinished jobs of this run were cancelled", file=sys.stderr, flush=True)
        sys.exit(130)
    if code:
        sys.exit(code)


def main() -> None:
    register_configs()
    try:
        preflight(sys.argv[1:])
    except PuyuError as exc:
        print(f"puyu: error: {exc}", file=sys.stderr)
        sys.exit(2)
    _hydra_entry()
