"""Figure 1, the data plane: regions per second on one core with no model, per mask source, vs the floor.

Per variant, for every shard: read -> decode -> regions -> mask (`prepare_shard`), then for every
region that would go to the object stage: crop views (`region_views`, via the stage's
`RegionContext`, which first decodes the stored RLE as a chain worker does) -> the object prompt
rendered with the crop images (`PromptTemplate.messages`) -> each image record written to Parquet
(`ShardWriter`, fsync + rename included). The floor is the same images only read and decoded
(`iter_samples` + `decode_image`).

Variants are interleaved round by round in one process (floor, box, given, grabcut, floor, ...) and
each is summarised by its median round, so load drift on a shared machine hits every side alike.

    python -m bench.data_plane [--shards N] [--rounds R] [--small] [--json FILE]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"  # one core: before numpy / OpenCV are imported

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import cv2  # noqa: E402

from annotate.config import DataConfig, load_config  # noqa: E402
from annotate.data.images import ImageError, decode_image  # noqa: E402
from annotate.data.prepare import prepare_shard  # noqa: E402
from annotate.data.shards import find_shards, iter_samples  # noqa: E402
from annotate.data.writer import ShardWriter  # noqa: E402
from annotate.stages.base import PromptTemplate, RegionContext  # noqa: E402
from annotate.stages.object import ObjectStage  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SOURCES = ("box", "given", "grabcut")


def floor_pass(refs, cfg: DataConfig) -> dict:
    """Read and decode only."""
    images = 0
    started, cpu = time.perf_counter(), time.process_time()
    for ref in refs:
        for sample in iter_samples(ref, cfg.images):
            if sample.image_bytes is None:
                continue
            try:
                decode_image(sample.image_bytes, cfg.images)
                images += 1
            except ImageError:
                pass
    return {"images": images, "seconds": time.perf_counter() - started, "cpu_seconds": time.process_time() - cpu}


def full_pass(refs, cfg: DataConfig, out_dir: Path, template: PromptTemplate) -> dict:
    """read -> decode -> regions -> mask -> crops -> object prompt -> Parquet, for one mask source."""
    stage = ObjectStage(template, sampling=None, model_id="bench")  # only fields() is used
    images = regions = image_parts = 0
    sources: dict[str, int] = {}
    started, cpu = time.perf_counter(), time.process_time()
    for ref in refs:
        writer = ShardWriter(out_dir / f"{ref.name}.parquet")
        try:
            for prepared in prepare_shard(ref, cfg):
                images += 1
                for region in prepared.record.regions:
                    if prepared.image is None or not stage.wants(region):
                        continue
                    ctx = RegionContext(record=prepared.record, region=region, image=prepared.image, crops=cfg.crops)
                    parts = {name: ctx.image_part(name) for name in template.images}
                    messages = template.messages(stage.fields(ctx), parts)
                    assert messages and parts
                    regions += 1
                    image_parts += len(parts)
                    sources[region.mask_source] = sources.get(region.mask_source, 0) + 1
                writer.add(prepared.record)
        except BaseException:
            writer.abort()
            raise
        writer.commit()
    return {"images": images, "regions": regions, "image_parts": image_parts, "mask_sources": sources,
            "seconds": time.perf_counter() - started, "cpu_seconds": time.process_time() - cpu}


def _sum(passes: list[dict]) -> dict:
    out = {"images": 0, "regions": 0, "seconds": 0.0, "cpu_seconds": 0.0, "mask_sources": {}}
    for p in passes:
        for k in ("images", "regions", "seconds", "cpu_seconds"):
            out[k] += p.get(k, 0)
        for k, v in p.get("mask_sources", {}).items():
            out["mask_sources"][k] = out["mask_sources"].get(k, 0) + v
    return out


def run(shards: int = 16, rounds: int = 3, config: str | Path = REPO / "pipelines" / "longgrit.yaml",
        work_dir: str | Path | None = None) -> dict:
    """Interleaved shard by shard: for each round, for each shard, floor then box, given, grabcut.
    Both clocks are kept: wall time (what a user waits) and this process's CPU time (the work done on
    the one core, insensitive to other tenants of a shared machine). Medians over rounds."""
    import pyarrow

    cv2.setNumThreads(1)
    pyarrow.set_cpu_count(1)
    pyarrow.set_io_thread_count(1)
    base = load_config(config).data
    own_tmp = None
    if work_dir is None:
        own_tmp = tempfile.TemporaryDirectory(prefix="bench-data-plane-")
        work_dir = own_tmp.name
    work = Path(work_dir)
    from bench.shards import make_shards

    ids = make_shards(work / "input", shards)
    cfgs = {src: base.model_copy(update={"masks": base.masks.model_copy(update={"source": src})}, deep=True)
            for src in SOURCES}
    refs = find_shards(work / "input", ids, base.shard_format)
    template = PromptTemplate.load(str(REPO / "prompts" / "object.yaml"))
    full_pass(refs[:1], cfgs["box"], work / "warmup", template)  # imports and first-call costs, not timed
    samples: dict[str, list[dict]] = {"floor": [], **{s: [] for s in SOURCES}}
    try:
        for r in range(rounds):
            per: dict[str, list[dict]] = {k: [] for k in samples}
            for ref in refs:
                per["floor"].append(floor_pass([ref], base))
                for src in SOURCES:
                    per[src].append(full_pass([ref], cfgs[src], work / "out" / src / str(r), template))
            for k, v in per.items():
                samples[k].append(_sum(v))
    finally:
        if own_tmp is not None:
            own_tmp.cleanup()

    def med(name: str, clock: str) -> float:
        return statistics.median(s[clock] for s in samples[name])

    floor_images = samples["floor"][0]["images"]
    results: dict = {
        "shards": shards, "rounds": rounds, "config": str(config), "cpu_threads": 1,
        "loadavg_1m": os.getloadavg()[0], "floor": {"images": floor_images}, "sources": {},
    }
    for clock, tag in (("cpu_seconds", "cpu"), ("seconds", "wall")):
        f = med("floor", clock)
        results["floor"][f"{tag}_seconds"] = f
        results["floor"][f"images_per_{tag}_s"] = floor_images / f
    for src in SOURCES:
        s = samples[src][0]
        row = {"images": s["images"], "regions": s["regions"], "mask_sources": s["mask_sources"]}
        for clock, tag in (("cpu_seconds", "cpu"), ("seconds", "wall")):
            secs, f = med(src, clock), med("floor", clock)
            row[f"{tag}_seconds"] = secs
            row[f"regions_per_{tag}_s"] = s["regions"] / secs
            row[f"floor_regions_per_{tag}_s"] = s["regions"] / f  # the same regions at read+decode speed
            row[f"ratio_{tag}"] = secs / f  # time of the whole data plane / time of read+decode
            row[f"ratio_{tag}_per_round"] = [v[clock] / fl[clock] for v, fl in zip(samples[src], samples["floor"])]
        results["sources"][src] = row
    return results


def print_table(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    f = results["floor"]
    console = Console()
    if not console.is_terminal:
        console = Console(width=150)
    table = Table(title=f"data plane, 1 thread, {results['shards']} shards x {results['rounds']} rounds interleaved shard "
                        f"by shard (median); floor (read+decode) {f['images_per_cpu_s']:.1f} images per CPU-s, "
                        f"{f['images_per_wall_s']:.1f} images per wall-s")
    for col in ("mask source", "images", "regions", "regions/CPU-s", "floor regions/CPU-s", "time/floor (CPU)",
                "regions/wall-s", "time/floor (wall)", "masks used"):
        table.add_column(col, justify="left" if col in ("mask source", "masks used") else "right")
    for src, s in results["sources"].items():
        table.add_row(src, str(s["images"]), str(s["regions"]), f"{s['regions_per_cpu_s']:.1f}",
                      f"{s['floor_regions_per_cpu_s']:.1f}", f"{s['ratio_cpu']:.2f}", f"{s['regions_per_wall_s']:.1f}",
                      f"{s['ratio_wall']:.2f}", ", ".join(f"{k} {v}" for k, v in sorted(s["mask_sources"].items())))
    console.print(table)
    for src, s in results["sources"].items():
        console.print(f"{src}: time/floor per round, CPU {', '.join(f'{x:.2f}' for x in s['ratio_cpu_per_round'])}; "
                      f"wall {', '.join(f'{x:.2f}' for x in s['ratio_wall_per_round'])}")
    console.print(f"load average (1 min) at the end: {results['loadavg_1m']:.2f}")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", type=int, default=16, help="copies of the sample shards (4 images each)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is reported")
    p.add_argument("--config", default=str(REPO / "pipelines" / "longgrit.yaml"), help="its `data` section is used")
    p.add_argument("--small", action="store_true", help="CI mode: 2 shards, 1 round")
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args(argv)
    if a.small:
        a.shards, a.rounds = 2, 1
    results = run(a.shards, a.rounds, a.config)
    print_table(results)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
