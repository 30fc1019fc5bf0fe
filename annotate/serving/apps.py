"""`models:` entries -> Ray Serve applications: build, start (or find running), stop.

One application per model, named `longgrit-<model>-<fingerprint>`, where the fingerprint covers
every setting that changes the deployment. A run that finds an application of that name already
RUNNING uses it instead of loading the model again (`annotate serve` starts them ahead of runs), and
two stages that name one model share it.

vLLM models go through Ray Serve LLM (`LLMConfig` -> `LLMServer`): vLLM's async engine, one
placement group per replica with a bundle per tensor/pipeline-parallel worker (GPU, accelerator
type), replicas or autoscaling from the config. `hf` and SAM models are plain deployments
(`servers.py`) that reserve what their `resources` declare.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, replace
from typing import Any, Callable

from annotate.config import ENGINE_KINDS, ModelConfig, PipelineConfig, RunConfig, SegmentConfig

log = logging.getLogger(__name__)

APP_PREFIX = "longgrit-"
SEGMENT_MODEL = "segment"  # the name the optional SAM model is served under
# The stages the optional SAM model serves: the segment step before `object` (object masks from boxes),
# and `parts` (part masks; its class says `uses_segment`, which a test ties to this list).
SEGMENT_STAGES = ("object", "parts")
IMAGE_AFFINITY_ROUTER = "annotate.serving.routing:ImageAffinityRouter"
# The app kinds servers.ChatServer serves (one request per call): each such engine under its own name.
CHAT_SERVER_KINDS = tuple(kind.name for kind in ENGINE_KINDS.values() if kind.served_by == "chat")


@dataclass(frozen=True)
class ModelApp:
    """One model as a Serve application: its name, the deployment stages call, and its kind."""

    model_name: str
    app_name: str
    deployment_name: str
    kind: str  # "llm" (Serve LLM), an engine name of CHAT_SERVER_KINDS (servers.ChatServer), "sam"
    max_in_flight: int
    unavailable_timeout_s: float
    model_id: str  # what provenance records: the paper's model name, else the path
    deployed_now: bool = False  # set by ensure_apps: False when a running deployment was reused


def fingerprint(model: ModelConfig | SegmentConfig) -> str:
    """Hash of the settings that change the deployment (not the client-side in-flight cap)."""
    dumped = model.model_dump(mode="json")
    dumped.get("serving", {}).pop("max_in_flight", None)
    dumped.get("serving", {}).pop("unavailable_timeout_s", None)
    return hashlib.sha256(json.dumps(dumped, sort_keys=True).encode()).hexdigest()[:10]


def replicas(model: ModelConfig | SegmentConfig) -> int:
    """Replicas a model runs on: fixed, or its autoscaling maximum."""
    return max(1, int((model.serving.autoscaling or {}).get("max_replicas", model.resources.replicas)))


def in_flight_cap(model: ModelConfig | SegmentConfig) -> int:
    """Requests in flight to a model from all chain workers: the configured cap, else twice what its
    replicas run at once, so that every engine has a full batch running and a full batch queued."""
    if model.serving.max_in_flight:
        return model.serving.max_in_flight
    if isinstance(model, SegmentConfig):
        per_replica = model.batch_images
    else:
        per_replica = ENGINE_KINDS[model.engine].per_replica(model)
    return 2 * per_replica * replicas(model)


def app_kind(name: str, model: ModelConfig | SegmentConfig) -> str:
    """`ModelApp.kind`, from config.ENGINE_KINDS; ValueError for an engine that is not deployed."""
    if isinstance(model, SegmentConfig):
        return "sam"
    engine = ENGINE_KINDS[model.engine]
    if engine.served_by is None:
        raise ValueError(f"model {name!r} uses the {engine.name} engine: it is a server outside the cluster, "
                         "not a deployment")
    # A chat server's kind is its engine's name, which its deployment's name ends with.
    return "llm" if engine.served_by == "llm" else engine.name


def model_app(name: str, model: ModelConfig | SegmentConfig) -> ModelApp:
    kind = app_kind(name, model)
    app = f"{APP_PREFIX}{name}-{fingerprint(model)}"
    # Serve LLM names its deployment <server class>:<model_id> (with or without the OpenAI ingress);
    # the class is llm_server.StageLLMServer (not imported here: it imports vLLM).
    deployment = f"StageLLMServer:{name}" if kind == "llm" else f"{name}-{kind}"
    return ModelApp(model_name=name, app_name=app, deployment_name=deployment, kind=kind,
                    max_in_flight=in_flight_cap(model),
                    unavailable_timeout_s=model.serving.unavailable_timeout_s,
                    model_id=model.paper_model or model.path)


# ------------------------------------------------------------------------------- vLLM (Serve LLM)
def engine_kwargs(model: ModelConfig) -> dict[str, Any]:
    """vLLM engine arguments for Serve LLM (engine and OpenAI-frontend arguments in one dict): the
    in-process engine's, plus per-request cached-token counts; `vllm.extra` wins.

    A model that tiles its images (InternVL: its conventions name a `tiles_kwarg`) takes a prompt's tile
    cap per request (`mm_processor_kwargs`), which vLLM's server refuses unless started with
    `trust_request_mm_kwargs`. Its callers are the run's own workers; the OpenAI route, when
    `run.openai_routes` serves it, binds to `run.serve_http_host` (127.0.0.1 unless configured)."""
    from annotate.engines.conventions import conventions_of
    from annotate.engines.vllm_engine import engine_args

    image = getattr(conventions_of(model), "image", None)
    trusted = {"trust_request_mm_kwargs": True} if image is not None and image.tiles_kwarg else {}
    return {**engine_args(model), "enable_prompt_tokens_details": True, **trusted, **model.vllm.extra}


def placement_group_config(model: ModelConfig) -> dict[str, Any]:
    """A bundle per tensor/pipeline-parallel worker: one GPU each on GPU models (Serve LLM adds the
    accelerator type to each bundle); CPU models get one CPU bundle for their single worker."""
    res = model.resources
    workers = model.vllm.tensor_parallel_size * model.vllm.pipeline_parallel_size
    if res.num_gpus > 0:
        if res.num_gpus != workers:
            raise ValueError(f"{model.path}: resources.num_gpus={res.num_gpus} but tensor x pipeline parallel "
                             f"= {workers}; a vLLM replica takes one GPU per worker")
        bundle: dict[str, float] = {"GPU": 1, "CPU": max(res.num_cpus / workers, 1)}
    else:
        if workers != 1:
            raise ValueError(f"{model.path}: tensor/pipeline parallelism needs GPUs (resources.num_gpus)")
        bundle = {"CPU": res.num_cpus}
    bundle.update(res.custom)
    return {"bundle_per_worker": bundle, "strategy": "STRICT_PACK"}


def deployment_config(model: ModelConfig | SegmentConfig, replica_cpus: float = 0) -> dict[str, Any]:
    serving, res = model.serving, model.resources
    config: dict[str, Any] = {
        "max_ongoing_requests": serving.max_ongoing_requests or -(-in_flight_cap(model) // replicas(model)),
        "ray_actor_options": {"num_cpus": replica_cpus},
        "health_check_period_s": 10,
        "health_check_timeout_s": 30,
        "logging_config": {"enable_access_log": serving.access_log},
    }
    if serving.autoscaling:
        config["autoscaling_config"] = dict(serving.autoscaling)
    else:
        config["num_replicas"] = res.replicas
    if serving.autoscaling or res.replicas > 1:
        # Serve LLM's prefix-aware router looks at text only; an image's regions share the image, so
        # send them to one replica and its prefix cache holds the image's tokens.
        config["request_router_config"] = {"request_router_class": IMAGE_AFFINITY_ROUTER}
    return config


def llm_config(name: str, model: ModelConfig):
    from ray.serve.llm import LLMConfig

    from annotate.engines.model_path import resolve_model_path
    from annotate.serving.llm_server import LocalFolderCallback, StageLLMServer

    env: dict[str, str] = {}
    if model.vllm.kv_cache_space_gib is not None:  # read by CPU builds only
        env["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, round(model.vllm.kv_cache_space_gib)))
    runtime_env = runtime_env_of(model, env)
    return LLMConfig(
        model_loading_config={"model_id": name, "model_source": resolve_model_path(model.path)},
        engine_kwargs=engine_kwargs(model),
        accelerator_type=model.resources.accelerator_type if model.resources.num_gpus > 0 else None,
        placement_group_config=placement_group_config(model),
        # The replica actor itself holds no device: the engine's workers run in the placement group.
        deployment_config=deployment_config(model, replica_cpus=0),
        runtime_env=runtime_env,
        log_engine_metrics=model.serving.log_engine_metrics,
        server_cls=StageLLMServer,  # LLMServer + chat_payload(dict): chain workers never import vLLM
        callback_config={"callback_class": LocalFolderCallback},
    )


def runtime_env_of(model: ModelConfig | SegmentConfig, env_vars: dict[str, str] | None = None) -> dict[str, Any] | None:
    """The replicas' Ray runtime environment: the model's prebuilt one (if any) plus `env_vars`."""
    runtime_env = dict(getattr(model, "runtime_env", None) or {})
    merged = {**(env_vars or {}), **runtime_env.get("env_vars", {})}
    if merged:
        runtime_env["env_vars"] = merged
    return runtime_env or None


def deployment_options(name: str, model: ModelConfig | SegmentConfig) -> dict[str, Any]:
    """The Serve options one model's deployment gets (what the placement test checks, no GPU needed)."""
    app = model_app(name, model)
    if app.kind == "llm":
        from ray.serve.llm.deployment import LLMServer

        return LLMServer.get_deployment_options(llm_config(name, model))
    res = model.resources
    actor: dict[str, Any] = {"num_cpus": res.num_cpus, "num_gpus": res.num_gpus}
    if res.accelerator_type and res.num_gpus > 0:
        actor["accelerator_type"] = res.accelerator_type
    if res.custom:
        actor["resources"] = dict(res.custom)
    if runtime_env := runtime_env_of(model):
        actor["runtime_env"] = runtime_env
    options = deployment_config(model)
    options["ray_actor_options"] = actor
    options["name"] = app.deployment_name
    return options


