"""Fixtures for the engines tests (session-scoped: each model engine loads once per test run).

* `tiny_model_paths`: {"text": Path, "vlm": Path}, the tiny models built once into the cache
  ($LONGGRIT_CACHE_DIR, else the repo's .cache/longgrit; `tiny:` paths resolve there too).
* `vllm_text_engine`, `vllm_vlm_engine`: `VllmEngine`s over them (1 GiB KV cache, 1024 tokens).
* `openai_server_url`: a real vLLM OpenAI-compatible server over the tiny text model
  (`.../v1`, served as "tiny-text"), started once, killed at the end.
* `fault_server`: the fault-injecting HTTP server of tests/fault_server.py.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENGINE_MAX_MODEL_LEN = 1024
OPENAI_SERVED_NAME = "tiny-text"


def pytest_configure(config) -> None:
    # One cache for the tiny models: fixtures and `tiny:` paths (factory) must agree.
    os.environ.setdefault("LONGGRIT_CACHE_DIR", str(REPO / ".cache" / "longgrit"))
    # vLLM on a CPU reserves most of the RAM for its KV cache unless told otherwise.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def tiny_model_config(kind: str, path, **vllm_overrides):
    from annotate.config import ModelConfig, VllmArgs

    args = dict(
        max_model_len=ENGINE_MAX_MODEL_LEN,
        kv_cache_space_gib=1,
        gpu_memory_utilization=0.1,
        max_num_seqs=8,
        in_process=True,  # one process per engine: starts in a fraction of the time on 2 cores
    )
    args.update(vllm_overrides)
    return ModelConfig(engine="vllm", path=str(path), vllm=VllmArgs(**args))


@pytest.fixture(scope="session")
def tiny_model_paths() -> dict[str, Path]:
    from annotate.models.registry import KINDS, tiny_path

    return {kind: tiny_path(kind) for kind in KINDS}


@pytest.fixture(scope="session")
def vllm_text_engine(tiny_model_paths):
    from annotate.engines.vllm_engine import VllmEngine

    # Prefills of more than 64 tokens are split over engine steps (chunked prefill), as long prompts are
    # on a loaded GPU engine: test_seeded_random_sampling_with_chunked_prefill needs it.
    engine = VllmEngine(tiny_model_config("text", tiny_model_paths["text"], extra={"max_num_batched_tokens": 64}))
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def vllm_vlm_engine(tiny_model_paths):
    from annotate.engines.vllm_engine import VllmEngine

    engine = VllmEngine(tiny_model_config("vlm", tiny_model_paths["vlm"]))
    yield engine
    engine.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")  # only test_engines_openai.py uses it: its ~3 GB go when that module ends
def openai_server_url(tiny_model_paths, tmp_path_factory):
    """`python -m vllm.entrypoints.openai.api_server` on the tiny text model (the `vllm` CLI entry
    point does not work with the vllm-cpu distribution)."""
    import httpx

    port = free_port()
    log_path = tmp_path_factory.mktemp("vllm-server") / "server.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(tiny_model_paths["text"]),
        "--served-model-name", OPENAI_SERVED_NAME,
        "--host", "127.0.0.1", "--port", str(port),
        "--max-model-len", str(ENGINE_MAX_MODEL_LEN),
        "--max-num-seqs", "8",
        "--structured-outputs-config", '{"backend": "xgrammar", "disable_any_whitespace": true}',
    ]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vLLM server exited ({proc.returncode}):\n{log_path.read_text()[-3000:]}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"vLLM server not healthy in time:\n{log_path.read_text()[-3000:]}")
            time.sleep(1)
        yield url + "/v1"
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


@pytest.fixture(scope="session")
def fault_server():
    from fault_server import FaultServer

    server = FaultServer(delay_s=0.05, slow_s=5.0).start()
    yield server
    server.stop()
