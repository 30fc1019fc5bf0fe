"""`annotate export --format coco` without Ray: a small output committed through the store (regions with
masks, parts made by data/parts.py), exported, and read back with pycocotools: parts link to their
object and lie inside it, counts, statuses, unfinished shards left out, file names safe."""

from __future__ import annotations

import io
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO
from typer.testing import CliRunner

from annotate.cli import app
from annotate.data.masks import encode_rle
from annotate.data.parts import PartCandidate, check_parts, part_mask
from annotate.data.records import ImageRecord, RegionRecord, Validation, Verdict
from annotate.data.store import FINAL, OutputStore
from annotate.export import (ANNOTATIONS_FILE, IMAGES_DIR, PART_CATEGORY, NoDataset, export_coco, image_file,
                             safe_file_name, safe_name)

# pycocotools' decode trips numpy 2's `copy=` DeprecationWarning internally (see data/masks.decode_rle)
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
H, W = 60, 80
HOSTILE_KEY = "../../etc/pass wd"


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _image(shard: str, key: str, index_base: int = 0, status: str = "ok") -> ImageRecord:
    """A red disc holding a blue square (region 0, with two kept parts and one rejected), and a grey box
    (region 1, no mask, no parts) of status `status`."""
    image = np.full((H, W, 3), 200, np.uint8)
    cv2.circle(image, (30, 30), 22, (220, 30, 30), -1)
    cv2.rectangle(image, (25, 25), (34, 34), (30, 30, 220), -1)
    disc = np.zeros((H, W), np.uint8)
    cv2.circle(disc, (30, 30), 22, 1, -1)
    disc = disc.astype(bool)
    caption = "A red disc with a blue square in its middle and a left edge."
    candidates = [PartCandidate(name, box, *part_mask(disc, box, image if name == "blue square" else None))
                  for name, box in [("blue square", [22.0, 22.0, 16.0, 16.0]), ("left edge", [9.0, 20.0, 10.0, 20.0]),
                                    ("sky", [60.0, 0.0, 20.0, 20.0])]]
    rid = f"{shard}:{key}:{index_base}"
    parts = check_parts(rid, candidates, disc, fine_caption=caption)
    for part in parts:
        part.short_caption, part.long_caption = f"the {part.name}", f"the {part.name} of a red disc"
        part.verdict = Verdict(holds=True, reason="seen")
    disc_region = RegionRecord(region_id=rid, region_index=index_base, phrase="a red disc", bbox=[8, 8, 45, 45],
                               mask=encode_rle(disc), mask_source="grabcut", object_caption="a disc",
                               validation=Validation(consistent=True, reason="ok"), context_caption="c",
                               fine_caption=caption, parts=parts, status="ok")
    box_region = RegionRecord(region_id=f"{shard}:{key}:{index_base + 1}", region_index=index_base + 1,
                              phrase="a grey corner", bbox=[60, 40, 20, 20], fine_caption="grey" if status == "ok" else None,
                              status=status, error=None if status == "ok" else "validate: inconsistent")
    return ImageRecord(image_key=key, shard=shard, width=W, height=H, caption="a disc", image_bytes=_png(image),
                       regions=[disc_region, box_region])


def _commit(out: Path, shard: str, records: list[ImageRecord], damaged: bool = False) -> None:
    store = OutputStore(out)
    writer = store.writer(FINAL, shard)
    for record in records:
        writer.add(record)
    store.commit(writer, FINAL, shard, "config-x", damage={"damage": "truncated", "samples_read": 1} if damaged else None)


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    """Shard 00000: two images (the second's grey region rejected); 00001: one image with a hostile key;
    00002: damaged, never exported."""
    out = tmp_path_factory.mktemp("export") / "out"
    _commit(out, "00000", [_image("00000", "k0"), _image("00000", "k1", status="rejected")])
    _commit(out, "00001", [_image("00001", HOSTILE_KEY)])
    _commit(out, "00002", [_image("00002", "k9")], damaged=True)
    return out


def _check_coco(path: Path, objects: int, parts: int) -> COCO:
    coco = COCO(str(path))
    anns = coco.loadAnns(coco.getAnnIds())
    assert len(anns) == objects + parts
    assert len(coco.getAnnIds(catIds=[PART_CATEGORY])) == parts
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["object", "part"]
    assert len({a["id"] for a in anns}) == len(anns)
    for ann in coco.loadAnns(coco.getAnnIds(catIds=[PART_CATEGORY])):
        obj = coco.anns[ann["obj_ann_id"]]
        assert obj["category_id"] == 1 and obj["image_id"] == ann["image_id"]
        assert ann["part_id"].startswith(obj["region_id"] + ":p")
        part_mask, obj_mask = coco.annToMask(ann).astype(bool), coco.annToMask(obj).astype(bool)
        assert part_mask.any() and not (part_mask & ~obj_mask).any()
        assert ann["area"] == int(part_mask.sum())
        assert ann["short_caption"] == f"the {ann['name']}" and ann["verdict"] == {"holds": True, "reason": "seen"}
        caption = obj["fine_caption"]
        assert all(caption[s["start"]:s["end"]] == s["text"] for s in ann["parent_spans"])
    return coco