def build_app(name: str, model: ModelConfig | SegmentConfig, run: RunConfig):
    """The Serve application of one model (not yet deployed)."""
    app = model_app(name, model)
    if app.kind == "llm":
        from ray.serve.llm import build_llm_deployment, build_openai_app

        config = llm_config(name, model)
        if run.openai_routes:
            # Ingress + LLMServer: POST /<app>/v1/chat/completions works for a person with curl.
            return build_openai_app({"llm_configs": [config]})
        return build_llm_deployment(config)
    from ray import serve

    from annotate.serving.servers import ChatServer, SamServer

    cls = SamServer if app.kind == "sam" else ChatServer
    options = deployment_options(name, model)
    return serve.deployment(cls).options(**options).bind(model)


# --------------------------------------------------------------------------- start, find, stop
def needed_models(cfg: PipelineConfig, stages: tuple[str, ...] | None = None) -> dict[str, ModelConfig | SegmentConfig]:
    """The models the given stages use (all stages when None), plus SAM when one of them uses it."""
    stages = tuple(cfg.stages) if stages is None else stages
    out: dict[str, ModelConfig | SegmentConfig] = {
        cfg.stages[s].model: cfg.models[cfg.stages[s].model] for s in stages if s in cfg.stages}
    if cfg.segment is not None and any(stage in SEGMENT_STAGES for stage in stages):
        out[SEGMENT_MODEL] = cfg.segment
    return out


