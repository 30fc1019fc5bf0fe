"""Parts as a user meets them (issue 29, item 5): drawn inside their region by `annotate show --png`,
named field by field in the dataset card, and loaded back whole by `datasets`."""

from __future__ import annotations

import io
import re

import cv2
import datasets
import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata
from skimage.draw import disk, ellipse
from typer.testing import CliRunner

import shardkit as sk
from annotate.cli import app
from annotate.data.masks import decode_rle, encode_rle
from annotate.data.records import ImageRecord, PartRecord, RegionRecord, TextSpan, Verdict, features
from annotate.data.writer import part_field_descriptions, write_dataset_card, write_parquet_atomic
from annotate.gallery import write_gallery
from annotate.show import part_color, render_region

REGION_ID = "00000:000000000:0"
CAPTION = "a white space suit with a flag badge on the left sleeve and a round collar"


def _span(word: str) -> TextSpan:
    start = CAPTION.index(word)
    return TextSpan(start=start, end=start + len(word), text=word)


def _box_of(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


def _part(index: int, name: str, mask: np.ndarray, kept: bool, **kw) -> PartRecord:
    return PartRecord(part_id=f"{REGION_ID}:p{index}", name=name, visibility=kw.pop("visibility", "full"),
                      bbox=_box_of(mask), mask=encode_rle(mask), area=int(mask.sum()), kept=kept, **kw)


def astronaut_scene():
    """A real photo (512 x 512), a region over the suit (an ellipse) and three part masks: sleeve, badge
    and collar (the collar clipped to the region)."""
    photo = skdata.astronaut()
    h, w = photo.shape[:2]
    region_mask = np.zeros((h, w), bool)
    region_mask[ellipse(300, 256, 180, 200, shape=(h, w))] = True
    sleeve = np.zeros_like(region_mask)
    sleeve[ellipse(340, 140, 50, 40, shape=(h, w))] = True
    badge = np.zeros_like(region_mask)
    badge[disk((330, 330), 35, shape=(h, w))] = True
    collar = np.zeros_like(region_mask)
    collar[150:190, 200:320] = True
    return photo, region_mask, sleeve, badge, collar & region_mask


def build_output(out) -> dict:
    """One real photo, one region (an ellipse) with three parts inside its mask: two kept (one verified,
    one not) and one the mask checks rejected; stored by the writer with the dataset card."""
    photo, region_mask, sleeve, badge, collar = astronaut_scene()
    h, w = photo.shape[:2]
    parts = [
        _part(0, "left sleeve", sleeve & region_mask, True, reason="it carries the badge", mask_source="grabcut",
              containment=1.0, short_caption="the left sleeve of a white suit", long_caption="a puffy white sleeve",
              parent_spans=[_span("left sleeve")], verdict=Verdict(holds=True, reason="a sleeve of this suit")),
        _part(1, "badge", badge & region_mask, True, visibility="partial", mask_source="sam", containment=0.97,
              short_caption="a flag badge", parent_spans=[_span("badge")]),
        _part(2, "collar", collar, False, mask_source="box", containment=0.61,
              reject_reason="containment 0.61 below 0.80", parent_spans=[_span("collar")]),
    ]
    region = RegionRecord(region_id=REGION_ID, region_index=0, phrase="a white space suit", bbox=_box_of(region_mask),
                          mask=encode_rle(region_mask), mask_source="given", fine_caption=CAPTION, status="ok",
                          parts=parts)
    plain = RegionRecord(region_id="00000:000000000:1", region_index=1, phrase="a flag", bbox=[10, 10, 40, 30],
                         status="ok")
    record = ImageRecord(image_key="000000000", shard="00000", width=w, height=h, caption="an astronaut and a flag",
                         image_bytes=sk.encode(photo, "PNG"), regions=[region, plain])
    write_parquet_atomic([record], out / "data" / "00000.parquet")
    write_dataset_card(out, "data/*.parquet")
    return {"out": out, "record": record, "region": region,
            "masks": {"left sleeve": sleeve & region_mask, "badge": badge & region_mask, "collar": collar}}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    return build_output(tmp_path_factory.mktemp("parts") / "out")


# ------------------------------------------------------------------------------ the dataset card
def test_the_card_names_every_part_field(built):
    described = part_field_descriptions()
    assert list(described) == list(PartRecord.model_fields)
    assert all(text.strip() for text in described.values()), [k for k, v in described.items() if not v.strip()]
    card = (built["out"] / "README.md").read_text()
    assert "## Part fields" in card
    for name, text in described.items():
        assert f"| `{name}` | {text} |" in card, name


# ------------------------------------------------------------------------------ datasets loading
def _rounded(x):
    """bbox and containment are float32 in the file: compare at that precision."""
    if isinstance(x, float):
        return round(x, 4)
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_rounded(v) for v in x]
    return x


