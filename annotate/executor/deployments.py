"""Model deployments: one pool of Ray actors per `models:` entry, each actor holding one engine.

A deployment is created once per run (and reused by later runs in the same driver process), loads
its model once, and reserves the resources its config declares (GPUs, custom resources, accelerator
type), so a 76B model lands on the 8-GPU nodes. Stages call deployments by handle, which is how two
stages share one deployment. A replica whose engine dies is restarted by Ray (`max_restarts`), and
its callers retry the call (see `DeploymentClient`).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import time
from dataclasses import dataclass, field

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

from annotate.config import ModelConfig
from annotate.engines.base import ChatRequest, ChatResult, EngineDeadError

log = logging.getLogger(__name__)


@ray.remote
class EngineActor:
    """Holds one engine for the actor's life. Calls run one at a time (vLLM's LLM is not reentrant)."""

    def __init__(self, model_name: str, model: ModelConfig):
        from annotate.engines.factory import build_engine

        self.model_name = model_name
        started = time.perf_counter()
        self.engine = build_engine(model)
        self.load_seconds = time.perf_counter() - started

    def ready(self) -> dict:
        import os
        import socket

        return {"model": self.model_name, "load_s": self.load_seconds, "node": ray.get_runtime_context().get_node_id(),
                "host": socket.gethostname(), "pid": os.getpid()}

    def chat(self, requests: list[ChatRequest]) -> list[ChatResult]:
        try:
            return self.engine.chat(requests)
        except EngineDeadError:
            # Exit so that Ray restarts this actor with a fresh engine; callers retry on it.
            log.error("engine of %s died; restarting the actor", self.model_name)
            ray.actor.exit_actor()
            raise  # unreachable: exit_actor raises


def _actor_options(model: ModelConfig) -> dict:
    res = model.resources
    parallel = model.vllm.tensor_parallel_size * model.vllm.pipeline_parallel_size
    options: dict = {"num_cpus": res.num_cpus, "max_restarts": 3, "max_task_retries": 0}
    if model.engine == "vllm" and parallel > 1:
        # Tensor/pipeline parallel: vLLM's Ray executor makes its own placement group with one GPU
        # bundle per worker; the holding actor itself takes no GPU.
        options["num_gpus"] = 0
    else:
        options["num_gpus"] = res.num_gpus
    if res.custom:
        options["resources"] = dict(res.custom)
    if res.accelerator_type:
        options["accelerator_type"] = res.accelerator_type
    return options


@dataclass
class Deployment:
    name: str
    model: ModelConfig
    actors: list
    replicas: list[dict] = field(default_factory=list)  # ready() of each replica: node, host, load time

    @property
    def model_id(self) -> str:
        return self.model.paper_model or self.model.path


def model_fingerprint(model: ModelConfig) -> str:
    return hashlib.sha256(model.model_dump_json().encode()).hexdigest()[:12]


# Deployments live as long as the driver's Ray session: a second `run_pipeline` call in the same
# process (the stage-by-stage mode, the tests) reuses them instead of loading the model again.
_LIVE: dict[tuple[str, str, str], Deployment] = {}


def get_deployments(models: dict[str, ModelConfig], needed: set[str], on_ready=None) -> dict[str, Deployment]:
    """Start (or reuse) the deployments named in `needed` and wait until every replica has loaded."""
    session = ray.get_runtime_context().get_job_id()
    out: dict[str, Deployment] = {}
    waiting: dict = {}
    for name in sorted(needed):
        model = models[name]
        key = (session, name, model_fingerprint(model))
        if key not in _LIVE:
            actors = [
                EngineActor.options(name=f"longgrit-{name}-{key[2]}-{i}", **_actor_options(model)).remote(name, model)
                for i in range(model.resources.replicas)
            ]
            _LIVE[key] = Deployment(name=name, model=model, actors=actors)
            for actor in actors:
                waiting[actor.ready.remote()] = name
        out[name] = _LIVE[key]
    while waiting:
        done, _ = ray.wait(list(waiting), num_returns=1)
        name = waiting.pop(done[0])
        try:
            info = ray.get(done[0])
        except RayActorError as exc:
            raise RuntimeError(
                f"model {name!r} failed to load: {exc}. Check its `path` and engine arguments in the "
                "pipeline file; the actor's log is in the Ray dashboard (or /tmp/ray/session_latest/logs)."
            ) from exc
        out[name].replicas.append(info)
        if on_ready:
            on_ready(info)
    return out


class DeploymentClient:
    """Used inside stage workers: spreads calls over a deployment's replicas, survives restarts."""

    def __init__(self, actors: list, max_call_retries: int = 3):
        self.actors = actors
        self._next = itertools.cycle(range(len(actors)))
        self.max_call_retries = max_call_retries

    def chat(self, requests: list[ChatRequest]) -> list[ChatResult]:
        last_error: Exception | None = None
        for attempt in range(self.max_call_retries + 1):
            actor = self.actors[next(self._next)]
            try:
                return ray.get(actor.chat.remote(requests))
            except (ActorDiedError, ActorUnavailableError, RayActorError) as exc:
                last_error = exc
                log.warning("engine replica unavailable (attempt %d): %s", attempt + 1, exc)
                time.sleep(min(2**attempt, 10))
        raise RuntimeError(f"model deployment unavailable after {self.max_call_retries + 1} tries") from last_error


def shutdown_deployments() -> None:
    for deployment in _LIVE.values():
        for actor in deployment.actors:
            ray.kill(actor)
    _LIVE.clear()