def running_apps() -> dict[str, str]:
    """Our applications on the cluster and their status (RUNNING, DEPLOYING, DEPLOY_FAILED...)."""
    from ray import serve

    return {name: str(getattr(app.status, "value", app.status))
            for name, app in serve.status().applications.items() if name.startswith(APP_PREFIX)}


def start_serve(run: RunConfig) -> None:
    """Start Serve on the cluster (no-op when it runs). Stages call deployments by handle, so the HTTP
    proxy exists only for the OpenAI routes: on the head node, bound to run.serve_http_host."""
    from ray import serve

    serve.start(proxy_location="HeadOnly" if run.openai_routes else "Disabled",
                http_options={"host": run.serve_http_host, "port": run.serve_http_port})


def ensure_apps(models: dict[str, ModelConfig | SegmentConfig], run: RunConfig,
                on_event: Callable[[str], None] = log.info, timeout_s: float = 3600) -> dict[str, ModelApp]:
    """Deploy the models that are not running yet (all at once, so they load in parallel) and wait
    until every one is RUNNING. Returns each model's `ModelApp` (`deployed_now` False: found running)."""
    from ray import serve
    from ray.serve.api import RunTarget  # run_many's argument type (DeveloperAPI)

    start_serve(run)
    apps = {name: model_app(name, model) for name, model in models.items()}
    status = running_apps()
    targets = []
    for name, app in apps.items():
        if status.get(app.app_name) in ("RUNNING", "DEPLOYING"):
            on_event(f"model {name}: using running deployment {app.app_name}")
            continue
        on_event(f"model {name}: deploying {app.app_name}")
        apps[name] = replace(app, deployed_now=True)
        targets.append(RunTarget(target=build_app(name, models[name], run), name=app.app_name,
                                 route_prefix=f"/{app.app_name}" if app.kind == "llm" and run.openai_routes else None))
    deployed = [app.app_name for app in apps.values() if app.deployed_now]
    try:
        if targets:
            serve.run_many(targets, wait_for_applications_running=False)
        _wait_running(apps, on_event, timeout_s)
    except BaseException as exc:  # Ctrl-C too: never leave this command's deployments holding GPUs
        if not deployed:
            raise
        note = cleanup_note(deployed, on_event)
        if not isinstance(exc, Exception):  # Ctrl-C: cleaned up, and on its way
            raise
        # The same type when it can be built from one message (RuntimeError, TimeoutError), else RuntimeError.
        cls = type(exc) if type(exc) in (RuntimeError, TimeoutError, ValueError) else RuntimeError
        raise cls(f"{exc}\n{note}") from exc
    return apps


