"""Image-affine request routing for models with two or more replicas.

All regions of one image carry the same image (and most of the same prompt). Sending them to one
replica lets its prefix cache hold the image's tokens once. Serve LLM's prefix-aware router matches
text only, so this router reads the image key from the request id (`shard:image_key:index|nonce`,
see `client.completion_request`) and ranks replicas by rendezvous hashing on it: the same image
always prefers the same replica, replicas joining or leaving move only their own images, and when
the preferred replica's queue is full the request goes to the least-loaded of the others.
"""

from __future__ import annotations

from typing import Any

import mmh3
from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica


def image_key(request: Any) -> str | None:
    """The image part of a request id, or None (then any replica will do)."""
    request_id = (request.get("request_id") if isinstance(request, dict) else getattr(request, "request_id", None)) or ""
    region = request_id.split("|", 1)[0]
    return region.rsplit(":", 1)[0] if ":" in region else None


def rank_replicas(key: str, replica_ids: list[str]) -> list[str]:
    """Rendezvous (highest random weight) order of replicas for `key`."""
    return sorted(replica_ids, key=lambda rid: mmh3.hash64(f"{key}|{rid}", signed=False)[0], reverse=True)


class ImageAffinityRouter(RequestRouter):
    """No FIFOMixin: with it, the replica chosen for one request is handed to whichever request is
    first in the queue, which breaks the image -> replica match; the base class hands it to the
    request it was chosen for."""

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        key = None
        if pending_request is not None and pending_request.args:
            key = image_key(pending_request.args[0])
        if key is None:
            return [candidate_replicas]
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        order = rank_replicas(key, list(by_id))
        # First the image's own replica; if it does not accept, the rest (least loaded first).
        return [[by_id[order[0]]], [by_id[rid] for rid in order[1:]]] if len(order) > 1 else [[by_id[order[0]]]]
