"""Corpus building: read, filter, deduplicate and tokenize text as sharded batch stages."""
