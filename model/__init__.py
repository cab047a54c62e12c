"""The InternLM2 model, single-device; parallelism is applied by ``puyu.parallel``.

Public API: ``ModelArgs``/``get_flavor`` (config), ``Transformer``/``KVCache``/``generate`` (model),
``puyu.model.ops`` (fused ops and their references), ``load_model``/``save_model``/``export_llama``
(checkpoints) and ``convert`` (state-dict layouts).
"""
from puyu.model.checkpoint import (
    args_from_hf_config,
    export_llama,
    llama_config,
    load_model,
    load_safetensors,
    save_model,
    save_safetensors,
)
from puyu.model.config import FLAVORS, ModelArgs, RopeScaling, get_flavor
from puyu.model.model import KVCache, Transformer, generate
from puyu.model.state_dict import StateDictError, convert

__all__ = [
    "FLAVORS",
    "KVCache",
    "ModelArgs",
    "RopeScaling",
    "StateDictError",
    "Transformer",
    "args_from_hf_config",
    "convert",
    "export_llama",
    "generate",
    "get_flavor",
    "llama_config",
    "load_model",
    "load_safetensors",
    "save_model",
    "save_safetensors",
]
