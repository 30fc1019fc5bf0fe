"""Figure 13, hostile shards: wall time and peak memory of one shard's `prepare_output`, per attack
class, as the attack grows 10-100x (issue 25: "peak memory stays within a fixed bound per worker
whatever the input").

For each class a shard is built at growing sizes; every shard holds a good sample before the attack
and one after it (`a`, the hostile sample, `z`), except the baseline, a bundled sample shard
(`sample_data/grit/00000.tar`). Each shard runs in a fresh Python process under the default
`annotate prepare` settings (`PipelineConfig().data`: GrabCut masks, the default `data.limits`):

1. imports, then one warm-up `prepare_output` over a one-sample shard (so lazy imports, the Parquet
   writer and allocator arenas are paid before measuring);
2. RSS now (`/proc/self/statm`) is the process's floor;
3. `prepare_output` over the hostile shard; wall seconds;
4. peak = the process's own high-water RSS (`VmHWM`, /proc/self/status) - the floor: what the shard
   cost. Not `ru_maxrss`: after the parent's fork + exec it may carry the parent's high-water mark (seen:
   921 MB for the baseline shard when the parent was a pytest process holding torch); it is kept beside
   as `ru_maxrss_mb`. CPU seconds beside the wall seconds, so that a slow row on a loaded machine can be
   told from work.

"over baseline" is that peak minus the baseline shard's. The output file is then read back (its
`image_key` column only): each sample it holds must be there exactly once, and a shard that lost data
must be `damaged`.

    python -m bench.hostile_shards [--json FILE] [--small]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # one core per worker, as a read task has

import argparse  # noqa: E402
import io  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tarfile  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
BASELINE_SHARD = REPO / "sample_data" / "grit" / "00000.tar"
CAP = "a red square on a gradient"
ENTRY = [2, 14, 0.25, 0.25, 0.5, 0.75, 0.9]  # "red square", normalised box
CHILD_TIMEOUT_S = 600

# class -> sizes (full run, --small run); the size is the attack's magnitude in the class's unit
CLASSES: dict[str, tuple[str, list[int], list[int]]] = {
    "baseline": ("samples", [4], [4]),
    "many_boxes": ("boxes", [1_000, 10_000, 40_000, 100_000], [1_000]),
    "deep_json": ("depth", [1_000, 10_000, 100_000], [1_000]),
    "dense_json": ("json KB", [200, 1_900, 20_000], [200]),
    "pax_size": ("declared B", [10**9, 10**12, 10**15], [10**15]),
    "zero_tail": ("zero MB", [1, 10, 100], [1]),
    "unread_parts": ("parts", [1_000, 10_000, 100_000], [1_000]),
    "huge_caption": ("caption KB", [100, 1_000, 10_000], [100]),
}


# ------------------------------------------------------------------------------ shard builders
def _photo(width: int = 96, height: int = 64, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    a = np.stack([xx * 255 / (width - 1), yy * 255 / (height - 1), np.full_like(xx, 128)], -1)
    return np.clip(a + rng.normal(0, 8, a.shape), 0, 255).astype(np.uint8)


def _jpeg(seed: int = 0) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(_photo(seed=seed)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _meta(key: str, ref_exps: list, caption: str = CAP, **extra) -> dict:
    """A GRIT-20M json row (the columns img2dataset writes)."""
    return {"id": 0, "url": f"https://example.invalid/{key}.jpg", "caption": caption, "width": 96, "height": 64,
            "noun_chunks": [], "ref_exps": ref_exps, "clip_similarity_vitb32": 0.3, "key": key, "status": "success",
            **extra}


def _good(key: str, seed: int = 0) -> list[tuple[str, bytes]]:
    return [(f"{key}.jpg", _jpeg(seed)), (f"{key}.json", json.dumps(_meta(key, [ENTRY])).encode()),
            (f"{key}.txt", CAP.encode())]


def _write_tar(path: Path, members, pax: dict[str, dict] | None = None) -> Path:
    """Members in order (an iterable, so a shard of 100k parts is never a list in memory)."""
    pax = pax or {}
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.mtime, info.size = 0, len(data)
            if name in pax:
                info.pax_headers = pax[name]
            tar.addfile(info, io.BytesIO(data))
    return path


def build(cls: str, size: int, path: Path) -> list[str]:
    """Write the shard of class `cls` at `size` to `path`; returns the sample keys the file holds."""
    if cls == "baseline":
        shutil.copy(BASELINE_SHARD, path)
        with tarfile.open(path) as tar:
            return list(dict.fromkeys(m.name.split(".", 1)[0] for m in tar.getmembers() if m.isreg()))
    keys = ["a", "k", "z"]
    head, tail = _good("a"), _good("z", 1)
    if cls == "many_boxes":  # `size` boxes in one sample (GRIT has a handful)
        boxes = [[0, 10, (i % 97) / 200, (i % 89) / 200, 0.6, 0.7, 0.5] for i in range(size)]
        _write_tar(path, [*head, ("k.jpg", _jpeg(2)), ("k.json", json.dumps(_meta("k", boxes)).encode()), *tail])
    elif cls == "deep_json":  # a json nested `size` levels deep
        deep = b'{"caption": "' + CAP.encode() + b'", "x": ' + b"[" * size + b"1" + b"]" * size + b"}"
        _write_tar(path, [*head, ("k.jpg", _jpeg(2)), ("k.json", deep), *tail])
    elif cls == "dense_json":  # the most Python objects per json byte: `size` KB of empty objects
        text = json.dumps(_meta("k", [ENTRY])).encode()[:-1] + b', "x": [' + b"{}," * (size * 1024 // 3) + b"{}]}"
        _write_tar(path, [*head, ("k.jpg", _jpeg(2)), ("k.json", text), *tail])
    elif cls == "pax_size":  # a pax header declaring `size` bytes for a member of a few KB
        _write_tar(path, [*head, ("k.jpg", _jpeg(2)), ("k.json", json.dumps(_meta("k", [ENTRY])).encode()), *tail],
                   pax={"k.jpg": {"size": str(size)}})
    elif cls == "zero_tail":  # a preallocated download that died: `size` MB of zeros after the data
        _write_tar(path, [*head, ("k.jpg", _jpeg(2)), ("k.json", json.dumps(_meta("k", [ENTRY])).encode()), *tail])
        with open(path, "ab") as f:
            chunk = bytes(2**20)
            for _ in range(size):
                f.write(chunk)
    elif cls == "unread_parts":  # one sample of `size` parts no step reads
        parts = ((f"k.part{i}", b"x" * 16) for i in range(size))
        sample = [("k.jpg", _jpeg(2)), ("k.json", json.dumps(_meta("k", [ENTRY])).encode())]
        _write_tar(path, itertools.chain(head, sample, parts, tail))
    elif cls == "huge_caption":  # a caption of `size` KB, in the json and the txt, with phrases spanning it
        caption = (CAP + " ") * (size * 1024 // (len(CAP) + 1))
        spans = [[0, len(caption), 0.1, 0.1, 0.9, 0.9, 0.9], [0, 10**6, 0.2, 0.2, 0.8, 0.8, 0.8], ENTRY]
        _write_tar(path, [*head, ("k.jpg", _jpeg(2)), ("k.json", json.dumps(_meta("k", spans, caption)).encode()),
                          ("k.txt", caption.encode()), *tail])
    else:
        raise ValueError(cls)
    return keys


# ------------------------------------------------------------------------------ one shard, one process
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _why(res: dict) -> str | None:
    """The shard's damage, else the first problem of the hostile sample (its refusal)."""
    return res.get("damage") or next((p for p in res.get("problems", []) if p.startswith("k: ")), None)


