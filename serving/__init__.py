"""Engine builds and the paged, continuously batched runtime for offline batch inference.

Public API: ``LLM``/``RequestOutput`` (the runtime), ``SamplingParams``/``RuntimeConfig`` (what a request
and the runtime are told), ``build_engine``/``load_engine`` (engine directories),
``puyu.serving.job`` (``job=infer``/``job=build_engine`` stages), ``puyu.serving.server`` (HTTP) and
``puyu.serving.ops`` (the runtime's CPU kernels, extension ``puyu.serving._serving_ops``, and their references).
"""
import importlib

from puyu.serving.config import (
    BuildConfig,
    BuildEngineJobConfig,
    InferJobConfig,
    RuntimeConfig,
    SamplingParams,
    ServingError,
)

# The runtime pulls in torch; the configs above do not. The ``puyu`` command imports the configs to
# register them, so the runtime is imported only when first used.
_LAZY = {"LLM": "puyu.serving.llm", "RequestOutput": "puyu.serving.llm",
         "build_engine": "puyu.serving.build", "load_engine": "puyu.serving.engine"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'puyu.serving' has no attribute {name!r}")

__all__ = [
    "LLM",
    "BuildConfig",
    "BuildEngineJobConfig",
    "InferJobConfig",
    "RequestOutput",
    "RuntimeConfig",
    "SamplingParams",
    "ServingError",
    "build_engine",
    "load_engine",
]
