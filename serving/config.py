"""Configuration of serving: sampling, the runtime, engine builds and the batch-inference job.

Plain dataclasses with OmegaConf-friendly field types, so ``puyu job=infer``/``job=build_engine`` can
store them in Hydra's ConfigStore and a misspelt key fails at composition. Validation raises
``ServingError`` with one line naming the offending field.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from puyu.launcher.config import JobConfig
from puyu.launcher.distributed import check_device as check_device_setting
from puyu.launcher.errors import PuyuError


class ServingError(PuyuError, ValueError):
    """A bad request, config or engine: the message names the field, file or tensor at fault.

    A :class:`PuyuError` (the ``puyu`` command prints it as one line) and a ``ValueError`` (for callers
    that catch that).
    """


RUNTIME_DTYPES = ("auto", "float32", "bfloat16", "float16")
MAX_TOP_LOGPROBS = 20  # OpenAI's limit


def check_device(key: str, value: str) -> None:
    """``launcher.distributed.check_device`` raising ``ServingError``."""
    check_device_setting(key, value, ServingError)


@dataclasses.dataclass
class SamplingParams:
    """How one request is decoded. ``temperature == 0`` is greedy (top_k/top_p are then ignored).

    ``logprobs``/``prompt_logprobs`` return the model's own log-probability of each chosen/prompt token
    (from the raw logits, before penalties and temperature: what evaluation scores with).
    ``prompt_logprobs_start``: prompt positions before it get None instead (as position 0 always does),
    and the prompt's KV blocks that lie wholly before position ``prompt_logprobs_start - 1`` (whose logit
    predicts the first token asked for) may come from the prefix cache: scoring continuations of one
    shared context computes the context once.
    """

    max_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0  # 0: all tokens
    top_p: float = 1.0
    repetition_penalty: float = 1.0  # CTRL-style: logits of seen tokens divided (>0) / multiplied (<0)
    stop: list[str] = dataclasses.field(default_factory=list)
    ignore_eos: bool = False
    seed: Optional[int] = None  # per-request generator; None: drawn from the runtime's seed and request index
    logprobs: bool = False
    top_logprobs: int = 0  # also the log-probabilities of the most likely tokens at each output position
    prompt_logprobs: bool = False
    prompt_logprobs_start: int = 0  # first prompt position whose logprob is returned (earlier: None)

    @property
    def greedy(self) -> bool:
        """The next token is the argmax of the raw logits (temperature 0 and no repetition penalty)."""
        return self.temperature == 0 and self.repetition_penalty == 1.0

    def validate(self) -> None:
        checks = [
            (isinstance(self.max_tokens, int) and self.max_tokens >= 1, "max_tokens must be an integer >= 1"),
            (self.temperature >= 0, "temperature must be >= 0"),
            (isinstance(self.top_k, int) and self.top_k >= 0, "top_k must be an integer >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (all(isinstance(s, str) and s for s in self.stop), "stop must be a list of non-empty strings"),
            (isinstance(self.top_logprobs, int) and 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS,
             f"top_logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}]"),
            (isinstance(self.prompt_logprobs_start, int) and self.prompt_logprobs_start >= 0,
             "prompt_logprobs_start must be an integer >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ServingError(f"sampling: {message} (got {dataclasses.asdict(self)})")

    @classmethod
    def from_dict(cls, values: dict, base: Optional["SamplingParams"] = None) -> "SamplingParams":
        """``base`` with the keys of ``values`` replaced; an unknown key is an error naming it."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ServingError(f"sampling: unknown key(s) {unknown}; known: {sorted(known)}")
        values = dict(values)
        if isinstance(values.get("stop"), str):
            values["stop"] = [values["stop"]]
        params = dataclasses.replace(base or cls(), **values)
        params.validate()
        return params


