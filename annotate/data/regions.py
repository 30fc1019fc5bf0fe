"""GRIT `ref_exps` / `noun_chunks` entries -> `RegionRecord`s, with the filters of `RegionConfig`.

An entry is `[char_start, char_end, x_min, y_min, x_max, y_max, score]`, the box normalised to
[0, 1] of the displayed image; the phrase is `caption[char_start:char_end]` in Python str offsets.
Nothing is dropped: every entry becomes exactly one region, "pending" or "failed"/"rejected" with a
readable `error`, and its id `f"{shard}:{image_key}:{index}"` uses the entry's position in the list.

Choice for char spans: a span outside the caption (start < 0, end > len, start >= end) fails the
region instead of clipping the phrase; offsets that disagree with the caption usually mean another
encoding (bytes vs characters), so a clipped phrase would be silently wrong text.
"""

from __future__ import annotations

import math
import reprlib

from annotate.config import LimitsConfig, RegionConfig
from annotate.data.records import RegionRecord

_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxstring, _SHORT.maxother = 3, 8, 40, 40


def _short(x) -> str:
    """A bounded repr of hostile input (no recursion past 3 levels, no long strings)."""
    try:
        return _SHORT.repr(x)[:120]
    except Exception:  # noqa: BLE001
        return f"<{type(x).__name__}>"


def region_id(shard_name: str, image_key: str, index: int) -> str:
    return f"{shard_name}:{image_key}:{index}"


def region_entries(meta: dict, cfg: RegionConfig, limits: LimitsConfig | None = None) -> tuple[list, str | None]:
    """The raw entry list, and a problem when the field is missing, null, not a list or longer than
    `limits.max_entries`: such an image has no usable regions, and the problem becomes its record's
    `error` (an empty list is fine). The length is checked before any region is built, so a hostile
    list costs nothing."""
    limits = limits or LimitsConfig()
    if cfg.source not in meta:
        return [], f"no {cfg.source} in the json"
    entries = meta[cfg.source]
    if entries is None:
        return [], f"{cfg.source} is null"
    if isinstance(entries, str):  # some dumps keep nested lists as JSON text
        import json

        try:
            entries = json.loads(entries)
        except (ValueError, RecursionError):
            return [], f"{cfg.source} is text that is not JSON"
    if not isinstance(entries, (list, tuple)):
        return [], f"{cfg.source} is a {type(entries).__name__}, not a list"
    if len(entries) > limits.max_entries:
        return [], (f"{cfg.source} has {len(entries)} entries > max_entries {limits.max_entries}: "
                    "the sample's regions are refused unread")
    return list(entries), None


def regions_from_meta(
    meta: dict, shard_name: str, image_key: str, width: int, height: int, cfg: RegionConfig,
    limits: LimitsConfig | None = None,
) -> list[RegionRecord]:
    """One region per source entry; boxes in pixels of the displayed width x height image. None when the
    sample has more than `limits.max_entries` entries (`region_entries` says so)."""
    limits = limits or LimitsConfig()
    caption = meta.get("caption")
    caption = caption if isinstance(caption, str) else ""
    entries, _ = region_entries(meta, cfg, limits)
    regions = [_one_region(e, i, caption, shard_name, image_key, width, height, cfg, limits)
               for i, e in enumerate(entries)]
    _apply_filters(regions, width, height, cfg)
    return regions


def _num(x) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    try:
        x = float(x)
    except OverflowError:  # an int past a float's range (10**400)
        return None
    return x if math.isfinite(x) else None