def cleanup_note(deployed: list[str], on_event: Callable[[str], None] = log.info) -> str:
    """Delete the applications this command deployed (never ones it found running); what to tell the user:
    what was removed, or the exact command that removes what could not be."""
    from ray import serve

    removed, left = [], []
    for name in deployed:
        try:
            serve.delete(name)
            removed.append(name)
        except Exception as exc:  # noqa: BLE001 - the original failure is the one to raise
            log.warning("could not delete application %s: %s", name, exc)
            left.append(name)
    lines = []
    if removed:
        lines.append(f"Removed the application(s) this command deployed: {', '.join(removed)}.")
        on_event(lines[-1])
    if left:
        calls = "; ".join(f"serve.delete({name!r})" for name in left)
        lines.append(f"Could not remove {', '.join(left)}: they may still hold their GPUs. Remove them with:\n"
                     f"  python -c \"import ray; from ray import serve; ray.init(address='auto'); {calls}\"")
    return "\n".join(lines)


def _wait_running(apps: dict[str, ModelApp], on_event: Callable[[str], None], timeout_s: float) -> None:
    """Until every app is RUNNING; RuntimeError on a failed deployment, TimeoutError after `timeout_s`."""
    from ray import serve

    started = time.monotonic()
    waiting = {app.app_name: app.model_name for app in apps.values()}
    while waiting:
        status = running_apps()
        for app_name, name in list(waiting.items()):
            state = status.get(app_name)
            if state == "RUNNING":
                on_event(f"model {name} ready ({time.monotonic() - started:.0f} s)")
                del waiting[app_name]
            elif state in ("DEPLOY_FAILED", "UNHEALTHY") and time.monotonic() - started > 5:
                message = serve.status().applications[app_name].message
                raise RuntimeError(
                    f"model {name!r} failed to deploy ({state}): {message[-2000:]}\nCheck its `path` and engine "
                    "arguments in the pipeline file; replica logs are in the Ray dashboard (Serve tab) or "
                    "/tmp/ray/session_latest/logs/serve/.")
        if waiting and time.monotonic() - started > timeout_s:
            raise TimeoutError(f"models not ready after {timeout_s:.0f} s: {', '.join(waiting.values())}")
        if waiting:
            time.sleep(2)


def stop_apps(models: dict[str, ModelConfig | SegmentConfig] | None = None) -> list[str]:
    """Delete the applications of `models` (all of ours when None); returns the names deleted."""
    from ray import serve

    running = running_apps()
    names = sorted(running) if models is None else [
        app for app in (model_app(n, m).app_name for n, m in models.items()) if app in running]
    for name in names:
        serve.delete(name)
    return names


def replica_info(apps: dict[str, ModelApp]) -> list[dict]:
    """Where each model's live replicas run (node, pid). Read from the GCS's actor table, which needs no
    dashboard (Ray's state API does, and clusters may run without one); bookkeeping only, so a
    failure to read it is logged, never raised."""
    from ray._private.state import actors as actor_table  # GCS actor table (ray.util.state needs the dashboard)

    try:
        table = actor_table()
    except Exception as exc:  # noqa: BLE001
        log.warning("could not read the actor table for the run record: %s", exc)
        return []
    out = []
    for app in apps.values():
        prefix = f"SERVE_REPLICA::{app.app_name}#"
        for actor in table.values():
            name = actor.get("Name") or ""
            if name.startswith(prefix) and actor.get("State") == "ALIVE":
                out.append({"model": app.model_name, "app": app.app_name, "replica": name[len("SERVE_REPLICA::"):],
                            "node": (actor.get("Address") or {}).get("NodeID"), "pid": actor.get("Pid"),
                            "class": actor.get("ActorClassName")})
    return out
