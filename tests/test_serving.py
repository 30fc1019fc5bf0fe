"""Models as Serve deployments, without starting one: the production file's placement (TP x PP GPU
bundles with the accelerator type, hf models' GPUs), the image-affine router's choice, and the
conversion between our requests and Serve LLM's OpenAI types (the real pydantic classes)."""

from __future__ import annotations

import pytest
from PIL import Image

from annotate.config import SamplingConfig, load_config
from annotate.engines.base import ChatRequest
from bench.harness import REPO

LONGGRIT = REPO / "pipelines" / "longgrit.yaml"


def test_production_models_get_a_gpu_bundle_per_parallel_worker(ray_session):
    """Serve LLM needs the Ray runtime context to build its options (no GPU is used or needed)."""
    from annotate.serving.apps import deployment_options, model_app, needed_models

    cfg = load_config(LONGGRIT)
    models = needed_models(cfg)
    assert set(models) == {"internvl2_76b", "qwen2_72b", "griffon_g", "deepseek_r1_70b"}
    checked = 0
    for name, model in models.items():
        options = deployment_options(name, model)
        res = model.resources
        assert model.engine == "vllm", name  # every production model, Griffon-G included, is served by vLLM
        workers = model.vllm.tensor_parallel_size * model.vllm.pipeline_parallel_size
        bundles = options["placement_group_bundles"]
        assert len(bundles) == workers == res.num_gpus, (name, bundles)
        for bundle in bundles:
            assert bundle["GPU"] == 1, (name, bundle)
            assert bundle[f"accelerator_type:{res.accelerator_type}"] > 0, (name, bundle)
        assert options["placement_group_strategy"] == "STRICT_PACK"  # a replica never spans nodes
        assert options["ray_actor_options"]["num_cpus"] == 0  # the replica holds no device itself
        assert options.get("ray_actor_options", {}).get("num_gpus", 0) == 0
        checked += 1
        assert options["num_replicas"] == res.replicas
        # Serve's access log as the model's serving settings say (on unless turned off)
        assert options["logging_config"]["enable_access_log"] is model.serving.access_log is True
        router = options.get("request_router_config") or {}
        if res.replicas > 1:
            assert router["request_router_class"].endswith("ImageAffinityRouter"), name
    assert checked == 4


def test_parallel_size_and_gpus_must_agree():
    from annotate.serving.apps import placement_group_config

    model = load_config(LONGGRIT).models["qwen2_72b"].model_copy(deep=True)
    model.resources.num_gpus = 2
    with pytest.raises(ValueError, match="one GPU per worker"):
        placement_group_config(model)


def test_app_names_change_with_deployment_settings_only():
    from annotate.serving.apps import model_app

    model = load_config(REPO / "pipelines" / "tiny.yaml").models["llm"]
    same = model.model_copy(deep=True)
    same.serving.max_in_flight = 7  # a client-side cap: the running deployment still fits
    other = model.model_copy(deep=True)
    other.vllm.max_num_seqs = 4
    assert model_app("llm", model).app_name == model_app("llm", same).app_name
    assert model_app("llm", model).app_name != model_app("llm", other).app_name


def test_image_affinity_keeps_an_image_on_one_replica():
    from annotate.serving.routing import image_key, rank_replicas

    class Req:
        def __init__(self, request_id):
            self.request_id = request_id

    assert image_key(Req("00000:abc:3|1f2e")) == "00000:abc" == image_key(Req("00000:abc:0|99aa"))
    assert image_key({"request_id": "00000:abc:1|77"}) == "00000:abc"  # the payload chain workers send
    assert image_key(Req("")) is None and image_key(object()) is None
    replicas = [f"r{i}" for i in range(4)]
    firsts = {rank_replicas(f"00000:img{i}", replicas)[0] for i in range(200)}
    assert firsts == set(replicas)  # images spread over every replica
    for i in range(50):
        key = f"00001:img{i}"
        order = rank_replicas(key, replicas)
        assert sorted(order) == replicas and order == rank_replicas(key, list(reversed(replicas)))
        # a replica leaving moves only its own images
        if order[0] != "r3":
            assert rank_replicas(key, replicas[:3])[0] == order[0]


def test_request_conversion_keeps_sampling_schema_images_and_region():
    from ray.serve.llm.openai_api_models import ChatCompletionRequest

    from annotate.serving.client import completion_request

    schema = {"type": "object", "properties": {"consistent": {"type": "boolean"}}, "required": ["consistent"]}
    image = Image.new("RGB", (8, 6), (1, 2, 3))
    request = ChatRequest(
        messages=[{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "hi"}]}],
        sampling=SamplingConfig(max_tokens=40, min_tokens=50, temperature=0.3, seed=5, stop=["END"]),
        json_schema=schema, request_id="00000:k1:2")
    payload = completion_request("llm", request)
    assert "vllm" not in type(payload).__module__  # a plain dict: chain workers never import vLLM
    # What the replica builds from it (llm_server.StageLLMServer.chat_payload): the real class accepts it.
    a, b = ChatCompletionRequest(**payload), ChatCompletionRequest(**completion_request("llm", request))
    assert a.model == "llm" and a.max_completion_tokens == 40 and a.min_tokens == 40 and a.temperature == 0.3
    assert a.seed == 5 and a.stop == ["END"]
    assert a.response_format.json_schema.json_schema == schema
    assert a.request_id.startswith("00000:k1:2|") and a.request_id != b.request_id  # a resend never collides
    part = a.messages[0]["content"][0]
    assert part["type"] == "image_pil" and part["image_pil"].size == (8, 6)