def test_parts_load_back_whole_with_datasets(built, tmp_path):
    out, region = built["out"], built["region"]
    cache = str(tmp_path / "hf")
    by_files = datasets.load_dataset("parquet", data_files=str(out / "data" / "*.parquet"), split="train", cache_dir=cache)
    by_card = datasets.load_dataset(str(out), split="train", cache_dir=cache)
    part_feature = features()["regions"].feature["parts"]
    assert isinstance(part_feature, datasets.List) and set(part_feature.feature) == set(PartRecord.model_fields)
    for ds in (by_files, by_card):
        assert ds.features == features()
        assert ds.features["regions"].feature["parts"] == part_feature
        (row,) = ds
        with_parts, plain = row["regions"]
        assert plain["parts"] is None, "a region the part stages never saw stays None, not []"
        assert _rounded(with_parts["parts"]) == _rounded([p.model_dump(by_alias=True) for p in region.parts])
        for part in with_parts["parts"]:
            assert np.array_equal(decode_rle(part["mask"]), built["masks"][part["name"]])
            for span in part["parent_spans"]:
                assert row["regions"][0]["fine_caption"][span["start"]:span["end"]] == span["text"]
        assert [None if p["verdict"] is None else p["verdict"]["holds"] for p in with_parts["parts"]] == [True, None, None]


# ------------------------------------------------------------------------------ annotate show
def _near(img: np.ndarray, color, tol: int = 60) -> np.ndarray:
    return np.abs(img.astype(int) - np.asarray(color)).sum(-1) < tol


def _grow(mask: np.ndarray, n: int) -> np.ndarray:
    return cv2.dilate(mask.astype(np.uint8), np.ones((2 * n + 1, 2 * n + 1), np.uint8)).astype(bool)


def _outline(mask: np.ndarray) -> np.ndarray:
    return mask & ~cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)


def _render(built, tmp_path, *flags) -> np.ndarray:
    png = tmp_path / "region.png"
    result = CliRunner().invoke(app, ["show", str(built["out"]), "--region", REGION_ID, "--png", str(png), *flags])
    assert result.exit_code == 0, result.output
    return np.asarray(Image.open(png).convert("RGB"))


def test_show_draws_each_part_outline_inside_its_region(built, tmp_path):
    drawn = _render(built, tmp_path)
    record, region = built["record"], built["region"]
    h, w = record.height, record.width
    assert drawn.shape[1] == w and drawn.shape[0] > h, "the image at its size, a legend band under it"
    on_image = drawn[:h]
    # What the region's own drawing (fill, contour, box, id) already put in the parts' colours does not count.
    without_parts = np.asarray(render_region(record, region.model_copy(update={"parts": None})).convert("RGB"))
    assert without_parts.shape == (h, w, 3)
    coverage = {}
    for index, part in enumerate(region.parts):
        mask = built["masks"][part.name]
        painted = _near(on_image, part_color(index)) & ~_near(without_parts, part_color(index))
        outline = _outline(mask)
        assert painted.sum() > 50, f"{part.name}: its outline is drawn"
        stray = painted & ~_grow(outline, 2)
        assert stray.sum() == 0, f"{part.name}: {stray.sum()} pixels of its colour off its mask's outline"
        coverage[part.name] = (painted & outline).sum() / outline.sum()
    # Kept parts solid all the way round (a label box may hide a little), the rejected one dashed.
    assert coverage["left sleeve"] > 0.85 and coverage["badge"] > 0.85, coverage
    assert 0.3 < coverage["collar"] < 0.8, coverage
    legend = drawn[h:]
    assert (legend.min(-1) < 100).sum() > 200, "legend text under the image"
    for index in range(len(region.parts)):
        assert _near(legend, part_color(index)).sum() > 10, "a swatch per part in the legend"
    # The image outside the region's box and the part labels is left as it was.
    original = np.asarray(Image.open(io.BytesIO(record.image_bytes)).convert("RGB")).astype(int)
    x, y, bw, bh = (int(v) for v in region.bbox)
    far = np.ones((h, w), bool)
    far[max(0, y - 40):y + bh + 5, max(0, x - 5):x + bw + 5] = False
    assert np.abs(on_image[far].astype(int) - original[far]).mean() < 1


def test_show_can_leave_rejected_parts_out(built, tmp_path):
    drawn = _render(built, tmp_path, "--kept-parts-only")
    h = built["record"].height
    rejected = [i for i, p in enumerate(built["region"].parts) if not p.kept]
    assert rejected == [2]
    full = _render(built, tmp_path)
    assert drawn.shape[0] < full.shape[0], "one legend line fewer"
    # The rejected part's colour (the third) is neither outlined nor in the legend.
    assert _near(drawn[h:], part_color(2)).sum() == 0
    assert _near(drawn[:h], part_color(2)).sum() < _near(full[:h], part_color(2)).sum() - 50


