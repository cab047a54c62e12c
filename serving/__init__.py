"""Engine builds and the paged, continuously batched runtime for offline batch inference.

Public API: ``LLM``/``RequestOutput`` (the runtime), ``SamplingParams``/``RuntimeConfig`` (what a request
and the runtime are told), ``build_engine``/``load_engine`` (engine directories),
``puyu.serving.job`` (``job=infer``/``job=build_engine`` stages) and ``puyu.serving.server`` (HTTP).
"""
from puyu.serving.build import build_engine
from puyu.serving.config import (
    BuildConfig,
    BuildEngineJobConfig,
    InferJobConfig,
    RuntimeConfig,
    SamplingParams,
    ServingError,
)
from puyu.serving.engine import load_engine
from puyu.serving.llm import LLM, RequestOutput

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
