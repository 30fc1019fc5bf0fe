"""One shard -> `ImageRecord`s with regions and masks, ready for the captioning stages.

Every input sample leaves here as exactly one record (an unusable one with an image-level `error`),
and every source region exactly once: "pending" with a mask, or "rejected"/"failed" with a readable
`error`. A bad sample never raises out of `prepare_shard`, so one broken image cannot stop a shard;
a damaged shard ends with `ShardStats.damage` set, after the records of what could be read.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from annotate.config import DataConfig
from annotate.data.images import ImageError, decode_image
from annotate.data.masks import MaskError, encode_rle, make_mask_explained
from annotate.data.records import ImageRecord, RegionRecord
from annotate.data.regions import region_entries, regions_from_meta
from annotate.data.raw_sample import RawSample, ShardRead, error_text, printable
from annotate.data.shards import ShardRef, iter_samples
from annotate.data.store import PREPARE, OutputStore, prepare_fingerprint, input_changed, input_stamp
from annotate.data.writer import fill, status_counts

log = logging.getLogger(__name__)
MAX_KEPT_PROBLEMS = 200  # problems past this are counted, not stored


@dataclass
class PreparedImage:
    record: ImageRecord
    image: Image.Image | None  # decoded RGB, displayed orientation; None when undecodable
    problems: list[str] = field(default_factory=list)


@dataclass
class ShardStats:
    """Per-shard summary, filled while `prepare_shard` runs.

    `damage` is final once the stream is exhausted: None for a shard read whole, else a one-line
    reason (truncated or corrupt archive, unreadable file); `images` then counts the samples read
    before it, which all came out as records. `image_errors` counts records with an image-level error.
    """

    shard: str = ""
    images: int = 0
    images_undecodable: int = 0
    image_errors: int = 0
    problems: list[str] = field(default_factory=list)
    problem_count: int = 0
    regions: dict = field(default_factory=lambda: status_counts([]))
    damage: str | None = None

    def add_problem(self, msg: str) -> None:
        self.problem_count += 1
        if len(self.problems) < MAX_KEPT_PROBLEMS:
            self.problems.append(printable(msg)[:1000])  # never raw input on a terminal, never a huge line

    def add(self, p: PreparedImage) -> None:
        self.images += 1
        if p.record.image_bytes is None:
            self.images_undecodable += 1
        if p.record.error is not None:
            self.image_errors += 1
        for msg in p.problems:
            self.add_problem(f"{p.record.image_key}: {msg}")
        for k, v in status_counts([p.record]).items():
            self.regions[k] += v

    def take(self, read: ShardRead) -> None:
        """Move the shard-level problems found so far (and the damage, once known) in."""
        for msg in read.problems:
            self.add_problem(msg)
        read.problems.clear()
        self.damage = read.damage

    def summary(self) -> dict:
        return {**self.regions, "images": self.images, "undecodable": self.images_undecodable,
                "image_errors": self.image_errors, "problems": self.problem_count, "damage": self.damage}


def prepare_shard(shard: ShardRef, cfg: DataConfig, stats: ShardStats | None = None) -> Iterator[PreparedImage]:
    """Stream the shard's images as records, one per input sample; pass `stats` to collect the shard
    summary, whose `damage` says, once the stream is exhausted, whether the shard was read whole."""
    read = ShardRead()
    stats = stats if stats is not None else ShardStats()
    stats.shard = shard.name
    for sample in iter_samples(shard, cfg.images, read, cfg.limits, (cfg.regions.source, cfg.masks.given_field)):
        stats.take(read)
        try:
            prepared = prepare_sample(sample, shard.name, cfg)
        except Exception as e:  # noqa: BLE001 - last resort: the sample fails, the shard goes on
            log.exception("preparing %s:%s failed", shard.name, sample.key)
            prepared = _crashed(sample, shard.name, cfg, f"internal error: {type(e).__name__}: {e}")
        stats.add(prepared)
        yield prepared
    stats.take(read)


def prepare_sample(sample: RawSample, shard_name: str, cfg: DataConfig) -> PreparedImage:
    """The sample's record. Its image-level `error` says why the sample is unusable (nothing read,
    json missing or not an object, regions source not a list, image missing or undecodable, an exact
    copy); regions it has are then failed with the reason, so none goes on to the models."""
    problems = list(sample.problems)
    meta = sample.meta
    image: Image.Image | None = None
    image_error = sample.image_error
    if sample.image_bytes is not None:
        try:
            image = decode_image(sample.image_bytes, cfg.images)
        except ImageError as e:
            image_error = f"image not decodable: {e}"
            problems.append(image_error)

    caption = _caption(meta, sample.text)
    if image is not None:
        width, height = image.size  # displayed size (after EXIF orientation) is what boxes refer to
    else:
        width, height = _json_int(meta, "width"), _json_int(meta, "height")
    record = ImageRecord(
        image_key=sample.key,
        shard=shard_name,
        width=width,
        height=height,
        caption=caption,
        url=meta.get("url") if meta and isinstance(meta.get("url"), str) else None,
        image_bytes=sample.image_bytes if image is not None else None,
    )
    entries_problem = region_entries(meta, cfg.regions, cfg.limits)[1] if meta is not None else None
    copy = f"exact copy of sample {sample.copy_of!r} (same key, image and json)" if sample.copy_of else None
    record.error = sample.error or "; ".join(e for e in (sample.meta_error, entries_problem, image_error, copy) if e) or None
    if meta is None:
        return PreparedImage(record, image, problems)
    if entries_problem:
        problems.append(entries_problem)
    regions = regions_from_meta(meta, shard_name, sample.key, max(width, 0), max(height, 0), cfg.regions, cfg.limits)
    record.regions = regions
    if copy is not None:
        _fail_all(regions, f"duplicate: {copy} in shard {shard_name}")
    elif image is None:
        _fail_all(regions, image_error or "no image")
    else:
        rgb = np.asarray(image)
        for region in regions:
            if region.status == "pending":
                _add_mask(region, rgb, meta, cfg)
    return PreparedImage(record, image, problems)


def _add_mask(region: RegionRecord, rgb: np.ndarray, meta: dict, cfg: DataConfig) -> None:
    try:
        result = make_mask_explained(rgb, region, meta, cfg.masks)
        if not result.mask.any():
            raise MaskError("mask is empty")
        region.mask = encode_rle(result.mask)
        region.mask_source = result.source
        if result.note:
            log.debug("%s: mask fell back to %s: %s", region.region_id, result.source, result.note)
    except MaskError as e:
        region.status, region.error, region.mask_source = "failed", f"mask: {e}", "none"
    except Exception as e:  # noqa: BLE001 - one region's bad mask must not lose the image
        region.status, region.error, region.mask_source = "failed", f"mask: {type(e).__name__}: {e}", "none"


def _fail_all(regions: list[RegionRecord], error: str) -> None:
    for r in regions:
        r.status, r.error = "failed", error


def _caption(meta: dict | None, text: str | None) -> str:
    cap = meta.get("caption") if meta else None
    if isinstance(cap, str):
        return cap
    return text.strip() if text else ""


def _json_int(meta: dict | None, name: str) -> int:
    v = meta.get(name) if meta else None
    try:
        n = int(v) if v is not None and not isinstance(v, bool) else 0
    except (TypeError, ValueError, OverflowError):
        return 0
    return n if 0 < n < 2**31 else 0  # a record's width and height are int32: anything else is unknown


def _crashed(sample: RawSample, shard_name: str, cfg: DataConfig, error: str) -> PreparedImage:
    """A record for a sample whose preparation raised: regions as far as they can be read, failed."""
    meta = sample.meta if isinstance(sample.meta, dict) else None
    regions: list[RegionRecord] = []
    try:
        if meta is not None:
            regions = regions_from_meta(
                meta, shard_name, sample.key, _json_int(meta, "width"), _json_int(meta, "height"), cfg.regions,
                cfg.limits,
            )
    except Exception:  # noqa: BLE001
        regions = []
    _fail_all(regions, error)
    record = ImageRecord(
        image_key=sample.key, shard=shard_name, width=_json_int(meta, "width"), height=_json_int(meta, "height"),
        caption=_caption(meta, sample.text), regions=regions, error=error,
    )
    return PreparedImage(record, None, [*sample.problems, error])


def prepare_output(shard: ShardRef, data: DataConfig, store: OutputStore, fingerprint: str,
                   stats: ShardStats | None = None, on_record: Callable[[], None] | None = None) -> dict:
    """Run the data plane over one source shard and store it as the `prepare` output; returns its
    manifest line (`damaged`, with the reason and the samples read, when the shard was read in part)
    for the manifest's one writer to record. Used by `annotate prepare` and by a run's read tasks."""
    stats = stats if stats is not None else ShardStats()

    def records() -> Iterator[ImageRecord]:
        for prepared in prepare_shard(shard, data, stats):
            yield prepared.record
            if on_record is not None:
                on_record()

    stamp = input_stamp(shard.path)  # before reading: a file replaced while it is read is redone
    try:
        writer = fill(store.writer(PREPARE, shard.name), records())
    except Exception as e:  # noqa: BLE001 - last resort: the shard is damaged with the reason, the call goes on
        log.exception("preparing shard %s failed", shard.name)
        stats.damage = (f"internal error while preparing the shard after {stats.images} sample(s) "
                        f"({error_text(e)}): nothing of it is stored")
        writer = fill(store.writer(PREPARE, shard.name), [])
    damage = {"damage": stats.damage, "samples_read": stats.images} if stats.damage else None
    line = store.commit_file(writer, PREPARE, shard.name, fingerprint, damage)
    return {**line, "input": stamp} if stamp else line


_CARD_COUNTS = ("images", "image_errors", "regions", "ok", "rejected", "failed", "pending")


def _whole_output(store: OutputStore, fingerprint: str, this_call: dict[str, dict]) -> dict:
    """What the dataset card says: every shard of the output under this config (from the manifest,
    damaged ones included), not only the shards of this call."""
    shards: dict[str, dict] = {}
    for shard, line in store.latest(PREPARE).items():
        if line.get("config") != fingerprint or line.get("state", "finished") not in ("finished", "damaged"):
            continue
        shards[shard] = {**{k: line.get(k, 0) for k in _CARD_COUNTS}, "damage": line.get("damage")}
    for shard, stats in this_call.items():  # a shard whose output could not be stored has no line
        shards.setdefault(shard, {**{k: stats.get(k, 0) for k in _CARD_COUNTS}, "damage": stats.get("damage")})
    totals = {k: sum(int(v.get(k) or 0) for v in shards.values()) for k in _CARD_COUNTS}
    damaged = {shard: v["damage"] for shard, v in shards.items() if v.get("damage")}
    return {"shards": shards, "totals": totals, "damaged": damaged}


def run_prepare(input_dir: str, shard_spec: str, output: str, config_path: str | None = None) -> dict:
    """`annotate prepare`: each shard -> OUT/stages/prepare/NNNNN.parquet with its manifest line (the
    store `annotate run` resumes from, under the same --config), then OUT/README.md pointing
    `datasets` at those files. Shards already prepared under this config are skipped.

    Returns a summary: "shards" (per shard prepared now: `ShardStats.summary()` + sha256), "skipped",
    "totals" (region counts), "images", "image_errors" and "damaged" ({shard: reason}). A damaged
    shard's samples read before the damage are written; the caller decides the exit code from "damaged"."""
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from annotate.config import PipelineConfig, load_config
    from annotate.data.shards import find_shards, parse_shard_spec

    cfg = load_config(config_path) if config_path else PipelineConfig()
    fingerprint = prepare_fingerprint(cfg)  # the data settings alone: a new prompt keeps the prepared shards
    refs = find_shards(input_dir, parse_shard_spec(shard_spec), cfg.data.shard_format)
    store = OutputStore(output)
    console = Console(stderr=True)
    totals = status_counts([])
    per_shard: dict[str, dict] = {}
    damaged: dict[str, str] = {}
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[images]} images"))
    with store.lock(), Progress(*columns, console=console) as progress:
        store.remove_stale_temporaries()
        finished = store.finished(PREPARE, fingerprint)
        done = {ref.name for ref in refs if ref.name in finished and not input_changed(finished[ref.name], ref.path)}
        skipped = [ref.name for ref in refs if ref.name in done]
        todo = [ref for ref in refs if ref.name not in done]
        task = progress.add_task("shards", total=len(todo), images=0)
        images = 0

        def one_more_image() -> None:
            nonlocal images
            images += 1
            progress.update(task, images=images)

        for ref in todo:
            progress.update(task, description=f"shard {ref.name}")
            stats = ShardStats()
            try:
                line = prepare_output(ref, cfg.data, store, fingerprint, stats, one_more_image)
                store.record(line)
            except Exception as e:  # noqa: BLE001 - e.g. the output cannot be written: say so, go on
                log.exception("shard %s could not be stored", ref.name)
                stats.damage = f"not stored ({error_text(e)})"
                line = {"sha256": None}
            progress.advance(task)
            per_shard[ref.name] = {**stats.summary(), "sha256": line["sha256"]}
            for k, v in stats.regions.items():
                totals[k] += v
            for msg in stats.problems[:5]:
                console.print(f"[yellow]{escape(ref.name)}: {escape(msg)}[/yellow]")
            if stats.damage:
                damaged[ref.name] = stats.damage
                console.print(f"[bold red]shard {ref.name} is DAMAGED: {escape(stats.damage)}; "
                              f"the {stats.images} sample(s) read were written[/bold red]")
        summary = {"images": sum(s["images"] for s in per_shard.values()),
                   "image_errors": sum(s["image_errors"] for s in per_shard.values()), "damaged": damaged}
        store.write_card(PREPARE, title=f"{cfg.name}: prepared regions", config_fingerprint=fingerprint,
                         **_whole_output(store, fingerprint, per_shard))
    if skipped:
        console.print(f"{len(skipped)} shard(s) already prepared under this config: {', '.join(skipped)}")
    console.print(f"wrote {len(todo)} shard(s) to {store.folder(PREPARE)}: {totals}")
    if damaged:
        console.print(f"[bold red]{len(damaged)} damaged shard(s), not read to their end: "
                      f"{escape(', '.join(damaged))}[/bold red]")
    return {"shards": per_shard, "skipped": skipped, "totals": totals, **summary}
