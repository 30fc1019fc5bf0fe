"""The quality record of a described region: what a dataset user filters on (DAM filters by a region
CLIP score, GranD by agreement between models). Computed in code, without a model, when the region's
shard is committed; the measures themselves are data-plane functions (data/quality.py).

Near-duplicate clusters need every description of the run, so they are a run-level side file written
after the shards (data/store.py), never a change to a committed shard.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pyarrow as pa

from annotate.config import QualityConfig
from annotate.data.quality import format_flags, near_duplicate_clusters, unsupported_noun_share
from annotate.data.records import Quality, RegionRecord
from annotate.data.store import OutputStore, read_region_lists


def assess(region: RegionRecord, cfg: QualityConfig) -> Quality:
    """Format flags of the description, and, when `ground` gave its phrases, the share of their nouns
    that neither the GRIT phrase nor the object caption supports (a sign of invented content)."""
    text = region.fine_caption or ""
    nouns, share = (None, None)
    if region.phrases is not None:
        nouns, share = unsupported_noun_share([p.text for p in region.phrases],
                                              [t for t in (region.phrase, region.object_caption) if t])
    return Quality(words=len(text.split()), flags=format_flags(text, cfg.min_words, cfg.max_words),
                   nouns=nouns, unsupported_noun_share=share)


def write_near_duplicates(store: OutputStore, cfg: QualityConfig) -> Path:
    """Cluster the descriptions of every dataset file into near duplicates and write the side file:
    one row per described region (region_id, cluster_id: the smallest region id of its cluster,
    cluster_size), through `OutputStore.write_side_file`."""
    files = store.dataset_files()
    items = []
    for path in files:
        for regions in read_region_lists(path):
            items += [(r["region_id"], r["fine_caption"]) for r in regions if r.get("fine_caption")]
    clusters = near_duplicate_clusters(items, threshold=cfg.duplicate_threshold)
    sizes = Counter(clusters.values())
    ids = sorted(clusters)
    table = pa.table({"region_id": ids, "cluster_id": [clusters[i] for i in ids],
                      "cluster_size": pa.array([sizes[clusters[i]] for i in ids], pa.int32())})
    return store.write_side_file(store.near_duplicates_path, table, threshold=cfg.duplicate_threshold)
