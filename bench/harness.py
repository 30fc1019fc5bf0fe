"""What the benchmarks and the tests share to drive real runs of the tiny pipeline: the bundled
sample shards copied under new numbers, pipeline-file variants, the region ids an input holds and an
output has (read straight from the files, not through the data plane, so a check never shares the
code it checks), and watching and killing a run's whole process session.

It lives in bench/ because the benchmarks are programs; the tests import it from here (a benchmark
never imports a test module).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import tarfile
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import yaml

from annotate.config import load_config
from annotate.data.store import OutputStore
from annotate.stages.negatives import NegativesStage, NegativesTextStage
from annotate.stages.part_describe import PartDescribeStage, undescribed
from annotate.stages.parts import PartsStage

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "pipelines" / "tiny.yaml"
PAPER_TINY = REPO / "pipelines" / "paper-tiny.yaml"
SAMPLE_SHARDS = REPO / "sample_data" / "grit"


# ------------------------------------------------------------------------------ inputs
def copy_sample_shards(dest: Path, count: int) -> Path:
    """`count` shards made by copying the two sample shards under new shard numbers."""
    dest.mkdir(parents=True, exist_ok=True)
    sources = sorted(SAMPLE_SHARDS.glob("*.tar"))
    for i in range(count):
        shutil.copy(sources[i % len(sources)], dest / f"{i:05d}.tar")
    return dest


def tiny_variant(dest: Path, overrides: dict, base: Path = TINY) -> Path:
    """pipelines/tiny.yaml (or `base`) with `overrides` merged in, written to `dest` for a subprocess
    to load.

    `load_config` merges, validates and makes the prompt paths absolute, so an invalid variant
    fails here, not in the subprocess."""
    dest.write_text(yaml.safe_dump(load_config(base, overrides).model_dump(mode="json"), sort_keys=False))
    return dest


# ------------------------------------------------------------------------------ regions
def input_region_ids(shard_dir: Path, shards: list[int]) -> Counter:
    """Region ids the output must hold, read straight from the tar files (not through the data plane)."""
    ids: Counter = Counter()
    for shard in shards:
        name = f"{shard:05d}"
        with tarfile.open(shard_dir / f"{name}.tar") as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(member).read())
                    key = member.name.rsplit("/", 1)[-1][: -len(".json")]
                    for index, _ in enumerate(meta.get("ref_exps") or []):
                        ids[f"{name}:{key}:{index}"] += 1
    return ids


def output_regions(out: Path) -> list[dict]:
    table = pq.read_table(OutputStore(out).dataset_files())
    return [region for regions in table.column("regions").to_pylist() for region in regions]


# ------------------------------------------------------------------------------ processes
def wait_for(predicate, timeout: float, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def session_pids(title: str, session: int) -> list[int]:
    """Processes of process session `session` (one Ray cluster, not another session's on the same
    machine) whose command line (a Ray worker's is its title) contains `title`, as plain text."""
    return [pid for pid, cmdline in session_processes(session).items() if title in cmdline]


def session_processes(session: int) -> dict[int, str]:
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == session:
                    found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except (ProcessLookupError, PermissionError, FileNotFoundError):
                pass
    return found


def kill_session(session: int) -> None:
    """SIGKILL every process of a session (a Ray cluster with its workers and vLLM engines)."""
    for pid in session_processes(session):
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


TINY_FIELDS = REPO / "pipelines" / "tiny-fields.yaml"
TINY_PARTS = REPO / "pipelines" / "tiny-parts.yaml"


def _cheap(request):
    """A scripted stage's real model call, kept short: plain text, a few tokens."""
    return dataclasses.replace(request, json_schema=None,
                               sampling=request.sampling.model_copy(update={"max_tokens": 24, "min_tokens": 8}))


class ScriptedNegatives(NegativesStage):
    """`negatives` for runs with random-weight models, whose proposals are noise that the one-span
    check rightly drops (so the two checks after it would never get a candidate). It still calls its
    model (plain text, like the object stage), then reads a scripted answer instead: edits of the
    description's first long words, through the stage's own checks. Used with `stage_class`
    ("bench.harness:ScriptedNegatives") by the end-to-end test of the optional stages. A fake answer
    is used only because no model that runs here can write a real one."""

    def build_request(self, ctx):
        return _cheap(super().build_request(ctx))

    def apply(self, region, result):
        words = [w for w in (region.fine_caption or "").split() if len(w) > 3][: self.params.k]
        edits = [{"type": "colour", "text": (region.fine_caption or "").replace(w, "zzz", 1)} for w in words]
        return super().apply(region, dataclasses.replace(result, parsed={"edits": edits}))


def inner_boxes(mask) -> list[list[float]]:
    """Two boxes ([x, y, w, h], pixels) side by side inside `mask`: the two halves of the square around
    its deepest point (distance transform), each wholly inside the object. Empty when it is too thin."""
    import cv2
    import numpy as np

    inside = np.pad(np.asarray(mask, np.uint8), 1)
    depth = cv2.distanceTransform(inside, cv2.DIST_L2, 3)[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(depth)), depth.shape)
    half = int(depth[y, x] * 0.7) - 1  # the square's corners stay inside the inscribed circle
    if half < 4:
        return []
    return [[float(x - half), float(y - half), float(half), float(2 * half)],
            [float(x), float(y - half), float(half), float(2 * half)]]


