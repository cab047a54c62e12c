"""Corpus building: read, filter, deduplicate and tokenize text as sharded batch stages.

Entry points: :func:`puyu.data_pipeline.job.build_data_stages` turns a
:class:`puyu.data_pipeline.config.DataJobConfig` into the launcher's stages (read_filter ->
minhash_signatures -> minhash_buckets -> minhash_clusters -> minhash_filter -> tokenizer ->
tokenize -> summary); the last one leaves ``<run_dir>/summary/corpus.{bin,idx}`` (Megatron
indexed dataset) and ``summary.{json,md}``. Building blocks: ``document`` (Document, Step, stats),
``readers`` (input files through ``sources``; ``tabular`` and ``warc`` kinds) and ``writers``, ``filters``,
``minhash``/``dedup``, ``tokenize``; ``corpora`` finds the real corpora that ``scripts/fetch_data.sh`` fetches.
"""
