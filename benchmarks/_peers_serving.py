"""CTranslate2 as a peer of ``bench_serving.py``: the same Hugging Face directory converted by its own
``TransformersConverter`` (float32, and int8 weights), run through ``Generator.generate_batch`` over the
benchmark's prompt token ids, greedy, exactly ``max_tokens`` new tokens each (no end token)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import ctranslate2

from puyu.serving.tokenizer import EOD, TextTokenizer

CT2_TYPES = ("float32", "int8")  # the conversion's quantization, then the compute type the generator runs in


class _Converter(ctranslate2.converters.TransformersConverter):
    """The converter, handed the benchmark's own BPE when the directory has no tokenizer (its vocabulary
    names the token ids; its end of text, never generated here, stands for BOS and EOS)."""

    def __init__(self, model_dir: Path, tokenizer: TextTokenizer | None):
        super().__init__(str(model_dir))
        self.tokenizer = tokenizer

    def load_tokenizer(self, tokenizer_class, model_name_or_path, **kwargs):
        if self.tokenizer is None:
            return super().load_tokenizer(tokenizer_class, model_name_or_path, **kwargs)
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast(tokenizer_object=self.tokenizer.tok, bos_token=EOD, eos_token=EOD)


def convert_ct2(model_dir: Path, tokenizer: TextTokenizer | None, out: Path) -> dict[str, Path]:
    """{compute type: converted directory} under ``out``; ``tokenizer`` when ``model_dir`` has no tokenizer
    of its own."""
    dirs = {}
    for ct in CT2_TYPES:
        dirs[ct] = out / f"ct2_{ct}"
        _Converter(model_dir, tokenizer).convert(str(dirs[ct]), quantization=ct, force=True)
    return dirs


def run_ct2(model: Path, compute_type: str, prompts: list[list[int]], max_tokens: int, threads: int,
            max_batch_size: int) -> tuple[float, float, list[list[int]]]:
    """Wall and CPU seconds of one ``generate_batch`` over all prompts, and the new token ids of each."""
    vocab = json.loads((model / "vocabulary.json").read_text())  # id -> the token string CTranslate2 takes
    gen = ctranslate2.Generator(str(model), device="cpu", compute_type=compute_type, intra_threads=threads,
                                inter_threads=1)
    start = [[vocab[i] for i in p] for p in prompts]
    t0, c0 = time.perf_counter(), time.process_time()
    res = gen.generate_batch(start, max_batch_size=max_batch_size, sampling_topk=1, max_length=max_tokens,
                             min_length=max_tokens, end_token=[], include_prompt_in_result=False)
    return time.perf_counter() - t0, time.process_time() - c0, [r.sequences_ids[0] for r in res]