def _vmhwm_bytes() -> int:
    """The kernel's high-water RSS of this process's own memory image (unlike ru_maxrss, which after a
    fork + exec may still hold the parent's high-water mark)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def child(shard: Path, out: Path, warm: Path) -> dict:
    """In a fresh process: warm up, then `prepare_output` over `shard`; what it cost."""
    import gc
    import resource

    from annotate.config import PipelineConfig
    from annotate.data.prepare import ShardStats, prepare_output
    from annotate.data.shards import ShardRef
    from annotate.data.store import OutputStore, prepare_fingerprint

    cfg = PipelineConfig()
    fingerprint = prepare_fingerprint(cfg)
    prepare_output(ShardRef(0, "00000", warm, "webdataset"), cfg.data, OutputStore(out / "warm"), fingerprint)
    gc.collect()
    floor, peak_before = _rss_bytes(), _vmhwm_bytes()
    stats = ShardStats()
    t0, cpu0 = time.perf_counter(), time.process_time()
    line = prepare_output(ShardRef(0, "00000", shard, "webdataset"), cfg.data, OutputStore(out / "run"),
                          fingerprint, stats)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    peak = _vmhwm_bytes()
    return {"wall_s": wall, "cpu_s": cpu, "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10,
            "floor_rss_mb": floor / 2**20,
            "peak_rss_mb": peak / 2**20,
            "peak_before_mb": peak_before / 2**20, "cost_mb": max(0, peak - floor) / 2**20,
            "state": line.get("state", "finished"), "damage": stats.damage, "images": stats.images,
            "image_errors": stats.image_errors, "problems": stats.problems[:5]}


def run_one(cls: str, size: int, work: Path) -> dict:
    """Build the shard, measure it in a fresh process, check the output; the shard is removed after."""
    import pyarrow.parquet as pq

    case = work / f"{cls}-{size}"
    case.mkdir(parents=True)
    shard = case / "00000.tar"
    t0 = time.perf_counter()
    keys = build(cls, size, shard)
    built_s, shard_bytes = time.perf_counter() - t0, shard.stat().st_size
    warm = _write_tar(case / "warm.tar", _good("w"))
    cmd = [sys.executable, "-m", "bench.hostile_shards", "--child", str(shard), str(case / "out"), str(warm)]
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        res = {"state": "timeout", "wall_s": float(CHILD_TIMEOUT_S), "cost_mb": float("nan"),
               "peak_rss_mb": float("nan")}
    else:
        if proc.returncode != 0:
            raise RuntimeError(f"{cls} {size}: child failed\n{proc.stderr[-3000:]}")
        res = json.loads(proc.stdout.strip().splitlines()[-1])
    out_file = case / "out" / "run" / "stages" / "prepare" / "00000.parquet"
    out_keys = (pq.read_table(out_file, columns=["image_key"]).column("image_key").to_pylist()
                if out_file.exists() else [])
    counts = Counter(out_keys)
    res.update(why=_why(res), cls=cls, size=size, unit=CLASSES[cls][0], shard_mb=shard_bytes / 2**20, build_s=built_s,
               samples_in=len(keys), samples_out=len(out_keys), each_once=all(c == 1 for c in counts.values()),
               unknown_keys=sorted(set(counts) - set(keys)), lost=[k for k in keys if k not in counts])
    # the promise: every sample out once, or the shard named damaged
    res["ok"] = res["each_once"] and not res["unknown_keys"] and (
        (not res["lost"] and res["state"] == "finished") or res["state"] == "damaged")
    shutil.rmtree(case)
    return res


# ------------------------------------------------------------------------------ table
def _size_text(unit: str, size: int) -> str:
    return f"10^{len(str(size)) - 1} {unit}" if unit == "declared B" else f"{size:,} {unit}"


def table(rows: list[dict]) -> str:
    head = ("| class | size | shard MB | wall s | CPU s | process peak MB | shard's peak MB | over baseline MB "
            "| status | samples out / in | each once, damage named |")
    lines = [head, "| --- " * 11 + "|"]
    for r in rows:
        lines.append(f"| {r['cls']} | {_size_text(r['unit'], r['size'])} | {r['shard_mb']:.1f} | {r['wall_s']:.2f} "
                     f"| {r.get('cpu_s', float('nan')):.2f} | {r['peak_rss_mb']:.0f} | {r['cost_mb']:.1f} "
                     f"| {r['over_baseline_mb']:+.1f} | {r['state']} "
                     f"| {r['samples_out']} / {r['samples_in']} | {'yes' if r['ok'] else 'NO'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="one small size per class (CI: seconds)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--only", nargs="*", help="these classes only (baseline is always run)")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="hostile-bench-") as tmp:
        for cls, (_unit, sizes, small_sizes) in CLASSES.items():
            if args.only and cls != "baseline" and cls not in args.only:
                continue
            for size in small_sizes if args.small else sizes:
                r = run_one(cls, size, Path(tmp))
                print(f"  {cls} {size}: {r['wall_s']:.2f} s, {r['cost_mb']:.1f} MB, {r['state']}", file=sys.stderr)
                rows.append(r)
    base = rows[0]["cost_mb"]
    for r in rows:
        r["over_baseline_mb"] = r["cost_mb"] - base
    result = {"small": args.small, "baseline_mb": base,
              "max_over_baseline_mb": max(r["over_baseline_mb"] for r in rows),
              "rows": rows}
    print("hostile shards: one shard's prepare_output per fresh process (default settings)")
    print(table(rows))
    print(f"largest peak over the baseline shard: {result['max_over_baseline_mb']:.1f} MB")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        print(json.dumps(child(Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))))
    else:
        main()
