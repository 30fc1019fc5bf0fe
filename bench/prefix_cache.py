"""Figure 5, prefix and image caching: the context stage's requests sent with the regions of one image
together (the pipeline's order) versus shuffled, to one vLLM engine.

A context request is [system prompt][full image][this region's box and phrase]: every region of an
image shares the first two parts, so vLLM's prefix cache can serve them from the KV blocks of the
image's first region. Whether it does depends on whether those blocks are still cached when the
image's next region arrives. On a GPU the KV cache holds about one batch (a 76B model's cache next to
thousands of image tokens per request), so the bench gives the engine a KV cache of about
`--cache-batches` batches (`num_gpu_blocks_override`), with the smallest block size vLLM's CPU
attention takes (32 tokens).

The hit rate is vLLM's own per-request count (`RequestOutput.num_cached_tokens`, carried as
`ChatResult.cached_prompt_tokens`) over all prompt tokens. Both orders run in one process, each
round from an emptied cache (`reset_prefix_cache`), alternating so drift hits both alike.

    python -m bench.prefix_cache [--shards 2] [--copies 6] [--batch 8] [--rounds 2] [--small] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from dataclasses import replace
from pathlib import Path

from annotate.config import MaskConfig, load_config
from annotate.data.prepare import prepare_shard
from annotate.data.shards import find_shards
from annotate.engines.base import ChatRequest
from annotate.stages.base import PromptTemplate, RegionContext
from annotate.stages.context import ContextStage

REPO = Path(__file__).resolve().parent.parent
ORDERS = ("grouped", "shuffled")


def context_requests(cfg, shard_ids: list[int], input_dir: Path, copies: int = 1) -> list[tuple[str, ChatRequest]]:
    """(image key, context request) for every region of the shards, in the pipeline's order.

    Every region is treated as validated (the context stage's input condition), so the set of
    requests does not depend on what a random-weight validator said. With `copies` > 1 the images
    are repeated, each copy made distinct by a coloured corner square: a new image to vLLM (its cache key
    is a hash of the pixels), so the cache sees more images than it can hold, as on a real shard.
    """
    data = cfg.data.model_copy(update={"masks": MaskConfig(source="box")})  # the context prompt uses no mask
    sc = cfg.stages["context"]
    stage = ContextStage(PromptTemplate.load(sc.prompt), sc.sampling, cfg.models[sc.model].path)
    out = []
    for ref in find_shards(input_dir, shard_ids, data.shard_format):
        for prepared in prepare_shard(ref, data):
            record, image = prepared.record, prepared.image
            if image is None:
                continue
            for copy in range(copies):
                pixels = image
                if copy:  # a corner square of a copy-specific colour, big enough to survive resizing
                    pixels = image.copy()
                    side = max(image.size) // 8
                    pixels.paste((37 * copy % 256, 101 * copy % 256, 173 * copy % 256), (0, 0, side, side))
                for region in record.regions:
                    if region.status == "pending":
                        ctx = RegionContext(record=record, region=region, image=pixels, crops=data.crops)
                        request = stage.build_request(ctx)
                        request = replace(request, request_id=f"{copy}:{request.request_id}")
                        out.append((f"{copy}/{record.shard}/{record.image_key}", request))
    return out


def ordered(requests: list[tuple[str, ChatRequest]], order: str, seed: int) -> list[ChatRequest]:
    if order == "grouped":
        return [r for _, r in requests]
    shuffled = list(requests)
    random.Random(seed).shuffle(shuffled)
    return [r for _, r in shuffled]


def run_order(engine, requests: list[ChatRequest], batch: int) -> dict:
    engine.llm.reset_prefix_cache()
    prompt = cached = 0
    started = time.perf_counter()
    for i in range(0, len(requests), batch):
        for result in engine.chat(requests[i:i + batch]):
            if not result.ok and result.error_kind != "length":  # a random model's answer may run long: fine here
                raise RuntimeError(f"request {result.request_id} failed: {result.error}")
            prompt += result.prompt_tokens
            cached += result.cached_prompt_tokens
    return {"seconds": time.perf_counter() - started, "prompt_tokens": prompt, "cached_tokens": cached,
            "hit_rate": cached / prompt if prompt else 0.0}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "pipelines" / "tiny.yaml"))
    parser.add_argument("--shards", type=int, default=2, help="sample-data shards to take (distinct images)")
    parser.add_argument("--copies", type=int, default=6, help="distinct copies of each sample image")
    parser.add_argument("--batch", type=int, default=8, help="requests per engine call")
    parser.add_argument("--cache-batches", type=float, default=1.5, help="KV cache size, in batches of requests")
    parser.add_argument("--block-size", type=int, default=32, help="tokens per KV block (vLLM CPU: a multiple of 32)")
    parser.add_argument("--request-tokens", type=int, default=270,
                        help="prompt tokens of one context request, to size the cache (tiny model: 250-270; printed)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--small", action="store_true", help="CI: one round")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.small:
        args.rounds, args.copies = 1, 2

    from annotate.engines.vllm_engine import VllmEngine

    cfg = load_config(args.config)
    sample = REPO / "sample_data" / "grit"
    requests = context_requests(cfg, list(range(args.shards)), sample, args.copies)
    model = cfg.models[cfg.stages["context"].model]
    # Room for about `cache_batches` batches of requests, each its prompt plus its answer.
    blocks_per_request = -(-(args.request_tokens + cfg.stages["context"].sampling.max_tokens) // args.block_size)
    kv_blocks = int(args.cache_batches * args.batch * blocks_per_request)
    vllm = model.vllm.model_copy(update={"enable_prefix_caching": True, "extra": {
        **model.vllm.extra, "block_size": args.block_size, "num_gpu_blocks_override": kv_blocks}})
    engine = VllmEngine(model.model_copy(update={"vllm": vllm}))
    try:
        res = measure(engine, requests, args.batch, args.rounds)
    finally:
        engine.close()
    res.update(kv_blocks=kv_blocks, block_size=args.block_size)
    mean_prompt = res["mean_prompt_tokens"]
    print(f"prefix cache, context stage: {len(requests)} requests over {res['images']} images, batches of {args.batch}, "
          f"KV cache {kv_blocks} blocks of {args.block_size} tokens (~{kv_blocks * args.block_size / mean_prompt:.0f} "
          f"prompts of {mean_prompt:.0f} tokens)")
    print("| order | prefix-cache hit rate | cached / prompt tokens | seconds (median) |")
    print("| --- | --- | --- | --- |")
    for order in ORDERS:
        o = res["orders"][order]
        print(f"| {order} | {100 * o['hit_rate']:.1f}% | {o['cached_tokens']} / {o['prompt_tokens']} | {o['seconds']:.2f} |")
    print(f"winner: {res['winner']}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return res


def measure(engine, requests: list[tuple[str, ChatRequest]], batch: int, rounds: int) -> dict:
    """Both orders, alternating, each round from an empty prefix cache; medians over rounds."""
    runs: dict[str, list[dict]] = {o: [] for o in ORDERS}
    for r in range(rounds):
        for order in ORDERS:
            runs[order].append(run_order(engine, ordered(requests, order, seed=r), batch))
    res = {"requests": len(requests), "images": len({key for key, _ in requests}), "batch": batch, "rounds": rounds,
           "orders": {}}
    for order, runs in runs.items():
        res["orders"][order] = {
            "hit_rate": statistics.median(x["hit_rate"] for x in runs),
            "seconds": statistics.median(x["seconds"] for x in runs),
            "prompt_tokens": runs[0]["prompt_tokens"], "cached_tokens": [x["cached_tokens"] for x in runs],
        }
    g, s = res["orders"]["grouped"], res["orders"]["shuffled"]
    res["winner"] = "grouped" if g["hit_rate"] >= s["hit_rate"] else "shuffled"
    res["time_ratio_shuffled_over_grouped"] = s["seconds"] / g["seconds"] if g["seconds"] else None
    res["mean_prompt_tokens"] = g["prompt_tokens"] / len(requests)
    return res


if __name__ == "__main__":
    main()
