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
        "numba>=0.60",
        "numpy>=1.26",
        "datasketch==2.0.0",
        "megatron-core==0.16.1",
        "deepspeed==0.19.8",
        "safetensors>=0.4",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-timeout>=2.3"],
        "dev": ["pytest>=8", "pytest-timeout>=2.3", "ruff"],
    },
    entry_points={"console_scripts": ["puyu = puyu.launcher.cli:main"]},
)