def test_show_survives_parts_with_broken_geometry():
    """A part with a corrupt mask falls back to its box; one with neither is in the legend only."""
    from annotate.data.records import RleMask

    broken = [PartRecord(part_id="0:k:0:p0", name="nowhere", visibility="full", bbox=[float("nan"), 0, 1, 1], kept=True),
              PartRecord(part_id="0:k:0:p1", name="boxed", visibility="partial", bbox=[20, 20, 50, 30], kept=True,
                         mask=RleMask(size=[90, 120], counts="not an rle"))]
    region = RegionRecord(region_id="0:k:0", region_index=0, phrase="a thing", bbox=[10, 10, 80, 60], parts=broken)
    record = ImageRecord(image_key="k", shard="0", width=120, height=90, caption="a thing", regions=[region])
    drawn = np.asarray(render_region(record, region).convert("RGB"))
    assert drawn.shape[1] == 120 and drawn.shape[0] > 90
    boxed = _near(drawn[:90], part_color(1))
    ys, xs = np.nonzero(boxed)
    assert boxed.sum() > 40 and xs.min() >= 18 and xs.max() <= 72 and ys.min() >= 18 and ys.max() <= 52


# ------------------------------------------------------------------------------ the HTML gallery
EVIL_PART = "<script>document.title='pwned'</script> collar"


def test_gallery_lists_and_draws_a_regions_parts(tmp_path):
    """A region with one kept and one rejected part: both named in its card (escaped), the rejection's
    reason given, and their outlines drawn on its thumbnail; the same region without parts has neither."""
    photo, region_mask, sleeve, _, collar = astronaut_scene()  # 512 x 512: the thumbnail is drawn smaller
    h, w = photo.shape[:2]
    parts = [_part(0, "left sleeve", sleeve & region_mask, True, short_caption="a puffy white sleeve",
                   long_caption="a long <b>puffy</b> sleeve", verdict=Verdict(holds=True, reason="a sleeve of this suit")),
             _part(1, EVIL_PART, collar & region_mask, False, reject_reason="containment 0.61 below 0.80")]
    geometry = dict(phrase="a white space suit", bbox=_box_of(region_mask), mask=encode_rle(region_mask),
                    mask_source="given", fine_caption=CAPTION, status="ok")
    with_parts = RegionRecord(region_id=REGION_ID, region_index=0, parts=parts, **geometry)
    plain = RegionRecord(region_id="00000:000000000:1", region_index=1, **geometry)
    record = ImageRecord(image_key="000000000", shard="00000", width=w, height=h, caption="an astronaut",
                         image_bytes=sk.encode(photo, "PNG"), regions=[with_parts, plain])
    out = tmp_path / "out"
    write_parquet_atomic([record], out / "data" / "00000.parquet")

    (page,) = write_gallery(out).pages
    text = page.path.read_text(encoding="utf-8")
    cards = dict(re.findall(r'<article [^>]*data-region="([^"]+)">(.*?)</article>', text, re.S))
    card, plain_card = cards[REGION_ID], cards[plain.region_id]
    assert "<dt>parts</dt>" in card and "<dt>parts</dt>" not in plain_card
    assert "left sleeve" in card and "&lt;script&gt;document.title=&#x27;pwned&#x27;&lt;/script&gt; collar" in card
    assert "<script>document.title" not in text and text.count("<script>") == 1, "only the page's own script"
    assert "rejected</span>: containment 0.61 below 0.80" in card and "1 kept of 2" in card
    assert "<details><summary>long caption</summary>a long &lt;b&gt;puffy&lt;/b&gt; sleeve</details>" in card
    assert all(f'stroke="#{bytes(part_color(i)).hex()}"' in card for i in range(2)), "swatches in the parts' colours"

    # The two regions differ only in their parts (and id): the parts' outlines and legend are in the pixels.
    thumbs = dict(re.findall(r'data-region="([^"]+)">.*?<img src="([^"]+)"', text, re.S))
    drawn, bare = (np.asarray(Image.open(page.path.parent / thumbs[rid]).convert("RGB"))
                   for rid in (REGION_ID, plain.region_id))
    assert bare.shape == (256, 256, 3) and drawn.shape[1] == 256 and drawn.shape[0] > 256, "a legend band under it"
    for index in range(2):
        assert _near(drawn[:256], part_color(index)).sum() > _near(bare, part_color(index)).sum() + 30, index
