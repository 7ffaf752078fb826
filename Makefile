# Tandem: every target creates .venv on first use and reinstalls only when pyproject.toml changes.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench bench-data lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev,tensorboard,lightning,accelerate]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/tandem train --workload digits --strategy allreduce --workers 4 --epochs 30 \
		--lr 0.2 --target-accuracy 0.95 --out runs/demo

# Two pytest processes (one per core on the 2-core reference machine; TEST_JOBS=1 for one): most
# tests start worker processes and wait on them, so one pytest process leaves a core idle. A test
# file runs whole in one process (--dist loadfile), so its module fixtures are built once.
TEST_JOBS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider -n $(TEST_JOBS) --dist loadfile

# The benchmarks' datasets first (Fashion-MNIST for bench/codecs and bench/correlation): a
# benchmark whose data is missing is refused with the dataset's own error, never run on another.
bench: $(STAMP) bench-data
	$(BIN)/python -m bench.run_all

# Debian's packages of Fashion-MNIST and the KJV text, where apt is available and may install
# (root); nothing when they are installed already. A failure here is not fatal: the benchmarks
# that need the data then say what is missing.
BENCH_PACKAGES := dataset-fashion-mnist bible-kjv-text bible-kjv
bench-data:
	-@dpkg -s $(BENCH_PACKAGES) >/dev/null 2>&1 || (command -v apt-get >/dev/null && \
		apt-get update -qq && apt-get install -y -qq $(BENCH_PACKAGES))

lint: $(STAMP)
	$(BIN)/ruff check src tests bench examples
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) runs .pytest_cache

# The suite on a busy machine, run as make test runs it: two CPU-bound processes run beside it
# (on 2 cores, as many as there are cores) and are killed at the end, whatever happens; pytest's
# status is the target's.
.PHONY: test-stress
test-stress: $(STAMP)
	@$(BIN)/python -c 'while True: pass' & a=$$!; \
	$(BIN)/python -c 'while True: pass' & b=$$!; \
	trap 'kill $$a $$b 2>/dev/null' EXIT INT TERM; \
	echo "test-stress: CPU hogs $$a $$b running beside the suite"; \
	$(BIN)/python -m pytest -q -p no:cacheprovider -n $(TEST_JOBS) --dist loadfile $(PYTEST_ARGS)
