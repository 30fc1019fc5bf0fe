"""Fixtures for the pipeline tests: one local Ray cluster and one Serve application per model per run.

The first `run_pipeline` of the test session deploys the tiny models on Ray Serve (Serve LLM); every
later call finds them RUNNING under the same names and reuses them, as `annotate run` does against
models started by `annotate serve`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from annotate.config import PipelineConfig, load_config

from bench.harness import SAMPLE_SHARDS, TINY


@pytest.fixture(scope="session")
def ray_session():
    import ray

    from annotate.cluster import ensure_ray

    # The session's cluster keeps every pipeline file's model deployments until the end (deploying each
    # once keeps CI short), so it holds more replicas at once than any one run: more logical CPUs than
    # tiny.yaml's 4, or a run's chain workers would be refused (executor/admission.py).
    ensure_ray(load_config(TINY, {"run": {"num_cpus": 8}}).run)
    yield ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_config() -> PipelineConfig:
    return load_config(TINY)


@pytest.fixture(scope="session")
def tiny_run_all(ray_session, tiny_config, tmp_path_factory):
    """The whole chain over both sample shards, run once and shared by the tests that read it."""
    from annotate.executor.runner import run_pipeline

    out = tmp_path_factory.mktemp("run-all")
    summary = run_pipeline(tiny_config, SAMPLE_SHARDS, out, [0, 1], stage="all")
    return out, summary


def free_session_models() -> None:
    """Delete the model applications earlier tests left on this session's own cluster, before a test
    starts a second cluster: two clusters' worth of vLLM engines do not fit in this machine's memory
    (a two-node test was seen to stall, Serve's controller killed for memory). Later tests that need
    them deploy them again."""
    import ray

    if ray.is_initialized():
        from annotate.serving.apps import stop_apps

        stop_apps()


def merge_prompt_changed(tmp_path) -> PipelineConfig:
    """tiny.yaml with one word added to the merge prompt: a new config whose lineage through context is
    unchanged (the lineage and `--stage` tests)."""
    prompt = tmp_path / "merge.yaml"
    text = (Path(TINY).parent / ".." / "prompts" / "merge.yaml").resolve().read_text()
    assert "keeping every detail." in text
    prompt.write_text(text.replace("keeping every detail.", "keeping every detail of it."))
    return load_config(TINY, {"stages": {"merge": {"prompt": str(prompt)}}})
