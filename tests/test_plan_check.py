"""`annotate plan --from-run`: the processor-and-table prediction against a run's provenance.

A real paper-tiny run needs Ray and vLLM engines, so the check (annotate/plan/check.py) is tested
here on a synthetic run whose recorded tokens are worked out by hand from what the prompts send."""

from __future__ import annotations

from pathlib import Path

import pytest

from annotate.config import load_config
from annotate.data.records import ImageRecord, Provenance, RegionRecord, StageProvenance
from annotate.data.writer import write_parquet_atomic
from annotate.plan.check import compare_with_run, within

REPO = Path(__file__).resolve().parents[1]
LONGGRIT = REPO / "pipelines" / "longgrit.yaml"

# Regions of a 1000 x 1000 image: a 400 x 300 box (crop 480 x 360, 4:3: 3 x 2 + 1 tiles under object-v2's
# cap of 6) and a 100 x 100 one (crop 120 x 120: 1 tile). Object prompt (object-v2) = 150 text + the crop
# (tiles x 256 + 2) + the mask on a square of at most 448 px (one tile: 258).
BOXES = ([100, 100, 400, 300], [500, 500, 100, 100])
OBJECT = (150 + (7 * 256 + 2) + 258, 150 + (1 * 256 + 2) + 258)  # 2,202 and 666
RECORDED = {"object": OBJECT, "validate": (400, 400), "context": (150 + 1369,) * 2, "merge": (350, 350)}
COMPLETIONS = {"object": (63, 60), "validate": (48, 50), "context": (57, 60), "merge": (720, 700)}  # within 10%


def _run(tmp_path: Path, recorded: dict, attempts: int = 0) -> Path:
    """A run whose provenance recorded `recorded` tokens per request; `attempts` requests per region (0: a
    run before schema 1.3, which summed its attempts without counting them)."""
    regions = []
    for i, box in enumerate(BOXES):
        sent = max(1, attempts)
        prov = Provenance(**{("validate_" if s == "validate" else s): StageProvenance(
            model="x", prompt_tokens=sent * recorded[s][i], completion_tokens=sent * COMPLETIONS[s][i],
            attempts=attempts) for s in recorded})
        regions.append(RegionRecord(region_id=f"00000:k:{i}", region_index=i, phrase="a mug", bbox=box, status="ok",
                                    provenance=prov))
    record = ImageRecord(image_key="k", shard="00000", width=1000, height=1000, caption="a mug", regions=regions)
    write_parquet_atomic([record], tmp_path / "data" / "00000.parquet")
    return tmp_path


@pytest.fixture(scope="module")
def cfg():
    return load_config(LONGGRIT)


def test_prediction_matches_a_run_within_10_percent(cfg, tmp_path):
    rows = compare_with_run(cfg, _run(tmp_path, RECORDED))
    assert [r["stage"] for r in rows] == ["object", "validate", "context", "merge"]
    by = {r["stage"]: r for r in rows}
    assert by["object"]["predicted_prompt"] == pytest.approx(sum(OBJECT) / 2)  # 1,434
    assert within(rows) == []


def test_retries_recorded_as_attempts_do_not_blur_the_check(cfg, tmp_path):
    """Every region asked twice: per request the run still matches the plan; without the attempt count
    (older runs) the summed tokens are twice the prediction, and the check says so."""
    rows = compare_with_run(cfg, _run(tmp_path / "a", RECORDED, attempts=2))
    assert within(rows) == [] and {r["per"] for r in rows} == {"request"}
    assert {r["attempts_per_region"] for r in rows} == {2.0}
    old = compare_with_run(cfg, _run(tmp_path / "b", {s: tuple(2 * v for v in t) for s, t in RECORDED.items()}))
    assert {r["per"] for r in old} == {"region"} and len(within(old)) == 4


def test_a_run_that_sent_one_image_is_caught(cfg, tmp_path):
    """Had the run sent the crop alone, the two-image prediction is 22% high: the check says so."""
    one_image = {**RECORDED, "object": (150 + 7 * 256 + 2, 150 + 256 + 2)}
    misses = within(compare_with_run(cfg, _run(tmp_path, one_image)))
    assert len(misses) == 1 and misses[0].startswith("object prompt")


def test_cli_from_run_prints_the_comparison(tmp_path):
    from typer.testing import CliRunner

    from annotate.cli import app

    out = _run(tmp_path, RECORDED)
    result = CliRunner().invoke(app, ["plan", "--regions", "1000", "--config", str(LONGGRIT), "--from-run", str(out)])
    assert result.exit_code == 0, result.output
    assert "every stage within 10%" in result.output and "predicted" in result.output