def test_responses_become_results():
    from ray.serve.llm.openai_api_models import ChatCompletionResponse, ErrorResponse

    from annotate.serving.client import ReplicaUnavailable, result_from_summary
    from annotate.serving.llm_server import response_summary

    def result_from_response(request, response, reasoning_model, latency):
        return result_from_summary(request, response_summary(response), reasoning_model, latency)

    request = ChatRequest(messages=[{"role": "user", "content": "x"}], request_id="s:k:0")
    response = ChatCompletionResponse.model_validate({
        "id": "c", "model": "llm", "created": 0, "object": "chat.completion",
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": "thinking</think> a red cup"}}],
        "usage": {"prompt_tokens": 30, "completion_tokens": 9, "total_tokens": 39,
                  "prompt_tokens_details": {"cached_tokens": 16}}})
    result = result_from_response(request, response, reasoning_model=True, latency=0.5)
    assert result.ok and result.text == "a red cup" and result.reasoning == "thinking"
    assert (result.prompt_tokens, result.completion_tokens, result.cached_prompt_tokens) == (30, 9, 16)

    too_long = ErrorResponse.model_validate({"error": {"message": "prompt too long", "type": "BadRequestError", "code": 400}})
    bad = result_from_response(request, too_long, reasoning_model=False, latency=0.1)
    assert bad.error_kind == "invalid_input" and not bad.retryable and "prompt too long" in bad.error
    dead = ErrorResponse.model_validate({"error": {"message": "EngineDeadError: EngineCore died", "type": "InternalServerError",
                                                   "code": 500}})
    with pytest.raises(ReplicaUnavailable):
        result_from_response(request, dead, reasoning_model=False, latency=0.1)


def test_a_local_model_folder_skips_serve_llms_download_task(tmp_path):
    """Serve LLM's node-initialisation task only imports torch for a local folder: skipped for folders,
    kept for anything else (a remote URI)."""
    import asyncio
    from types import SimpleNamespace

    from annotate.serving.llm_server import LocalFolderCallback

    def run_init_node(source: str) -> bool:
        config = SimpleNamespace(model_loading_config=SimpleNamespace(model_source=source))
        callback = LocalFolderCallback(llm_config=config)
        asyncio.run(callback.run_callback("on_before_node_init"))
        return callback.ctx.run_init_node

    assert run_init_node(str(tmp_path)) is False
    assert run_init_node("s3://bucket/model") is True
    assert run_init_node(str(tmp_path / "missing")) is True


def test_a_one_worker_cpu_engine_runs_its_worker_in_the_engine_core():
    """On CPU nodes Serve LLM asks vLLM for the "mp" executor (a worker process of its own); one worker
    runs in the engine core instead ("uni"). GPU nodes ("ray") and several workers are left as they are."""
    from types import SimpleNamespace

    from annotate.serving.llm_server import _engine_with_in_process_worker

    class ServeLLMEngine:  # stands in for Serve LLM's VLLMEngine, whose import needs vLLM
        def _prepare_engine_config(self, callback_ctx):
            return "args", "frontend", SimpleNamespace(parallel_config=SimpleNamespace(**callback_ctx))

    engine = _engine_with_in_process_worker(ServeLLMEngine)()
    backend = lambda **parallel: engine._prepare_engine_config(parallel)[2].parallel_config.distributed_executor_backend
    assert backend(world_size=1, distributed_executor_backend="mp") == "uni"
    assert backend(world_size=2, distributed_executor_backend="mp") == "mp"
    assert backend(world_size=1, distributed_executor_backend="ray") == "ray"


@pytest.mark.slow
def test_image_affinity_router_in_serve(ray_session):
    """Two replicas behind the router: all regions of an image land on one replica, images spread."""
    import asyncio
    from types import SimpleNamespace

    from ray import serve

    from annotate.config import RunConfig
    from annotate.serving.apps import IMAGE_AFFINITY_ROUTER, start_serve

    class WhoAnswers:
        """A model-free deployment that says which replica took a request (routing does not depend on
        what the replica computes). Defined here so that Serve pickles it by value."""

        def __init__(self):
            import uuid

            self.name = uuid.uuid4().hex

        async def chat(self, request) -> str:
            return self.name

    start_serve(RunConfig(openai_routes=False))
    app = serve.deployment(WhoAnswers).options(
        num_replicas=2, max_ongoing_requests=64,  # as our deployments: the queue never overflows here
        request_router_config={"request_router_class": IMAGE_AFFINITY_ROUTER}).bind()
    handle = serve.run(app, name="router-test", route_prefix=None)
    try:
        async def send():
            calls = [(image, handle.chat.remote(SimpleNamespace(request_id=f"00000:img{image}:{region}|n{region}")))
                     for image in range(12) for region in range(4)]
            return [(image, await response) for image, response in calls]

        answers = asyncio.run(send())
        by_image: dict[int, set[str]] = {}
        for image, replica in answers:
            by_image.setdefault(image, set()).add(replica)
        assert all(len(replicas) == 1 for replicas in by_image.values()), by_image
        assert len(set().union(*by_image.values())) == 2  # both replicas took images
    finally:
        serve.delete("router-test")


@pytest.mark.parametrize("openai_routes", [False, True])
def test_chain_workers_find_the_llm_deployment_with_or_without_the_openai_route(ray_session, openai_routes):
    from ray.serve._private.build_app import build_app as flatten

    from annotate.serving.apps import build_app, model_app

    cfg = load_config(REPO / "pipelines" / "tiny.yaml")
    cfg.run.openai_routes = openai_routes
    built = flatten(build_app("llm", cfg.models["llm"], cfg.run), name="unused")
    names = {d.name for d in built.deployments}
    assert model_app("llm", cfg.models["llm"]).deployment_name in names
    assert ("OpenAiIngress" in names) == openai_routes