def _one_region(entry, index: int, caption: str, shard: str, key: str, width: int, height: int,
                cfg: RegionConfig | None = None, limits: LimitsConfig | None = None) -> RegionRecord:
    cfg, limits = cfg or RegionConfig(), limits or LimitsConfig()
    rid = region_id(shard, key, index)

    def failed(error: str, phrase: str = "", bbox=(0.0, 0.0, 0.0, 0.0), score=None) -> RegionRecord:
        return RegionRecord(
            region_id=rid, region_index=index, phrase=phrase[: limits.max_phrase_chars], bbox=list(bbox), score=score,
            status="failed", error=error,
        )

    if not isinstance(entry, (list, tuple)) or len(entry) < 6:
        return failed(f"malformed entry {_short(entry)}: expected [char_start, char_end, x0, y0, x1, y1, score]")
    nums = [_num(v) for v in entry[:7]]
    score = nums[6] if len(nums) > 6 else None
    if any(v is None for v in nums[:6]):
        bad = next(v for v, n in zip(entry, nums) if n is None)
        why = ("a number out of range" if isinstance(bad, int) and not isinstance(bad, bool)
               else "a non-numeric or non-finite value")
        return failed(f"{why} ({_short(bad)}) in entry {_short(list(entry[:7]))}", score=score)
    cs, ce = nums[0], nums[1]
    if cs != int(cs) or ce != int(ce):
        return failed(f"char span [{cs}, {ce}) is not integer", score=score)
    cs, ce = int(cs), int(ce)
    norm = nums[2:6]
    x0, y0, x1, y1 = (norm[0] * width, norm[1] * height, norm[2] * width, norm[3] * height)
    raw_box = (x0, y0, x1 - x0, y1 - y0)
    if not (0 <= cs < ce <= len(caption)):
        return failed(
            f"char span [{cs}, {ce}) outside caption of length {len(caption)}",
            phrase=caption[max(cs, 0):max(ce, 0)][: limits.max_phrase_chars], bbox=raw_box, score=score,
        )
    if ce - cs > limits.max_phrase_chars:
        return failed(f"phrase of {ce - cs} characters > max_phrase_chars {limits.max_phrase_chars}",
                      caption[cs: cs + limits.max_phrase_chars], raw_box, score)
    phrase = caption[cs:ce]
    tol = cfg.box_tolerance
    if any(v < -tol or v > 1 + tol for v in norm):
        return failed(f"box {_fmt_norm(norm)} is outside [0, 1] (beyond box_tolerance {tol:g}): GRIT boxes are "
                      "normalised, this one is not (pixel coordinates?)", phrase, raw_box, score)
    if x1 <= x0 or y1 <= y0:
        return failed(f"inverted or zero-area box {_fmt_norm(norm)}", phrase, raw_box, score)
    cx0, cy0 = min(max(x0, 0.0), width), min(max(y0, 0.0), height)
    cx1, cy1 = min(max(x1, 0.0), width), min(max(y1, 0.0), height)
    if cx1 - cx0 <= 0 or cy1 - cy0 <= 0:
        return failed(f"box {_fmt_norm(norm)} is entirely outside the image", phrase, raw_box, score)
    if cx1 - cx0 < cfg.min_box_pixels or cy1 - cy0 < cfg.min_box_pixels:
        return failed(f"box {_fmt_norm(norm)} is {cx1 - cx0:.2g} x {cy1 - cy0:.2g} pixels, under min_box_pixels "
                      f"{cfg.min_box_pixels:g} of the {width}x{height} image", phrase, raw_box, score)
    return RegionRecord(
        region_id=rid, region_index=index, phrase=phrase, bbox=[cx0, cy0, cx1 - cx0, cy1 - cy0], score=score
    )


def _fmt_norm(box) -> str:
    return "[" + ", ".join(f"{v:.3g}" for v in box) + "] (normalised x0, y0, x1, y1)"


def iou_xywh(a, b) -> float:
    ax1, ay1, bx1, by1 = a[0] + a[2], a[1] + a[3], b[0] + b[2], b[1] + b[3]
    iw = max(0.0, min(ax1, bx1) - max(a[0], b[0]))
    ih = max(0.0, min(ay1, by1) - max(a[1], b[1]))
    inter = iw * ih
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


def _apply_filters(regions: list[RegionRecord], width: int, height: int, cfg: RegionConfig) -> None:
    """Score, area, near-duplicates (the higher-scored box is kept), then the per-image cap.
    Duplicates are merged before the cap so they do not use up its slots."""
    area = float(width * height) or 1.0
    live = [r for r in regions if r.status == "pending"]
    for r in live:
        if r.score is not None and r.score < cfg.min_score:
            _reject(r, f"score {r.score:.2f} < min_score {cfg.min_score:.2f}")
        elif cfg.min_area_frac > 0 and r.bbox[2] * r.bbox[3] / area < cfg.min_area_frac:
            frac = r.bbox[2] * r.bbox[3] / area
            _reject(r, f"box area {frac:.2%} of the image < min_area_frac {cfg.min_area_frac:.2%}")
    # Highest score first; the source order breaks ties, so results do not depend on sort details.
    ranked = sorted(
        (r for r in live if r.status == "pending"),
        key=lambda r: (-(r.score if r.score is not None else -math.inf), r.region_index),
    )
    # Each box is compared with the kept ones only, and at most max_regions_per_image are kept: the
    # de-duplication costs O(n * max_regions_per_image), never O(n^2), whatever the input.
    kept: list[RegionRecord] = []
    distinct = 0
    for r in ranked:
        dup = next(((k, iou) for k in kept if (iou := iou_xywh(k.bbox, r.bbox)) > cfg.merge_iou), None)
        if dup is not None:
            _reject(r, f"near-duplicate of region {dup[0].region_index} (IoU {dup[1]:.2f})")
            continue
        distinct += 1
        if len(kept) < cfg.max_regions_per_image:
            kept.append(r)
        else:
            _reject(r, f"over max_regions_per_image {cfg.max_regions_per_image} (rank {distinct} by score)")


def _reject(region: RegionRecord, error: str) -> None:
    region.status = "rejected"
    region.error = error
