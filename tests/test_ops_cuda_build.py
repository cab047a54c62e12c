"""The CUDA kernels in csrc/cuda compile with this machine's nvcc (compile only: no GPU is needed).

Uses the flags torch.utils.cpp_extension gives CUDA extensions, torch's headers and one architecture
(sm_90) to keep it quick. Running the kernels is tests/test_ops_fused.py::test_cuda_kernels_match_reference,
which needs a GPU.
"""
import shutil
import subprocess
from pathlib import Path

import pytest
from torch.utils import cpp_extension

REPO = Path(__file__).resolve().parents[1]
CU_SOURCES = sorted((REPO / "csrc" / "cuda").glob("*.cu"))
NVCC = shutil.which("nvcc") or ("/usr/local/bin/nvcc" if Path("/usr/local/bin/nvcc").exists() else None)


@pytest.mark.skipif(NVCC is None, reason="no nvcc (CUDA toolkit) on this machine")
def test_cuda_sources_compile_with_nvcc(tmp_path):
    assert {p.name for p in CU_SOURCES} >= {"rms_norm.cu", "rope.cu", "swiglu.cu", "cross_entropy.cu"}
    # One translation unit including every .cu: torch's headers are parsed once instead of per file
    # (each file alone takes as long as all of them together); the kernels live in distinct names.
    unity = tmp_path / "all_kernels.cu"
    unity.write_text("".join(f'#include "{src}"\n' for src in CU_SOURCES))
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    cmd = [NVCC, "-c", str(unity), "-o", str(tmp_path / "all_kernels.o"), "-std=c++20", "-DWITH_CUDA",
           *cpp_extension.COMMON_NVCC_FLAGS, "-Xcompiler", "-fPIC", "-gencode", "arch=compute_90,code=sm_90",
           *includes]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"nvcc failed:\n{res.stderr[-4000:]}"
    symbols = subprocess.run(["nm", "-C", str(tmp_path / "all_kernels.o")], capture_output=True, text=True).stdout
    for entry in ("rms_norm_fwd_cuda", "rms_norm_bwd_cuda", "rope_cuda", "swiglu_fwd_cuda", "swiglu_bwd_cuda",
                  "ce_chunk_cuda"):
        assert f"puyu::{entry}(" in symbols, f"{entry} missing from the compiled object"