def test_export_reads_back_with_pycocotools(out, tmp_path):
    summary = export_coco(out, tmp_path / "coco", images=True)
    assert (summary.images, summary.objects, summary.parts) == (3, 5, 6)  # 3 disc regions with 2 kept parts each
    assert summary.shards == ["00000", "00001"] and summary.skipped_shards == ["00002"]
    coco = _check_coco(summary.annotations, objects=5, parts=6)
    names = {a["name"] for a in coco.loadAnns(coco.getAnnIds(catIds=[PART_CATEGORY]))}
    assert names == {"blue square", "left edge"}  # "sky" lies outside the disc: rejected, not exported
    assert {a["status"] for a in coco.dataset["annotations"] if a["category_id"] == 1} == {"ok"}
    grey = next(a for a in coco.dataset["annotations"] if a.get("phrase") == "a grey corner")
    assert coco.annToMask(grey).sum() == 20 * 20  # no mask: the box as a polygon
    files = sorted(p.name for p in (tmp_path / "coco" / IMAGES_DIR).iterdir())
    assert files == sorted(img["file_name"] for img in coco.dataset["images"]) and len(files) == 3
    for img in coco.dataset["images"]:
        assert "/" not in img["file_name"] and not img["file_name"].startswith(".") and img["file_name"].endswith(".png")
        assert (img["width"], img["height"]) == (W, H)
        assert Image.open(tmp_path / "coco" / IMAGES_DIR / img["file_name"]).size == (W, H)
    hostile = next(img for img in coco.dataset["images"] if img["image_key"] == HOSTILE_KEY)
    assert hostile["file_name"] == "00000003__.._etc_pass_wd.png" and hostile["shard"] == "00001"
    assert not any(p.name != "coco" for p in tmp_path.iterdir())  # nothing written outside DEST


def test_all_statuses_and_the_cli(out, tmp_path):
    result = CliRunner().invoke(app, ["export", "--format", "coco", str(out), str(tmp_path / "all"), "--all-statuses"])
    assert result.exit_code == 0, result.output
    assert "3 image(s), 6 object(s), 6 part(s)" in result.output and "left out: 00002" in result.output
    coco = _check_coco(tmp_path / "all" / ANNOTATIONS_FILE, objects=6, parts=6)
    assert sorted(a["status"] for a in coco.dataset["annotations"] if a["category_id"] == 1).count("rejected") == 1
    assert not (tmp_path / "all" / IMAGES_DIR).exists()  # no --images: the JSON alone
    assert json.loads((tmp_path / "all" / ANNOTATIONS_FILE).read_text())["info"]["statuses"] == "all"


def test_cli_refuses_a_bad_format_and_an_output_without_a_dataset(out, tmp_path):
    bad = CliRunner().invoke(app, ["export", "--format", "yolo", str(out), str(tmp_path / "x")])
    assert bad.exit_code == 2 and "unknown format" in bad.output
    empty = tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(app, ["export", "--format", "coco", str(empty), str(tmp_path / "y")],
                                env={"COLUMNS": "300"})
    assert result.exit_code == 2 and "annotate run" in result.output
    with pytest.raises(NoDataset):
        export_coco(empty, tmp_path / "z")


def test_safe_file_names():
    assert safe_file_name(7, "a/b\\c:d e", "jpg") == "00000007_a_b_c_d_e.jpg"
    assert safe_file_name(1, "..", "png") == "00000001_image.png"
    assert safe_file_name(2, "x" * 500, "png") == "00000002_" + "x" * 80 + ".png"
    assert safe_name("../.hidden/a.b c", limit=12) == "_.hidden_a"  # cut to 12, then its leading dots
    assert safe_name("...") == ""


def test_an_image_turned_by_exif_is_written_as_displayed():
    raw = Image.new("RGB", (H, W), (10, 200, 10))  # stored 60 wide, 80 tall; EXIF 6 shows it 80 x 60
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    raw.save(buf, format="JPEG", exif=exif)
    data, extension = image_file(buf.getvalue())
    assert extension == "png" and Image.open(io.BytesIO(data)).size == (W, H)
    assert image_file(buf.getvalue(), write=False) == (None, "png")
    plain = _png(np.zeros((4, 4, 3), np.uint8))
    assert image_file(plain) == (plain, "png") and image_file(b"not an image") == (b"not an image", "bin")
