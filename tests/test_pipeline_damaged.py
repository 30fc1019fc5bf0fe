"""Damaged input shards through a real run: a tar cut off mid-file and a parquet file that cannot be
read. The other shard finishes; the damaged ones go through the chain with what could be read, are
recorded `damaged` (never finished) in the manifest, the run summary and `annotate status`, and the
command exits non-zero naming them. Once the files are replaced, a rerun processes them whole, with
every region exactly once."""

from __future__ import annotations

import json
import shutil
import tarfile
from collections import Counter

import datasets
import pytest
from rich.console import Console
from typer.testing import CliRunner

from annotate.cli import DAMAGED_EXIT_CODE, app
from annotate.data.store import DAMAGED, FINAL, OutputStore
from annotate.executor.report import print_status, status_report
from bench.harness import SAMPLE_SHARDS, TINY
from bench.harness import input_region_ids

pytestmark = pytest.mark.slow


def test_damaged_shards_are_named_redone_and_never_finished(ray_session, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(SAMPLE_SHARDS / "00000.tar", src / "00000.tar")
    whole = (SAMPLE_SHARDS / "00001.tar").read_bytes()
    (src / "00001.tar").write_bytes(whole[: int(len(whole) * 0.6)])  # a download that died
    (src / "00002.parquet").write_bytes(b"PAR1 this is not a parquet file")
    out = tmp_path / "out"
    args = ["run", "--stage", "all", "--shards", "0-2", "--input", str(src), "--output", str(out), "--config", str(TINY)]

    result = CliRunner().invoke(app, args)
    assert result.exit_code == DAMAGED_EXIT_CODE, result.output
    assert "00001" in result.output and "00002" in result.output and "damaged" in result.output.lower()

    layout = OutputStore(out)
    finals = layout.latest(FINAL)
    assert finals["00000"]["state"] == "finished"
    for shard in ("00001", "00002"):
        assert finals[shard]["state"] == DAMAGED and finals[shard]["damage"], finals[shard]
        assert layout.latest("prepare")[shard]["state"] == DAMAGED
    with tarfile.open(SAMPLE_SHARDS / "00001.tar") as tar:
        samples_in_whole_file = len({name.split(".")[0] for name in tar.getnames()})
    assert 0 < finals["00001"]["samples_read"] < samples_in_whole_file
    assert finals["00002"]["samples_read"] == 0
    assert set(layout.finished(FINAL, finals["00000"]["config"])) == {"00000"}
    record = json.loads(sorted((out / "runs").glob("*.json"))[-1].read_text())
    assert set(record["shards_damaged"]) == {"00001", "00002"} and set(record["shards_written"]) == {"00000"}

    # `annotate status` shows them in their own section
    report = status_report(out)
    assert {(d["output"], d["shard"]) for d in report["damaged"]} >= {(FINAL, "00001"), (FINAL, "00002")}
    console = Console(record=True, width=200)
    print_status(report, console)
    assert "DAMAGED shards" in console.export_text()

    # The files are downloaded again: the rerun redoes just those two, whole, and duplicates nothing.
    shutil.copy(SAMPLE_SHARDS / "00001.tar", src / "00001.tar")
    (src / "00002.parquet").unlink()
    shutil.copy(SAMPLE_SHARDS / "00000.tar", src / "00002.tar")
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    record = json.loads(sorted((out / "runs").glob("*.json"))[-1].read_text())
    assert set(record["shards_written"]) == {"00001", "00002"} and record["shards_skipped"] == ["00000"]
    assert not record["shards_damaged"]
    ds = datasets.load_dataset("parquet", data_files=str(out / "data" / "*.parquet"), split="train")
    seen = Counter(r["region_id"] for row in ds for r in row["regions"])
    assert seen == input_region_ids(src, [0, 1, 2])
    assert not status_report(out)["damaged"]