class ScriptedParts(PartsStage):
    """`parts` for random-weight runs, whose boxes are noise that the containment check rightly rejects
    (so the two part stages after it would get nothing). It still calls its model, then reads a scripted
    answer: two boxes inside the object (`inner_boxes`), written on the image the model saw in the
    model's own box format, named after the description's first word and "side", through the stage's
    own mapping, mask making and checks ("bench.harness:ScriptedParts")."""

    def build_request(self, ctx):
        return _cheap(super().build_request(ctx))

    def apply(self, region, result):
        from annotate.data.masks import decode_rle
        from annotate.engines.conventions import box_format

        seen = self._seen.get(region.region_id)
        answer = {"parts": []}
        if seen is not None and region.mask is not None:
            (x0, y0, x1, y1), (width, height) = seen.crop_box, seen.shown_size
            sx, sy = width / (x1 - x0), height / (y1 - y0)
            words = [w.strip(".,;:!?\"'") for w in (region.fine_caption or "").split()]
            names = [next((w for w in words if len(w) > 3), "part"), "side"]  # the first a parent span
            for name, (x, y, w, h) in zip(names, inner_boxes(decode_rle(region.mask).astype(bool))):
                shown = [(x - x0) * sx, (y - y0) * sy, w * sx, h * sy]
                answer["parts"].append({"name": name, "visibility": "full", "reason": "scripted",
                                        "box": box_format(self.conventions).format(shown, width, height)})
        return super().apply(region, dataclasses.replace(result, parsed=answer))


class ScriptedPartDescriptions(PartDescribeStage):
    """`part_describe` for random-weight runs: the real request (the object crop and one focal crop per
    part go to the VLM), then scripted texts, since random weights write no usable description
    ("bench.harness:ScriptedPartDescriptions")."""

    def build_request(self, ctx):
        return _cheap(super().build_request(ctx))

    def apply(self, region, result):
        parts = [{"short": f"the {p.name} of the object", "long": f"The {p.name} of the object, as the crop shows it."}
                 for p in undescribed(region)]
        return super().apply(region, dataclasses.replace(result, parsed={"parts": parts}))


class ScriptedContradiction(NegativesTextStage):
    """`negatives_text` for random-weight runs: asks its model as usual, then passes every candidate
    (a random model's verdicts are all one way, and all-false would leave the VLM check unexercised)."""

    def apply(self, region, result):
        verdicts = [{"holds": True, "reason": "scripted"}] * len(region.negative_candidates)
        return super().apply(region, dataclasses.replace(result, parsed={"verdicts": verdicts}))
