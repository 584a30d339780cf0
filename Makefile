# The README's two commands: `make demo` (the main job) and `make test` (the whole suite).
# Both set up first; set-up is redone only when the project's dependencies change.
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo cluster-demo run test lint fuzz chaos bench bench-quick bench-ingest bench-learning bench-retrain bench-export bench-gpu clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml edge/pyproject.toml scripts/setup.sh scripts/debian.sh
	bash scripts/setup.sh $(VENV)
	touch $@

demo: setup
	$(BIN)/sprout demo

# The deployment past one machine (docs/scale.md) on this one: PostgreSQL, Mosquitto, intake x2, a torchrun
# trainer group of 2 ranks, exporter x2 (one elected), sprout serve and a device.
cluster-demo: setup
	bash scripts/cluster-tools.sh
	$(BIN)/sprout cluster-demo

run: setup
	$(BIN)/sprout run

test: setup
	bash scripts/test-tools.sh $(VENV)
	$(BIN)/python -m pytest

# The code gate CI runs before the tests: ruff's lint (pyflakes, import order, bugbear), its formatter, and
# mypy's type check of daemon, models, edge, bench and tests (pyproject.toml [tool.mypy]).
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# The full fuzzing run: 10,000 inputs per parser test and 20,000 messages through a running daemon (CI runs 300
# of each); prints what was accepted and rejected, and why.
fuzz: setup
	SPROUT_FUZZ_EXAMPLES=10000 SPROUT_FUZZ_MESSAGES=20000 $(BIN)/python -m pytest -q -s -o timeout=3600 \
		tests/test_fuzz.py tests/test_fuzz_daemon.py

# The full chaos run: 24 seeded daemon SIGKILLs and broker restarts under a steady feed (CI runs 3 kills and
# one restart); prints the table that docs/reliability.md keeps.
chaos: setup
	SPROUT_CHAOS_KILLS=24 SPROUT_CHAOS_SEED=1127 $(BIN)/python -m pytest -q -s -o timeout=3600 tests/chaos

# The whole benchmark suite (about an hour on 2 cores); rewrites the results block of docs/benchmarks.md.
bench: setup
	$(BIN)/pip install -q -e '.[test,bench]'
	$(BIN)/python -m bench

# Every benchmark on the tiny network in about 3 minutes, so that none rots (CI runs it); writes bench/out only.
bench-quick: setup
	$(BIN)/python -m bench --quick

bench-ingest: setup
	$(BIN)/python bench/ingest.py

bench-learning: setup
	$(BIN)/pip install -q -e '.[test,bench]'
	$(BIN)/python bench/learning.py

# Online learning against retraining from scratch every 1,000 examples; docs/retrain.md keeps its table.
bench-retrain: setup
	$(BIN)/pip install -q -e '.[test,bench]'
	$(BIN)/python bench/retrain.py

bench-export: setup
	$(BIN)/python bench/export.py --input-size 128 --json bench/out/export-128.json

# On a CUDA host (about 5 minutes): full fine-tuning step variants (eager, bf16, CUDA graph, torch.compile),
# decoding by worker count, and the daemon end to end in full mode; not part of the suite.
bench-gpu: setup
	$(BIN)/python bench/gpu.py --json bench/out/gpu.json

clean:
	rm -rf $(VENV) $(VENV)-tflite $(VENV)-tasks var .pytest_cache
