#!/usr/bin/env bash
# What needs a GPU, on a machine with one NVIDIA GPU, this repository, a CUDA toolkit and no internet:
# builds the fused ops extension with its CUDA kernels, runs every `cuda`-marked test (CUDA kernels against
# the PyTorch references, forward and gradients), a 3-step bf16 pretrain of a ~1B flavor reporting MFU
# (scripts/pretrain_mfu.py; eager, then with compiled blocks), the GPU serving benchmark on the 125M Llama
# that bench_serving.py writes with transformers, and last the stand-alone nvcc compile test that CI also
# runs. The CPU suite (`make test`) cannot see any of the GPU checks.
#
#   bash scripts/gpu_check.sh            # from anywhere; works in the repository root
#
# Python: .venv when its torch already sees the GPU; else a venv over a system torch that does; else the
# Makefile's steps (pip install torch==2.13.0, then the package) into build/gpu-venv, which needs a
# reachable package index. One line per check, `gpu_check: <check>: PASS|FAIL|SKIP <detail>`, each under
# its own timeout and all within GPU_CHECK_BUDGET_S (default 470 s, under 8 minutes); logs in
# GPU_CHECK_LOG_DIR (default: a fresh temporary directory); exits 1 if any check failed.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

BUDGET=${GPU_CHECK_BUDGET_S:-470}
START=$SECONDS
LOG_DIR=${GPU_CHECK_LOG_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")}
mkdir -p "$LOG_DIR"
SUMMARY=()
FAILED=0

# record <check> <PASS|FAIL|SKIP> <detail>
record() {
  SUMMARY+=("gpu_check: $1: $2 $3")
  echo "gpu_check: $1: $2 $3"
  [[ $2 == FAIL ]] && FAILED=1
  return 0
}

# limit <seconds>: a check's timeout, cut to what is left of the budget (0 when nothing is)
limit() {
  local left=$((BUDGET - (SECONDS - START)))
  if ((left < 10)); then echo 0; elif ((left < $1)); then echo "$left"; else echo "$1"; fi
}

# run <check> <cap seconds> <command...>: runs it with its log in $LOG_DIR/<check>.log (also shown), and
# returns its status; 124 is a timeout, 125 means the budget was spent before it started.
run() {
  local name=$1 cap status
  cap=$(limit "$2")
  shift 2
  if ((cap == 0)); then
    echo "(no time left in the ${BUDGET} s budget for $name)" >"$LOG_DIR/$name.log"
    return 125
  fi
  echo "== $name (timeout ${cap} s): $*"
  timeout --kill-after=10 "$cap" "$@" 2>&1 | tee "$LOG_DIR/$name.log"
  status=${PIPESTATUS[0]}
  return "$status"
}

# why <check> <status>: a short reason for a failed run
why() {
  case $2 in
    124) echo "timed out" ;;
    125) echo "not started: the ${BUDGET} s budget was spent" ;;
    *) echo "exit $2: $(grep -v '^\s*$' "$LOG_DIR/$1.log" | tail -n 1 | cut -c1-200)" ;;
  esac
}

torch_line='import torch; print(torch.__version__, torch.version.cuda, torch.cuda.is_available())'
sees_gpu='import sys, torch; sys.exit(0 if torch.version.cuda and torch.cuda.is_available() else 1)'

# ---- the machine ---------------------------------------------------------------------------------
# CUDA_HOME: as given, else the first toolkit root with nvcc and the runtime headers (a PATH nvcc may be a
# wrapper script outside the toolkit).
nvcc_on_path=$(command -v nvcc || true)
for root in "${CUDA_HOME:-}" /usr/local/cuda ${nvcc_on_path:+"$(dirname "$(dirname "$(readlink -f "$nvcc_on_path")")")"}; do
  if [[ -n $root && -x $root/bin/nvcc && -f $root/include/cuda_runtime.h ]]; then
    export CUDA_HOME=$root
    break
  fi
done
NVCC=${CUDA_HOME:+$CUDA_HOME/bin/nvcc}
SYS_PY=${PYTHON:-python3}

echo "== nvidia-smi"
timeout 30 nvidia-smi
smi=$?
echo "== nvcc --version"
if [[ -n $NVCC ]]; then timeout 30 "$NVCC" --version; else echo "no CUDA toolkit found (nvcc on PATH: ${nvcc_on_path:-none})"; fi
for py in .venv/bin/python "$SYS_PY"; do
  if command -v "$py" >/dev/null; then
    echo "== $py -c '$torch_line'"
    timeout 120 "$py" -c "$torch_line" 2>&1 | tail -n 3
  fi
