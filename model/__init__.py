"""The InternLM2 model, single-device; parallelism is applied by ``puyu.parallel``."""