@dataclasses.dataclass
class RuntimeConfig:
    """Where the runtime computes, and its memory and batching limits.

    ``device`` auto: CUDA when the process that builds the runtime sees a GPU, else the CPU; ``dtype``
    auto: bf16 for an unquantized engine on CUDA, else the engine's own (a quantized engine keeps the
    float dtype it was built in; an explicit dtype casts its float tensors too). A training-side model
    (``LLM.from_model``) and an ``EngineModel`` stay where and as they are under auto.
    KV memory is fixed up front: ``kv_cache_mb`` (or ``num_blocks`` when > 0) of ``block_size``-token
    blocks; the scheduler never uses more. ``max_num_batched_tokens`` caps the tokens of one forward pass
    (long prompts are prefilled in chunks of at most that many).
    ``speculative`` ngram: greedy requests draft up to ``num_speculative_tokens`` tokens by prompt lookup
    (their last ``prompt_lookup_max`` down to ``prompt_lookup_min`` tokens found earlier in prompt +
    output) and verify them in one forward pass (``serving/speculative.py``); same greedy output.
    """

    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16: weights, activations and the fp KV cache

    block_size: int = 16
    num_blocks: int = 0  # > 0 overrides kv_cache_mb
    kv_cache_mb: int = 256
    kv_dtype: str = "fp"  # fp: the engine's build.kv (the weights' dtype unless built int8) | int8: per token and head scales
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 512
    prefix_caching: bool = True
    max_model_len: int = 0  # 0: the model's max_seq_len
    threads: int = 0  # torch intra-op threads; 0 = leave torch's default
    cpu_alloc_cache_mb: int = 1024  # freed CPU activations kept for reuse during generate (host_memory); 0 = off
    seed: int = 0
    speculative: str = "off"  # off | ngram
    num_speculative_tokens: int = 5
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 2

    def validate(self) -> None:
        check_device("runtime.device", self.device)
        if self.dtype not in RUNTIME_DTYPES:
            raise ServingError(f"runtime.dtype={self.dtype!r}; choose one of {', '.join(RUNTIME_DTYPES)}")
        if self.kv_dtype not in ("fp", "int8"):
            raise ServingError(f"runtime.kv_dtype must be fp or int8, got {self.kv_dtype!r}")
        if self.cpu_alloc_cache_mb < 0:
            raise ServingError(f"runtime.cpu_alloc_cache_mb must be >= 0, got {self.cpu_alloc_cache_mb}")
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "num_speculative_tokens",
                     "prompt_lookup_min"):
            if getattr(self, name) < 1:
                raise ServingError(f"runtime.{name} must be >= 1, got {getattr(self, name)}")
        if self.speculative not in ("off", "ngram"):
            raise ServingError(f"runtime.speculative must be off or ngram, got {self.speculative!r}")
        if self.prompt_lookup_max < self.prompt_lookup_min:
            raise ServingError(f"runtime.prompt_lookup_max must be >= runtime.prompt_lookup_min "
                               f"({self.prompt_lookup_min}), got {self.prompt_lookup_max}")


@dataclasses.dataclass
class BuildConfig:
    """How an engine is built: ``quant`` none|w8|w4 (weight-only) or w8a8 (SmoothQuant: int8 weights and
    per-token int8 activations), ``kv`` fp|int8 (the runtime default).

    ``device`` only says where the build computes; the engine it writes holds CPU tensors either way."""

    quant: str = "none"
    kv: str = "fp"
    group_size: int = 128  # w4 groups along the input dimension
    awq: bool = True  # calibrated input-channel scales (AWQ for w8/w4, SmoothQuant for w8a8) and clip search
    calib_file: str = ""  # real text, one document per line or a wiki-summaries JSON; "" = the wiki summaries
    calib_docs: int = 64
    eval_docs: int = 64  # held-out documents (disjoint from calibration) for the perplexity report
    seq_len: int = 256
    dtype: str = "float32"
    device: str = "auto"  # auto | cpu | cuda: where the perplexity and AWQ calibration forwards run

    def validate(self) -> None:
        check_device("build.device", self.device)
        if self.quant not in ("none", "w8", "w4", "w8a8"):
            raise ServingError(f"build.quant must be none, w8, w4 or w8a8, got {self.quant!r}")
        if self.kv not in ("fp", "int8"):
            raise ServingError(f"build.kv must be fp or int8, got {self.kv!r}")
        if self.group_size < 1:
            raise ServingError(f"build.group_size must be >= 1, got {self.group_size}")


@dataclasses.dataclass
class BuildEngineJobConfig(JobConfig):
    """``puyu job=build_engine checkpoint=... build.quant=w4``: checkpoint -> engine directory.

    ``checkpoint``: a Hugging Face model directory (Llama, Qwen2, InternLM2; see ``puyu.model.hf``) or a
    puyu export. ``layout`` auto: what the directory holds (HF ``config.json``'s ``model_type``, else
    puyu, whose shapes ``flavor`` and ``vocab_size`` give). ``out`` "" = ``<run>/build_engine/engine``.
    """

    checkpoint: str = ""
    layout: str = "auto"  # auto | puyu | internlm2 | llama
    flavor: str = "tiny"
    vocab_size: int = 0  # 0: the flavor's (puyu layout only)
    tokenizer: str = ""  # tokenizer.json or an HF tokenizer dir copied into the engine ("" = the checkpoint's own
    # tokenizer when it has one, else none: prompts then are token ids)
    out: str = ""
    build: BuildConfig = dataclasses.field(default_factory=BuildConfig)


@dataclasses.dataclass
class InferJobConfig(JobConfig):
    """``puyu job=infer engine=... input=prompts.jsonl``: sharded offline batch inference.

    Each input line is ``{"prompt": str}``, ``{"messages": [{"role", "content"}...]}`` (InternLM2 chat
    template) or ``{"prompt_token_ids": [int]}``, optionally with ``"id"`` and ``"sampling": {...}``
    overriding ``sampling``. Output: ``<run>/infer/outputs.jsonl``, one record per input line, in order.
    """

    engine: str = ""
    input: str = ""
    shards: int = 4
    sampling: SamplingParams = dataclasses.field(default_factory=SamplingParams)
    runtime: RuntimeConfig = dataclasses.field(default_factory=RuntimeConfig)