done

gpu_name=$(timeout 30 nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
if ((smi == 0)) && [[ -n $gpu_name ]]; then
  record gpu PASS "$gpu_name"
else
  record gpu FAIL "nvidia-smi sees no GPU (exit $smi)"
fi
if [[ -n $NVCC ]]; then
  record toolkit PASS "$("$NVCC" --version | grep -o 'release [0-9.]*'), CUDA_HOME=$CUDA_HOME"
else
  record toolkit FAIL "no toolkit root with bin/nvcc and include/cuda_runtime.h (\$CUDA_HOME, /usr/local/cuda, PATH's nvcc)"
fi

# ---- a Python whose torch sees the GPU ---------------------------------------------------------------
PY=""
INSTALL_TARGET=(--no-deps -e .)  # a reused environment already holds the dependencies; offline-safe
if [[ -x .venv/bin/python ]] && timeout 120 .venv/bin/python -c "$sees_gpu" 2>/dev/null; then
  PY=.venv/bin/python
  record venv PASS "reused .venv ($(.venv/bin/python -c "$torch_line"))"
elif timeout 120 "$SYS_PY" -c "$sees_gpu" 2>/dev/null; then
  # The system's CUDA torch (and whatever else it has) under a venv of our own for the editable install.
  # --system-site-packages alone is not enough when $SYS_PY is itself a venv's python (the new venv then
  # sees the base interpreter's packages, not that venv's torch), so a .pth names $SYS_PY's own
  # site-packages, after the new venv's; pip comes from there too.
  if run venv 120 bash -c "rm -rf build/gpu-venv && $SYS_PY -m venv --without-pip --system-site-packages build/gpu-venv \
      && $SYS_PY -c 'import site; print(\"\n\".join(site.getsitepackages()))' \
         >\"\$(build/gpu-venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()[\"purelib\"])')/zz_system_site.pth\" \
      && build/gpu-venv/bin/python -c '$sees_gpu'"; then
    PY=build/gpu-venv/bin/python
    record venv PASS "build/gpu-venv over $SYS_PY's site-packages ($($PY -c "$torch_line"))"
  else
    record venv FAIL "$(why venv $?)"
  fi
else
  # The Makefile's install: torch first, then the package without build isolation (below).
  if run venv 240 bash -c "$SYS_PY -m venv build/gpu-venv && build/gpu-venv/bin/pip install -q --upgrade pip setuptools wheel \
      && build/gpu-venv/bin/pip install -q torch==2.13.0 && build/gpu-venv/bin/python -c '$sees_gpu'"; then
    PY=build/gpu-venv/bin/python
    INSTALL_TARGET=(-e '.[test]')
    record venv PASS "build/gpu-venv from the Makefile's steps ($($PY -c "$torch_line"))"
  else
    record venv FAIL "no torch that sees the GPU in .venv or $SYS_PY, and the Makefile's pip install failed ($(why venv $?))"
  fi
fi

# ---- the extension, with its CUDA kernels ------------------------------------------------------------
if [[ -z $PY ]]; then
  record build SKIP "no usable Python (venv failed)"
else
  # One architecture (the GPU's own) and every core: the build fits the budget.
  arch=$($PY -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null)
  # PIP_USE_PEP517: an older pip would otherwise run `setup.py develop`, which a newer setuptools turns into
  # an isolated build that downloads setuptools (pips that always use PEP 517 ignore the variable).
  if run build 300 env PIP_USE_PEP517=1 CUDA_HOME="$CUDA_HOME" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$arch}" \
      MAX_JOBS="${MAX_JOBS:-$(nproc)}" "$PY" -m pip install -q --no-build-isolation "${INSTALL_TARGET[@]}"; then
    if has=$($PY -c 'from puyu.model import ops; print(ops.extension_available("cuda"))' 2>&1) && [[ $has == True ]]; then
      record build PASS "puyu.model._fused_ops with CUDA kernels for sm_${arch/./}"
    else
      record build FAIL "installed, but the extension has no CUDA kernels: $(echo "$has" | tail -n 1)"
    fi
  else
    record build FAIL "$(why build $?)"
  fi
fi

# ---- the cuda-marked tests: every CUDA kernel against its reference, forward and gradients -----------
if [[ -z $PY ]]; then
  record cuda_tests SKIP "no usable Python"
