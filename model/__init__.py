"""The InternLM2 model, single-device; parallelism is applied by ``puyu.parallel``.

Public API: ``ModelArgs``/``get_flavor`` (config), ``Transformer``/``KVCache``/``generate`` (model),
``puyu.model.ops`` (fused ops and their references), ``load_model``/``save_model`` (puyu checkpoints),
``read_model_dir``/``load_hf_model``/``export_hf`` (Hugging Face model directories: Llama, Qwen2,
InternLM2) and ``convert`` (state-dict layouts).
"""
from puyu.model.checkpoint import load_model, load_safetensors, save_model, save_safetensors
from puyu.model.config import FLAVORS, ModelArgs, RopeScaling, get_flavor
from puyu.model.hf import (
    ModelDirError,
    args_from_hf_config,
    export_hf,
    export_llama,
    is_hf_model_dir,
    llama_config,
    load_hf_model,
    read_model_dir,
)
from puyu.model.model import KVCache, Transformer, generate
from puyu.model.state_dict import StateDictError, convert

__all__ = [
    "FLAVORS",
    "KVCache",
    "ModelArgs",
    "ModelDirError",
    "RopeScaling",
    "StateDictError",
    "Transformer",
    "args_from_hf_config",
    "convert",
    "export_hf",
    "export_llama",
    "generate",
    "get_flavor",
    "is_hf_model_dir",
    "llama_config",
    "load_hf_model",
    "load_model",
    "load_safetensors",
    "read_model_dir",
    "save_model",
    "save_safetensors",
]
