"""Offline batch inference: puyu's runtime vs Hugging Face ``generate`` on the same model and prompts.

The model is puyu's ``tiny`` flavor (random weights; throughput does not depend on what the weights
learned), exported with ``export_llama`` and loaded by ``transformers`` as ``LlamaForCausalLM``. Both
sides get the same 256 real prompts (Wikipedia leads, 8-64 words, through a BPE trained on the leads),
greedy decoding of exactly ``--max-tokens`` tokens each (EOS ignored), fp32, the same torch threads.
HF runs the whole batch in one left-padded ``generate`` call; puyu runs
``LLM.generate`` with its defaults (continuous batching, paged KV, prefix caching, chunked prefill).
Runs alternate HF, puyu, HF, puyu... (``--repeats`` each) so load changes on a shared machine hit both;
reported: wall and CPU seconds of every run, output tokens/s of the best run of each, and how many
outputs agree token for token. The last line is the ratio of best wall times.

Run: ``.venv/bin/python benchmarks/bench_serving.py [--prompts 256 --max-tokens 64 --threads 2]``

``--model DIR``: the same comparison on a model directory written by ``transformers`` (Llama or Qwen2),
which both sides load from disk: puyu through its model-directory loader (an unquantized in-memory
engine, as ``puyu job=infer job.engine=DIR`` serves it), HF through ``AutoModelForCausalLM``. Prompts
are the same leads through the directory's own tokenizer when it has one, else through the BPE above
(ids valid in any vocabulary of 2000 or more). ``--write-model DIR`` first writes such a directory:
a 12-layer, 768-wide Llama with a 32000-token vocabulary (~110M parameters, random weights) saved by
``transformers``' own ``save_pretrained``.

On the CPU, CTranslate2 (``_peers_serving.py``) runs beside them on the same prompts and threads: the
HF directory converted by its ``TransformersConverter`` to float32 and to int8 weights, one
``Generator.generate_batch`` over all prompts (``--ct2-batch`` 32 at a time, sorted by length), greedy,
exactly ``--max-tokens`` new tokens (no end token), prompts not echoed. puyu fp32 is measured against
CTranslate2 float32 and puyu's w8 engine (weight-only int8 per channel, built as ``--quant`` builds it)
against CTranslate2 int8 (int8 weights, activations quantized per call); one ratio line each, before the
HF line. The order of runs is then HF, puyu fp32, CTranslate2 float32, puyu w8, CTranslate2 int8.

``--device cuda``: both sides on the GPU in bf16 (what the runtime's ``dtype=auto`` picks there; HF's
``generate`` with the same weights in bf16), timed to the end of the device's work. The first run of each
side also pays for CUDA's start-up, so give ``--repeats`` 2 or more.

``--quant-linears``: the quantized linears alone against fp32's oneDNN-packed matmul, per pass over the
``small`` flavor's 48 linears at 1 and 32 rows (the kernels without the rest of the runtime).

``--quant``: instead, puyu alone, decode speed of quantized engines against fp32 on a ~125M-parameter
model: ``--model DIR`` (a transformers-written directory, e.g. from ``--write-model``) or, without it, the
``small`` flavor (12 layers, dim 768, 12/4 heads, FFN 2048) at vocab 32000 with random weights. Its
linears are quantized to w8, w4 (groups of 128) and w8a8 without calibration (a random model's accuracy
says nothing; speed does not depend on the weights' values); embeddings and the output head stay fp32.
For each engine and batch size (1 and 32 sequences of 16-token prompts): the prompts are prefilled, then
``--decode-steps`` decode steps are timed (tokens generated per second). Engines and batch sizes
alternate within each repeat, so load changes hit all of them; reported: the median tokens/s of each
and the median over repeats of each repeat's quantized/fp32 ratio.

``--speculative ngram``: instead, prompt-lookup speculative decoding where the output repeats text.
The ``tiny`` flavor is first trained (``--train-steps`` 300: 68 s on 2 threads) on 40-word Wikipedia
leads each followed by a blank line and the lead again, to teach it to copy; each prompt is a held-out
lead, a blank line and its first 4 words, continued greedily (up to ``--max-tokens``, stopping at EOS).
At 300 steps the model has not learned to copy the lead: drafts are accepted where its output repeats
its own phrases (docs/benchmarks.md). Compared, interleaved per repeat: HF ``generate`` plain and with
``prompt_lookup_num_tokens`` (batch 1 only in transformers, so prompt by prompt), puyu ``speculative=off``
and ``ngram`` prompt by prompt, and puyu off and ngram over all prompts at once (continuous batching).
Both sides draft ``--spec-tokens`` tokens from n-grams of up to ``--lookup-max`` tokens down to 1.
Reported: best wall time and output tokens/s of each, puyu's drafted/accepted tokens, and identical
outputs. The last line is puyu ngram's batch-1 speed against HF prompt lookup's.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # toy_models: the tests' trained tiny model

from puyu.model import Transformer, export_llama, get_flavor
from puyu.serving.config import RuntimeConfig, SamplingParams
from puyu.serving.llm import LLM
from puyu.serving.tokenizer import TextTokenizer
from toy_models import make_tokenizer, wiki_texts


def prompts_for(texts: list[str], n: int, shared_prefix_words: int = 0) -> list[str]:
    """Leads of the last ``n`` articles cut to 8-64 words, optionally after one shared passage (as when
    every request carries the same instructions or few-shot examples)."""
    prefix = " ".join(texts[0].split()[:shared_prefix_words]) + "\n\n" if shared_prefix_words else ""
    return [prefix + " ".join(t.split()[: 8 + (i * 13) % 57]) for i, t in enumerate(texts[-n:])]


def write_model(out: Path) -> None:
    """A ~110M-parameter Llama (12 layers, dim 768, 12 heads / 4 KV heads, vocab 32000), random weights,
    written by transformers itself."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                         num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=2048)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    print(f"wrote {out}: LlamaForCausalLM, {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters")


DTYPES = {"cpu": "float32", "cuda": "bfloat16"}  # --device -> the dtype both sides run in


def run_hf(export_dir: Path, prompts: list[list[int]], max_tokens: int, pad_id: int,
           device: str = "cpu") -> tuple[float, float, list[list[int]]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(export_dir, dtype=getattr(torch, DTYPES[device])).eval().to(device)
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding, as decoder-only generation needs
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                             do_sample=False, pad_token_id=pad_id)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, time.process_time() - c0, out[:, width:].tolist()


def run_puyu(model, prompts: list[list[int]], max_tokens: int,
             device: str = "cpu") -> tuple[float, float, list[list[int]]]:
    """``model``: a training-side model (turned into an in-memory engine), a model directory or an
    ``EngineModel``."""
    runtime = RuntimeConfig(kv_cache_mb=512, max_num_seqs=256, max_num_batched_tokens=2048, device=device,
                            dtype=DTYPES[device])
    llm = LLM.from_model(model, runtime=runtime) if isinstance(model, Transformer) else LLM(model, runtime=runtime)
    t0, c0 = time.perf_counter(), time.process_time()
    outs = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    return time.perf_counter() - t0, time.process_time() - c0, [o.token_ids for o in outs]


QUANT_MODES = ("fp32", "w8", "w4", "w8a8")


def quant_engines(model_dir: Path | None, modes: tuple[str, ...] = QUANT_MODES) -> tuple:
    """(ModelArgs, {mode: EngineModel}) for each of ``modes`` (fp32 and quantized ones), from ``model_dir``
    or the random ``small`` flavor at vocab 32000."""
    from puyu.model.state_dict import puyu_state_dict
    from puyu.serving.engine import engine_from_model_dir, engine_tensors
    from puyu.serving.engine_model import LINEARS, EngineModel
    from puyu.serving.quant import quantize_linear

    if model_dir:
        engine = engine_from_model_dir(model_dir)
        args, base = engine.args, engine.tensors
    else:
        torch.manual_seed(0)
        args = get_flavor("small", vocab_size=32000)
        base = engine_tensors(args, {k: v.detach() for k, v in puyu_state_dict(Transformer(args).eval()).items()})
    engines = {}
    for mode in modes:
        if mode == "fp32":
            engines[mode] = EngineModel(args, base)
            continue
        t = dict(base)
        for i in range(args.n_layers):
            for name in LINEARS:
                key = f"layers.{i}.{name}"
                parts, _ = quantize_linear(t.pop(key + ".weight"), mode, 128, None)
                t.update({f"{key}.{k}": v for k, v in parts.items()})
        engines[mode] = EngineModel(args, t)
    return args, engines


def decode_rate(model, batch: int, steps: int) -> float:
    """Tokens/s of ``steps`` decode steps of ``batch`` sequences (16-token prompts, prefilled first)."""
    llm = LLM(model, runtime=RuntimeConfig(num_blocks=batch * 4 + 8))
    sp = SamplingParams(max_tokens=steps + 4, ignore_eos=True)
    seqs = [llm.prepare(i, [(7 * i + j) % 1999 + 1 for j in range(16)], sp) for i in range(batch)]
    for seq in seqs:
        llm.add(seq)
    outputs: dict = {}
    while any(not seq.output for seq in seqs):  # prefill
        llm.step(outputs)
    t0, made = time.perf_counter(), 0
    for _ in range(steps):
        made += llm.step(outputs)[2]
    return made / (time.perf_counter() - t0)


def bench_quant(model_dir: Path | None, repeats: int, steps: int) -> None:
    args, engines = quant_engines(model_dir)
    print(f"model: {model_dir or 'small flavor, random weights'}; {args.num_params() / 1e6:.0f}M parameters")
    batches = {1: steps, 32: max(2, steps // 2)}
    rates: dict[tuple[str, int], list[float]] = {}
    for _ in range(repeats):  # interleaved: every engine and batch size once per repeat
        for batch, n in batches.items():
            for mode, model in engines.items():
                rates.setdefault((mode, batch), []).append(decode_rate(model, batch, n))
    for batch in batches:
        base = rates[("fp32", batch)]
        for mode in engines:
            runs = rates[(mode, batch)]
            ratio = statistics.median(r / b for r, b in zip(runs, base))
            print(f"batch {batch:2d} {mode:5s}: decode tokens/s {[round(r, 1) for r in runs]}, median "
                  f"{statistics.median(runs):.1f}; {ratio:.2f}x fp32 (median of per-repeat ratios)")


def bench_quant_linears(repeats: int) -> None:
    """The quantized linears alone: one pass over the ``small`` flavor's 12 x 4 linears (distinct weights,
    so they stream from memory as in decoding) at M = 1 and 32 rows, fp32 (oneDNN-packed) and each mode
    interleaved; median wall time of ``repeats`` passes and the speed-up over fp32."""
    from puyu.serving.engine_model import onednn_packed, packed_linear
    from puyu.serving.qlinear import QuantLinear
    from puyu.serving.quant import quantize

    a = get_flavor("small")
    shapes = [((a.n_heads + 2 * a.n_kv_heads) * a.head_dim, a.dim), (a.dim, a.dim), (2 * a.ffn_hidden_dim, a.dim),
              (a.dim, a.ffn_hidden_dim)] * a.n_layers  # [O, I]: wqkv, wo, w13, w2
    torch.manual_seed(0)
    weights = [torch.randn(o, i) / i ** 0.5 for o, i in shapes]
    linears = {"fp32": [lambda x, p=onednn_packed(w): packed_linear(x, p) for w in weights]}
    for mode in QUANT_MODES[1:]:
        linears[mode] = [QuantLinear(quantize(w, "w4" if mode == "w4" else "w8", 128, None) | (
            {"act_bits": torch.tensor(8)} if mode == "w8a8" else {}), torch.float32) for w in weights]
    for m in (1, 32):
        xs = {i: torch.randn(m, i) for i in {i for _, i in shapes}}
        times: dict[str, list[float]] = {mode: [] for mode in linears}
        for _ in range(repeats + 1):  # the first pass warms up, not counted
            for mode, fns in linears.items():
                t0 = time.perf_counter()
                for fn, (_, i) in zip(fns, shapes):
                    fn(xs[i])
                times[mode].append(time.perf_counter() - t0)
        base = statistics.median(times["fp32"][1:])
        print(f"M = {m:2d}: " + ", ".join(f"{mode} {statistics.median(t[1:]) * 1e3:.1f} ms "
                                          f"({base / statistics.median(t[1:]):.2f}x)" for mode, t in times.items()))


def copy_model(texts: list[str], tok: TextTokenizer, steps: int) -> Transformer:
    """The tiny flavor trained on 40-word leads each followed by a blank line and itself."""
    from toy_models import train_tiny

    leads = [" ".join(t.split()[:40]) for t in texts[:6000]]
    return train_tiny([lead + "\n\n" + lead for lead in leads], tok, steps=steps, seq_len=96, lr=5e-3)


def bench_speculative(args, texts: list[str], tok: TextTokenizer, tmp: Path) -> None:
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    model = copy_model(texts, tok, args.train_steps)
    print(f"trained the tiny flavor {args.train_steps} steps on leads + their copies ({time.perf_counter() - t0:.0f} s)")
    leads = [" ".join(t.split()[:40]) for t in texts[-args.prompts:]]
    prompts = [tok.encode(lead + "\n\n" + " ".join(lead.split()[:4])) for lead in leads]
    eos, k, n_max = tok.eos_id, args.spec_tokens, args.lookup_max
    export_llama(model, tmp / "llama")
    hf = AutoModelForCausalLM.from_pretrained(tmp / "llama", dtype=torch.float32).eval()

    def hf_run(lookup: bool) -> list[list[int]]:
        extra = dict(prompt_lookup_num_tokens=k, max_matching_ngram_size=n_max) if lookup else {}
        outs = []
        with torch.no_grad():
            for p in prompts:
                out = hf.generate(input_ids=torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                  max_new_tokens=args.max_tokens, do_sample=False, eos_token_id=eos,
                                  pad_token_id=eos, **extra)
                outs.append(out[0, len(p):].tolist())
        return outs

    llms = {mode: LLM.from_model(model, tok, runtime=RuntimeConfig(
        speculative=mode, num_speculative_tokens=k, prompt_lookup_max=n_max, prompt_lookup_min=1))
        for mode in ("off", "ngram")}
    drafts = [0, 0, 0]  # puyu ngram prompt by prompt: steps, drafted, accepted (the last repeat's)

    def puyu_run(mode: str, batch_1: bool) -> list[list[int]]:
        llm, sp = llms[mode], SamplingParams(max_tokens=args.max_tokens)
        if not batch_1:
            return [o.token_ids for o in llm.generate(prompts, sp)]
        outs = []
        if mode == "ngram":
            drafts[:] = [0, 0, 0]
        for p in prompts:
            outs += llm.generate([p], sp)
            if mode == "ngram":
                drafts[:] = [a + llm.stats[key] for a, key in zip(drafts, ("steps", "speculative_drafted", "speculative_accepted"))]
        return [o.token_ids for o in outs]

    runs = {"HF generate (batch 1)": lambda: hf_run(False),
            f"HF generate prompt_lookup_num_tokens={k} (batch 1)": lambda: hf_run(True),
            "puyu off (batch 1)": lambda: puyu_run("off", True), "puyu ngram (batch 1)": lambda: puyu_run("ngram", True),
            f"puyu off ({len(prompts)} at once)": lambda: puyu_run("off", False),
            f"puyu ngram ({len(prompts)} at once)": lambda: puyu_run("ngram", False)}
    times: dict[str, list[float]] = {name: [] for name in runs}
    outs: dict[str, list[list[int]]] = {}
    for _ in range(args.repeats):  # interleaved, so a change of machine load hits every variant
        for name, fn in runs.items():
            t = time.perf_counter()
            outs[name] = fn()
            times[name].append(time.perf_counter() - t)
    print(f"{len(prompts)} prompts ({min(map(len, prompts))}-{max(map(len, prompts))} tokens), greedy up to "
          f"{args.max_tokens} tokens or EOS, drafts of {k} from n-grams of {n_max} down to 1, "
          f"{args.threads} threads, torch {torch.__version__}")
    names = list(runs)
    for name in names:
        n_out = sum(map(len, outs[name]))
        print(f"{name}: wall s {[round(t, 2) for t in times[name]]}; {n_out} tokens, best "
              f"{n_out / min(times[name]):.1f} output tokens/s")
    spec = llms["ngram"].stats  # of the last run: all prompts at once
    print(f"puyu ngram prompt by prompt: {drafts[0]} steps, drafted {drafts[1]} tokens, accepted {drafts[2]}; "
          f"all at once: {spec['steps']} steps ({llms['off'].stats['steps']} with off), drafted "
          f"{spec['speculative_drafted']}, accepted {spec['speculative_accepted']}")
    ref = outs[names[0]]
    for name in names[1:]:
        print(f"{name}: outputs identical to HF generate's: {sum(a == b for a, b in zip(outs[name], ref))}/{len(ref)}")
    ratio = min(times[names[1]]) / min(times[names[3]])
    print(f"puyu offline batch inference speculative ngram (batch 1) output tokens/s: {ratio:.2f}x vs HF "
          f"transformers generate prompt lookup")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--shared-prefix-words", type=int, default=0, help="one passage of this many words before every prompt")
    ap.add_argument("--quant", action="store_true", help="decode tokens/s of fp32, w8, w4 and w8a8 engines (puyu only)")
    ap.add_argument("--quant-linears", action="store_true", help="the quantized linears alone vs fp32 (M = 1, 32)")
    ap.add_argument("--decode-steps", type=int, default=24, help="--quant: decode steps timed at batch 1 (half at 32)")
    ap.add_argument("--model", type=Path, help="a transformers-written model directory both sides load")
    ap.add_argument("--write-model", type=Path, help="first write a 125M-parameter Llama there (then used as --model)")
    ap.add_argument("--device", choices=list(DTYPES), default="cpu", help="where both sides run (cuda: in bf16)")
    ap.add_argument("--ct2-batch", type=int, default=32, help="CTranslate2's max_batch_size (prompts sorted by length)")
    ap.add_argument("--speculative", choices=["off", "ngram"], default="off",
                    help="ngram: prompt-lookup speculative decoding on prompts the output copies (puyu vs HF)")
    ap.add_argument("--train-steps", type=int, default=300, help="--speculative: training steps of the copying model")
    ap.add_argument("--spec-tokens", type=int, default=5, help="--speculative: drafted tokens a step")
    ap.add_argument("--lookup-max", type=int, default=3, help="--speculative: longest n-gram looked up")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.write_model:
        write_model(args.write_model)
        args.model = args.write_model
    if args.quant_linears:
        print(f"quantized linears of the small flavor, {args.threads} threads, torch {torch.__version__}")
        bench_quant_linears(max(args.repeats, 7))
        return
    if args.quant:
        print(f"quantized engines: decode at batch 1 and 32, {args.threads} threads, torch {torch.__version__}")
        bench_quant(args.model, args.repeats, args.decode_steps)
        return
    texts = wiki_texts()
    with tempfile.TemporaryDirectory() as tmp:
        tok = make_tokenizer(texts[:3000], Path(tmp) / "tokenizer.json", vocab_size=2000)
        if args.speculative == "ngram":
            bench_speculative(args, texts, tok, Path(tmp))
            return
        own_tokenizer = args.model and any((args.model / f).is_file() for f in ("tokenizer.json", "tokenizer.model"))
        if own_tokenizer:
            tok = TextTokenizer(args.model)
        prompts = [tok.encode(p) for p in prompts_for(texts, args.prompts, args.shared_prefix_words)]
        if args.model:
            model, hf_dir = args.model, args.model
        else:
            torch.manual_seed(0)
            model = Transformer(get_flavor("tiny", vocab_size=tok.tok.get_vocab_size())).eval()
            hf_dir = Path(tmp) / "llama"
            export_llama(model, hf_dir)
        n_out = args.prompts * args.max_tokens
        print(f"model: {args.model or 'tiny flavor'}; {args.prompts} prompts ({min(map(len, prompts))}-{max(map(len, prompts))} tokens, "
              f"shared prefix of {args.shared_prefix_words} words), "
              f"{args.max_tokens} new tokens each, {args.threads} threads, torch {torch.__version__}")
        if args.device != "cpu":
            print(f"both sides on {args.device} ({torch.cuda.get_device_name()}) in {DTYPES[args.device]}")
        runs = {"HF transformers generate": lambda: run_hf(hf_dir, prompts, args.max_tokens, 0, args.device),
                "puyu LLM.generate": lambda: run_puyu(model, prompts, args.max_tokens, args.device)}
        peers = {}  # puyu name -> the peer it is measured against
        if args.device == "cpu":
            from _peers_serving import convert_ct2, run_ct2

            ct2 = convert_ct2(hf_dir, None if own_tokenizer else tok, Path(tmp))
            w8 = quant_engines(hf_dir, ("w8",))[1]["w8"]
            runs |= {"CTranslate2 float32": lambda: run_ct2(ct2["float32"], "float32", prompts, args.max_tokens,
                                                            args.threads, args.ct2_batch),
                     "puyu w8": lambda: run_puyu(w8, prompts, args.max_tokens),
                     "CTranslate2 int8": lambda: run_ct2(ct2["int8"], "int8", prompts, args.max_tokens,
                                                         args.threads, args.ct2_batch)}
            peers = {"puyu LLM.generate": ("puyu fp32", "CTranslate2 float32"),
                     "puyu w8": ("puyu w8", "CTranslate2 int8")}
        res: dict[str, list] = {name: [] for name in runs}
        for _ in range(args.repeats):  # interleaved, so a change of machine load hits every side
            for name, fn in runs.items():
                res[name].append(fn())
        hf, pu = res["HF transformers generate"], res["puyu LLM.generate"]
        for name, r in res.items():
            print(f"{name}: wall s {[round(x[0], 2) for x in r]}, CPU s {[round(x[1], 2) for x in r]}; "
                  f"best {n_out / min(x[0] for x in r):.1f} output tokens/s")
        for name, r in list(res.items())[1:]:
            print(f"{name}: outputs identical to HF's token for token: "
                  f"{sum(a == b for a, b in zip(r[0][2], hf[0][2]))}/{args.prompts}")
        for name, (label, peer) in peers.items():
            print(f"{label}: {min(x[0] for x in res[peer]) / min(x[0] for x in res[name]):.2f}x vs {peer} (goal 1.0x)")
        cpu_ratio = min(r[1] for r in hf) / min(r[1] for r in pu)
        print(f"CPU-time ratio (best of each): {cpu_ratio:.2f}x")
        ratio = min(r[0] for r in hf) / min(r[0] for r in pu)
        what = "shared-prefix " if args.shared_prefix_words else ""
        print(f"puyu offline batch inference {what}output tokens/s: {ratio:.2f}x vs HF transformers generate (goal 3x)")


if __name__ == "__main__":
    main()