else
  mapfile -t cuda_files < <(grep -l 'pytest.mark.cuda' tests/test_*.py)
  # A cuda test fails instead of skipping here if the GPU is not usable, and so does a missing extension.
  if run cuda_tests 240 env PUYU_REQUIRE_CUDA=1 PUYU_REQUIRE_EXTENSION=1 "$PY" -m pytest -q --runslow -m cuda \
      "${cuda_files[@]}"; then
    record cuda_tests PASS "$(grep -E '[0-9]+ passed' "$LOG_DIR/cuda_tests.log" | tail -n 1) in ${cuda_files[*]}"
  else
    record cuda_tests FAIL "$(why cuda_tests $?)"
  fi
fi

# ---- GPU benchmarks: pretraining MFU (eager, then with compiled blocks), then serving ------------------
if [[ -z $PY ]]; then
  record pretrain_mfu SKIP "no usable Python"
elif run pretrain_mfu 150 "$PY" scripts/pretrain_mfu.py --device cuda --flavor 1b --steps 3 --warmup 1; then
  record pretrain_mfu PASS "$(grep 'MFU' "$LOG_DIR/pretrain_mfu.log" | tail -n 1 | cut -c1-200)"
else
  record pretrain_mfu FAIL "$(why pretrain_mfu $?)"
fi
if [[ -z $PY ]]; then
  record pretrain_mfu_compiled SKIP "no usable Python"
elif run pretrain_mfu_compiled 180 "$PY" scripts/pretrain_mfu.py --device cuda --flavor 1b --steps 3 --warmup 2 --compile; then
  record pretrain_mfu_compiled PASS "$(grep 'MFU' "$LOG_DIR/pretrain_mfu_compiled.log" | tail -n 1 | cut -c1-200)"
else
  record pretrain_mfu_compiled FAIL "$(why pretrain_mfu_compiled $?)"
fi

# help_of <script>: its --help text (asked once: each call imports torch)
help_of() { timeout 120 "$PY" "$1" --help 2>/dev/null; }
# listed <help text> <option>: the help lists exactly that option
listed() { grep -Eq -- "(^|[[,[:space:]])$2([]=,[:space:]]|$)" <<<"$1"; }

if [[ -z $PY ]]; then
  record bench_serving SKIP "no usable Python"
else
  help=$(help_of benchmarks/bench_serving.py)
  if ! listed "$help" --device; then
    record bench_serving SKIP "benchmarks/bench_serving.py has no --device option"
  else
    args=(--device cuda)
    # the 125M-parameter Llama written by transformers, when the script can write it
    listed "$help" --write-model && args+=(--write-model "$LOG_DIR/llama125m")
    listed "$help" --prompts && args+=(--prompts 64)
    listed "$help" --max-tokens && args+=(--max-tokens 64)
    listed "$help" --repeats && args+=(--repeats 2)
    if run bench_serving 120 "$PY" benchmarks/bench_serving.py "${args[@]}"; then
      record bench_serving PASS "$(grep -v '^\s*$' "$LOG_DIR/bench_serving.log" | tail -n 1 | cut -c1-200)"
    else
      record bench_serving FAIL "$(why bench_serving $?)"
    fi
    rm -rf "$LOG_DIR/llama125m"
  fi
fi

# ---- nvcc compiles csrc/cuda on its own (torch's headers suffice: no GPU needed); last, as CI checks it too --
compile_py=${PY:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python)}
if [[ -z $compile_py ]]; then
  record nvcc_compile SKIP "no Python with torch"
elif run nvcc_compile 150 env PATH="${CUDA_HOME:+$CUDA_HOME/bin:}$PATH" "$compile_py" -m pytest -q \
    tests/test_ops_cuda_build.py; then
  if grep -q ' passed' "$LOG_DIR/nvcc_compile.log"; then
    record nvcc_compile PASS "$(grep -E ' passed' "$LOG_DIR/nvcc_compile.log" | tail -n 1)"
  else
    record nvcc_compile FAIL "$(grep -E 'SKIPPED' "$LOG_DIR/nvcc_compile.log" | tail -n 1 | cut -c1-200)"
  fi
else
  record nvcc_compile FAIL "$(why nvcc_compile $?)"
fi
echo "== summary ($((SECONDS - START)) s; logs in $LOG_DIR)"
printf '%s\n' "${SUMMARY[@]}"
exit "$FAILED"
