"""`annotate show`: the HTML gallery (files, escaping, one card per region), one region to PNG, and the
gallery opened in headless Chromium (slow: it checks that the page loaded its images and runs its filters)."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import shutil
import subprocess
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata
from skimage.draw import ellipse
from typer.testing import CliRunner

import shardkit as sk
from annotate.cli import app
from annotate.data.masks import encode_rle
from annotate.data.records import ImageRecord, Provenance, RegionRecord, Validation
from annotate.data.writer import write_parquet_atomic
from annotate.gallery import write_gallery
from annotate.show import MASK_ALPHA, STATUS_COLORS

XSS_CAPTION = "a cat <script>document.title='pwned'</script> & \"friends\""
XSS_PHRASE = "<img src=x onerror=\"document.title='pwned'\">"
EVIL_KEY = 'evil"<key>/../x'


def _jpeg(arr: np.ndarray) -> bytes:
    return sk.encode(arr, "JPEG", quality=92)


def _ellipse_mask(h: int, w: int, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    m = np.zeros((h, w), bool)
    rr, cc = ellipse(cy, cx, ry, rx, shape=(h, w))
    m[rr, cc] = True
    return m


def _box_of(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


def _region(shard: str, key: str, index: int, mask: np.ndarray | None, status: str, **kw) -> RegionRecord:
    bbox = kw.pop("bbox", None) or _box_of(mask)
    return RegionRecord(region_id=f"{shard}:{key}:{index}", region_index=index, bbox=bbox,
                        mask=encode_rle(mask) if mask is not None else None, mask_source="given" if mask is not None else None,
                        status=status, provenance=Provenance(), **kw)


def _captions(obj: str) -> dict:
    return dict(object_caption=obj, validation=Validation(consistent=True, reason="matches the crop"),
                context_caption=f"{obj}, in the left half of the picture",
                fine_caption=f"{obj}; it sits in the left half of the picture.")


def build_output(out: Path) -> dict:
    """Two shards of real photos (skimage), real RLE masks, every status; returns what the tests check."""
    astronaut = skdata.astronaut()[::2, ::2].copy()  # 256 x 256
    coffee = skdata.coffee()[::2, ::2].copy()  # 200 x 300
    chelsea = skdata.chelsea()[::2, ::2].copy()  # 150 x 226, stored rotated with an EXIF orientation
    h, w = astronaut.shape[:2]
    face = _ellipse_mask(h, w, 55, 85, 40, 30)
    suit = _ellipse_mask(h, w, 190, 90, 66, 70)
    rocket = _ellipse_mask(h, w, 60, 220, 55, 12)
    s0 = [
        ImageRecord(image_key="000000000", shard="00000", width=w, height=h, caption="an astronaut beside a rocket",
                    url="https://example.invalid/astronaut.jpg", image_bytes=_jpeg(astronaut), regions=[
                        _region("00000", "000000000", 0, face, "ok", phrase="a smiling face", **_captions("a smiling face")),
                        _region("00000", "000000000", 1, suit, "rejected", phrase="an orange suit", object_caption="a green lizard",
                                validation=Validation(consistent=False, reason="the crop shows an orange suit, not a lizard"),
                                error="validate: inconsistent caption"),
                        _region("00000", "000000000", 2, rocket, "failed", phrase="the rocket", object_caption="a rocket",
                                error="context: length: output cut by max_tokens"),
                    ]),
    ]
    ch, cw = coffee.shape[:2]
    cup = _ellipse_mask(ch, cw, 60, 150, 55, 80)
    s0.append(ImageRecord(image_key="000000001", shard="00000", width=cw, height=ch, caption="espresso on a saucer",
                          url="javascript:alert(1)", image_bytes=_jpeg(coffee), regions=[
                              _region("00000", "000000001", 0, cup, "ok", phrase="a cup", **_captions("a cup of espresso")),
                          ]))
    # Shard 1: a rotated JPEG (boxes are in displayed pixels), an undecodable image, hostile text.
    dh, dw = chelsea.shape[:2]
    cat = _ellipse_mask(dh, dw, 75, 110, 60, 70)
    s1 = [
        ImageRecord(image_key="000010000", shard="00001", width=dw, height=dh, caption=XSS_CAPTION,
                    url="https://example.invalid/cat.jpg", image_bytes=sk.jpeg_with_orientation(chelsea, 6), regions=[
                        _region("00001", "000010000", 0, cat, "ok", phrase=XSS_PHRASE, **_captions(XSS_CAPTION)),
                    ]),
        ImageRecord(image_key="000010001", shard="00001", width=320, height=200, caption="a broken download",
                    image_bytes=None, regions=[
                        _region("00001", "000010001", 0, None, "failed", phrase="a thing", bbox=[40, 30, 100, 80],
                                error="image: JPEG data is truncated or corrupt"),
                    ]),
        ImageRecord(image_key=EVIL_KEY, shard="00001", width=cw, height=ch, caption="keys can hold anything",
                    image_bytes=_jpeg(coffee), regions=[
                        _region("00001", EVIL_KEY, 0, cup, "rejected", phrase="a cup </dd></dl><b>bold</b>",
                                object_caption="</article><script>document.title='pwned'</script>",
                                validation=Validation(consistent=False, reason="<i>not</i> a cup"), error="validate: no"),
                    ]),
    ]
    write_parquet_atomic(s0, out / "data" / "00000.parquet")
    write_parquet_atomic(s1, out / "data" / "00001.parquet")
    regions = {r.region_id: (rec, r) for rec in s0 + s1 for r in rec.regions}
    return {"out": out, "regions": regions, "images": {"astronaut": astronaut, "coffee": coffee, "chelsea": chelsea},
            "masks": {"face": face, "suit": suit}}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    return build_output(tmp_path_factory.mktemp("show") / "out")


@pytest.fixture(scope="module")
def gallery(built):
    return write_gallery(built["out"])


class _Page(HTMLParser):
    """Region cards, their image sources and links, and every <script> of a page."""

    def __init__(self):
        super().__init__()
        self.cards: list[dict] = []
        self.imgs: list[str] = []
        self.links: list[str] = []
        self.scripts = 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "article" and "region" in (a.get("class") or "").split():
            self.cards.append(a)
        elif tag == "img":
            self.imgs.append(a["src"])
        elif tag == "a" and a.get("href"):
            self.links.append(a["href"])
        elif tag == "script":
            self.scripts += 1


def _parse(path: Path) -> _Page:
    p = _Page()
    p.feed(path.read_text(encoding="utf-8"))
    return p


def test_gallery_has_one_card_per_region_and_its_images(built, gallery):
    html_dir = built["out"] / "gallery"
    assert gallery.index == html_dir / "index.html"
    assert [p.path.name for p in gallery.pages] == ["shard-00000.html", "shard-00001.html"]
    index = _parse(gallery.index)
    assert {"shard-00000.html", "shard-00001.html", "shard-00000.html?status=rejected"} <= set(index.links)

    seen = Counter()
    for page in gallery.pages:
        parsed = _parse(page.path)
        seen.update(card["data-region"] for card in parsed.cards)
        assert {c["data-status"] for c in parsed.cards} <= set(STATUS_COLORS)
        # Every thumbnail and full view the page names exists under the gallery folder and is an image.
        for src in parsed.imgs:
            with Image.open(html_dir / src) as im:
                assert max(im.size) <= 256
        fulls = [h for h in parsed.links if h.startswith(page.shard + "/")]
        assert len(fulls) == len(parsed.cards) == len(parsed.imgs)
        for href in fulls:
            target = (html_dir / href).resolve()
            assert target.is_relative_to(html_dir.resolve()) and target.is_file()
    assert seen == Counter(dict.fromkeys(built["regions"], 1)), "every region id exactly once"
    assert gallery.regions == len(built["regions"])
    assert {s: sum(p.counts[s] for p in gallery.pages) for s in ("ok", "rejected", "failed")} == {"ok": 3, "rejected": 2, "failed": 2}

    # Full views keep the displayed size (the EXIF-rotated cat as displayed, not as stored); the missing image
    # gets a placeholder of its recorded size.
    page1 = _parse(gallery.pages[1].path)
    full = dict(zip([c["data-region"] for c in page1.cards], [h for h in page1.links if h.startswith("00001/")]))
    with Image.open(html_dir / full["00001:000010000:0"]) as im:
        dh, dw = built["images"]["chelsea"].shape[:2]
        assert im.size == (dw, dh) and dw != dh
    with Image.open(html_dir / full["00001:000010001:0"]) as im:
        assert im.size == (320, 200)
        assert np.asarray(im.convert("L")).std() > 5  # hatched, with the box drawn: not blank


def test_gallery_escapes_every_text_from_the_data(built, gallery):
    text = gallery.pages[1].path.read_text(encoding="utf-8")
    parsed = _parse(gallery.pages[1].path)
    assert parsed.scripts == 1, "only the page's own filter script"
    assert "pwned'</script>" not in text and "<img src=x" not in text and "<b>bold</b>" not in text
    assert "&lt;script&gt;document.title=&#x27;pwned&#x27;&lt;/script&gt;" in text
    assert "&lt;img src=x onerror=&quot;" in text
    assert "&lt;i&gt;not&lt;/i&gt; a cup" in text
    # One card per region even with `</article>` inside a caption, and the evil key is one card.
    assert [c["data-region"] for c in parsed.cards] == ["00001:000010000:0", "00001:000010001:0", f"00001:{EVIL_KEY}:0"]
    # Asset names are safe whatever the image key holds (export.safe_name: no separator, no leading dot).
    assets = list((built["out"] / "gallery" / "00001").iterdir())
    assert assets and all(re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]*-[0-9a-f]{10}\.(t\.)?jpg", p.name) for p in assets)
    assert any(p.name.startswith("00001_evil_key_.._x_0-") for p in assets)  # the key's `..` is a name, not a path
    # A javascript: URL from the data is shown as text, never as a link.
    page0 = gallery.pages[0].path.read_text(encoding="utf-8")
    assert "javascript:alert(1)" in page0 and 'href="javascript:' not in page0
    assert "Content-Security-Policy" in page0 and "default-src &#x27;none&#x27;" in page0


def test_gallery_max_images_and_html_dir(built, tmp_path):
    g = write_gallery(built["out"], tmp_path / "g", shards=[0], max_images=1)
    assert [p.shard for p in g.pages] == ["00000"]
    assert [c["data-region"] for c in _parse(g.pages[0].path).cards] == [f"00000:000000000:{i}" for i in range(3)]


def test_show_region_png_draws_mask_box_and_id(built, tmp_path):
    out = built["out"]
    png = tmp_path / "face.png"
    result = CliRunner().invoke(app, ["show", str(out), "--region", "00000:000000000:0", "--png", str(png)])
    assert result.exit_code == 0, result.output
    drawn = np.asarray(Image.open(png).convert("RGB")).astype(float)
    record, _ = built["regions"]["00000:000000000:0"]
    original = np.asarray(Image.open(io.BytesIO(record.image_bytes)).convert("RGB")).astype(float)
    assert drawn.shape == original.shape
    face = built["masks"]["face"]
    inner = _erode(face, 4)  # away from the contour line
    expected = original * (1 - MASK_ALPHA) + np.asarray(STATUS_COLORS["ok"], float) * MASK_ALPHA
    assert np.abs(drawn[inner] - expected[inner]).mean() < 3, "mask filled translucent in the status colour"
    far = ~_dilate(face | _box(face), 40)  # away from the mask, box and label: untouched
    far[:30] = False
    assert np.abs(drawn[far] - original[far]).mean() < 1
    x, y, bw, bh = (int(v) for v in _box_of(face))
    box_edge = drawn[y + bh // 2, x - 1:x + 2]  # the box's left edge, at mid height
    assert np.any(np.abs(box_edge - np.asarray(STATUS_COLORS["ok"])).sum(-1) < 30)

    # A region whose image is missing renders on a placeholder of the recorded size.
    png2 = tmp_path / "missing.png"
    result = CliRunner().invoke(app, ["show", str(out), "--region", "00001:000010001:0", "--png", str(png2)])
    assert result.exit_code == 0, result.output
    assert Image.open(png2).size == (320, 200)


def test_show_cli_errors(built, tmp_path):
    bad = CliRunner().invoke(app, ["show", str(built["out"]), "--region", "00000:nope:0", "--png", str(tmp_path / "x.png")])
    assert bad.exit_code == 2 and "no region '00000:nope:0'" in bad.output
    half = CliRunner().invoke(app, ["show", str(built["out"]), "--region", "00000:000000000:0"])
    assert half.exit_code == 2 and "--region and --png go together" in half.output
    ok = CliRunner().invoke(app, ["show", str(built["out"]), "--html-dir", str(tmp_path / "g"), "--shards", "1"])
    assert ok.exit_code == 0, ok.output
    assert "1 shard page(s), 3 regions" in ok.output and (tmp_path / "g" / "shard-00001.html").is_file()
    missing = CliRunner().invoke(app, ["show", str(tmp_path / "not-a-run")])
    assert missing.exit_code == 2 and "exist" in missing.output, missing.output


def _erode(mask: np.ndarray, n: int) -> np.ndarray:
    import cv2

    return cv2.erode(mask.astype(np.uint8), np.ones((2 * n + 1, 2 * n + 1), np.uint8)).astype(bool)


def _dilate(mask: np.ndarray, n: int) -> np.ndarray:
    import cv2

    return cv2.dilate(mask.astype(np.uint8), np.ones((2 * n + 1, 2 * n + 1), np.uint8)).astype(bool)


def _box(mask: np.ndarray) -> np.ndarray:
    x, y, w, h = (int(v) for v in _box_of(mask))
    b = np.zeros_like(mask)
    b[y:y + h, x:x + w] = True
    return b


# ------------------------------------------------------------------------------ headless Chromium
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars"]

# Injected into a copy of the page (allowed by adding its hash to the page's own CSP, which otherwise
# stays in force): forces lazy thumbnails to load, waits for every image, exercises the status filter
# and writes the results into the DOM for --dump-dom.
CHECK_SCRIPT = """
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  imgs.forEach(function (i) { i.loading = 'eager'; });
  Promise.all(imgs.map(function (i) { return i.decode().then(function () { return true; }, function () { return false; }); }))
  .then(function (decoded) {
    var box = document.querySelector('#filters input[value=ok]');
    box.click();
    var okHidden = Array.prototype.every.call(document.querySelectorAll('.region.ok'), function (c) { return c.hidden; });
    var othersShown = Array.prototype.every.call(document.querySelectorAll('.region:not(.ok)'), function (c) { return !c.hidden; });
    var shown = document.getElementById('shown').textContent;
    box.click();
    var out = document.createElement('pre');
    out.id = 'check';
    out.textContent = JSON.stringify({
      images: imgs.map(function (i, k) { return {src: i.getAttribute('src'), complete: i.complete, width: i.naturalWidth, decoded: decoded[k]}; }),
      okHidden: okHidden, othersShown: othersShown, shownWithoutOk: shown, title: document.title});
    document.body.appendChild(out);
  });
});
"""


def _chromium(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("chromium")
    if exe is None:
        pytest.fail("headless Chromium is needed for this test: `make chromium` (apt-get install chromium)")
    return subprocess.run([exe, *CHROMIUM_FLAGS, f"--user-data-dir={cwd / 'chromium-profile'}", *args],
                          capture_output=True, text=True, timeout=180, cwd=cwd)


@pytest.mark.slow
def test_gallery_in_headless_chromium(built, gallery, tmp_path):
    page = gallery.pages[1].path  # the shard with the rotated, the missing and the hostile records
    # 1. Screenshot of the page as a user sees it.
    shot = tmp_path / "shard-00001.png"
    r = _chromium(["--window-size=1280,1100", "--virtual-time-budget=10000", f"--screenshot={shot}", page.as_uri()], tmp_path)
    assert r.returncode == 0 and shot.is_file(), r.stderr[-3000:]
    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape == (1100, 1280, 3)
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 2000, "a page with photos, not a blank or text-only page"
    ok_green = np.abs(img.astype(int) - STATUS_COLORS["ok"]).sum(-1) < 40
    assert ok_green.sum() > 200, "status badges / region drawing in the ok colour are visible"

    # 2. The DOM after load: every image loaded and decoded, filters work, no script from the data ran.
    text = page.read_text(encoding="utf-8")
    digest = "'sha256-" + base64.b64encode(hashlib.sha256(CHECK_SCRIPT.encode()).digest()).decode() + "'"
    text, n = re.subn(r"script-src ", f"script-src {digest} ", text, count=1)
    assert n == 1
    check_page = page.with_name("check-" + page.name)  # next to the page, so relative image paths resolve
    check_page.write_text(text.replace("</body>", f"<script>{CHECK_SCRIPT}</script>\n</body>"), encoding="utf-8")
    # Virtual time does not wait for the image decoder's threads: under CI's load the budget ran out
    # before decode() settled (once at 15 s, once at 60 s), and the script never wrote its result. A
    # run without the result says nothing about the page, so it is run again (each run checks it all).
    for _attempt in range(3):
        r = _chromium(["--virtual-time-budget=60000", "--dump-dom", check_page.as_uri()], tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
        m = re.search(r'<pre id="check">(.*?)</pre>', r.stdout, re.S)
        if m:
            break
    assert m, "the check script did not finish in three runs: " + r.stdout[-2000:]
    result = json.loads(m.group(1).replace("&quot;", '"').replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&"))
    assert len(result["images"]) == 3
    for im in result["images"]:
        assert im["complete"] and im["decoded"] and im["width"] > 0, im
    assert result["okHidden"] and result["othersShown"]
    assert result["shownWithoutOk"] == "2 of 3 regions shown"
    assert result["title"] == "LongGRIT shard 00001", "a script from the data ran"
