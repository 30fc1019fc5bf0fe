"""`annotate show OUT`: a static HTML gallery of OUT/data, each region drawn by annotate/show.py.

    OUT/gallery/index.html            one line per shard: counts per status, links to the shard pages
    OUT/gallery/shard-NNNNN.html      every region of the shard: a thumbnail (linked to the full view)
                                      next to its phrase, captions, verdict, status, error and parts
    OUT/gallery/NNNNN/*.jpg           the drawn regions: `*.t.jpg` thumbnails, `*.jpg` full views

The gallery opens from disk (file://) with no server and no network: no external assets, one inline
style and one inline script (status filters), both allowed by hash in the page's Content-Security-Policy.
Every text from the data is HTML-escaped (captions come from models); URLs become links only when
they are http(s). Each page is written as its shard is read, so memory stays at a few rows whatever
the shard size.
"""

from __future__ import annotations

import base64
import hashlib
import html
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from annotate.data.records import ImageRecord, PartRecord, RegionRecord
from annotate.data.store import OutputStore, write_bytes_atomic
from annotate.export import safe_name
from annotate.show import (
    STATUSES,
    backdrops,
    dataset_dir,
    dataset_files,
    display_status,
    draw_parts,
    draw_region,
    iter_records,
    part_color,
    region_mask,
)

THUMB_SIDE = 256
FULL_SIDE = 2048  # full views keep the image's resolution up to this longest side
EAGER_THUMBS = 24  # the first thumbnails of a page load at once, the rest lazily


@dataclass
class ShardPage:
    shard: str
    path: Path
    images: int = 0
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STATUSES, 0))

    @property
    def regions(self) -> int:
        return sum(self.counts.values())


@dataclass
class Gallery:
    index: Path
    pages: list[ShardPage]

    @property
    def regions(self) -> int:
        return sum(p.regions for p in self.pages)


_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;background:#f6f6f4;color:#222}
header{position:sticky;top:0;background:#fff;border-bottom:1px solid #ddd;padding:8px 16px;z-index:1}
header h1{font-size:18px;margin:0 0 4px}
#filters label{margin-right:14px;white-space:nowrap}
main{padding:12px 16px}
.region{display:flex;gap:14px;background:#fff;border:1px solid #ddd;border-left:6px solid #888;
 border-radius:4px;padding:10px;margin:0 0 10px}
.region[hidden]{display:none}
.region.ok{border-left-color:#22aa44}.region.rejected{border-left-color:#f08c00}
.region.failed{border-left-color:#dc1e28}.region.pending{border-left-color:#787878}
.thumb{flex:0 0 260px;text-align:center}.thumb img{max-width:256px;background:#eee}
.meta{flex:1;min-width:0}.meta h2{font-size:14px;margin:0 0 6px}
dl{display:grid;grid-template-columns:8em 1fr;gap:3px 10px;margin:0}
dt{color:#666}dd{margin:0;white-space:pre-wrap;overflow-wrap:anywhere}
.badge{display:inline-block;padding:1px 7px;border-radius:9px;color:#fff;font-size:12px;background:#787878}
.badge.ok{background:#22aa44}.badge.rejected{background:#f08c00}.badge.failed{background:#dc1e28}
.none{color:#aaa}.err{color:#b00}.kept{color:#060}
table{border-collapse:collapse;background:#fff}td,th{border:1px solid #ddd;padding:4px 10px;text-align:right}
td:first-child,th:first-child{text-align:left}
"""

_SCRIPT = """
(function () {
  var boxes = Array.prototype.slice.call(document.querySelectorAll('#filters input[type=checkbox]'));
  var cards = Array.prototype.slice.call(document.querySelectorAll('.region'));
  var want = new URLSearchParams(location.search).get('status');
  if (want) boxes.forEach(function (b) { b.checked = want.split(',').indexOf(b.value) >= 0; });
  function apply() {
    var on = {}, shown = 0, counts = {};
    boxes.forEach(function (b) { on[b.value] = b.checked; counts[b.value] = 0; });
    cards.forEach(function (c) {
      var s = c.getAttribute('data-status');
      counts[s] = (counts[s] || 0) + 1;
      c.hidden = !on[s];
      if (!c.hidden) shown++;
    });
    boxes.forEach(function (b) {
      var n = document.querySelector('.count[data-status="' + b.value + '"]');
      if (n) n.textContent = counts[b.value];
    });
    document.getElementById('shown').textContent = shown + ' of ' + cards.length + ' regions shown';
  }
  boxes.forEach(function (b) { b.addEventListener('change', apply); });
  apply();
})();
"""


def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


# No network at all: images only from the gallery folder (file: for pages opened from disk), the one
# style and the one script by hash, so even an unescaped <script> from the data could not run.
_CSP = (f"default-src 'none'; img-src 'self' file: data:; style-src {_csp_hash(_STYLE)}; "
        f"script-src {_csp_hash(_SCRIPT)}; base-uri 'none'; form-action 'none'")


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _head(title: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">\n'
            f'<meta http-equiv="Content-Security-Policy" content="{_e(_CSP)}">\n'
            f'<meta name="referrer" content="no-referrer">\n'
            f'<title>{_e(title)}</title>\n<style>{_STYLE}</style></head>\n<body>\n')


def _text(value: str | None) -> str:
    return '<span class="none">none</span>' if value in (None, "") else _e(value)


def _link(url: str | None) -> str:
    if not url:
        return '<span class="none">none</span>'
    if re.match(r"^https?://", url, re.IGNORECASE):
        return f'<a href="{_e(url)}" rel="noopener noreferrer nofollow">{_e(url)}</a>'
    return _e(url)  # javascript:, data: and anything else stays text


def _file_stem(region_id: str) -> str:
    """A safe, unique file name for a region id (ids hold image keys: any characters)."""
    readable = safe_name(region_id)
    return f"{readable}-{hashlib.sha1(region_id.encode()).hexdigest()[:10]}"


def _validation(region: RegionRecord) -> str:
    v = region.validation
    if v is None:
        return '<span class="none">none</span>'
    verdict = "consistent" if v.consistent else "inconsistent"
    return f"<b>{verdict}</b>" + (f": {_e(v.reason)}" if v.reason else "")


@dataclass
class SideFiles:
    """The run-level side files of an output, by region id: near-duplicate clusters and scores."""

    duplicates: dict[str, tuple[str, int]]
    scores: dict[str, float]

    @classmethod
    def of_output(cls, store: OutputStore) -> "SideFiles":
        return cls(store.near_duplicates(), store.region_text_scores())

    def of(self, region_id: str) -> tuple[tuple[str, int] | None, float | None]:
        return self.duplicates.get(region_id), self.scores.get(region_id)


def _negative(description: str, candidate, kept: bool) -> str:
    verdicts = "".join(f" <small>{name}: {'yes' if v.holds else 'no'} ({_e(v.reason)})</small>"
                       for name, v in (("contradicts", candidate.contradiction), ("false in image", candidate.visual))
                       if v is not None)
    css = ' class="kept"' if kept else ""
    return (f"<li{css}><b>{_e(candidate.edit_type)}</b>: <del>{_e(description[candidate.start:candidate.end])}</del> "
            f"<ins>{_e(candidate.replacement)}</ins>{verdicts}</li>")


def _parts(parts: list[PartRecord]) -> str:
    """Each part under the swatch its outline has in the drawing (`show.part_color`; solid when kept,
    dashed when the mask checks rejected it), so a name in the list finds its outline in the image."""
    items = []
    for index, part in enumerate(parts):
        dash = "" if part.kept else ' stroke-dasharray="4 3"'
        swatch = (f'<svg width="24" height="10" aria-hidden="true"><line x1="0" y1="5" x2="24" y2="5" stroke='
                  f'"#{bytes(part_color(index)).hex()}" stroke-width="3"{dash}/></svg>')
        state = ('<span class="kept">kept</span>' if part.kept else '<span class="err">rejected</span>'
                 + (f": {_e(part.reject_reason)}" if part.reject_reason else ""))
        verdict = ("not verified" if part.verdict is None
                   else f"{'yes' if part.verdict.holds else 'no'} ({_e(part.verdict.reason)})")
        long = (f"<details><summary>long caption</summary>{_e(part.long_caption)}</details>"
                if part.long_caption else "")
        items.append(f"<li>{swatch} <b>{_e(part.name)}</b>: {state}; verdict: {verdict}<br>"
                     f"{_text(part.short_caption)}{long}</li>")
    return f"{sum(p.kept for p in parts)} kept of {len(parts)}<ul>{''.join(items)}</ul>"


def _added_fields(region: RegionRecord, duplicate: tuple[str, int] | None, score: float | None) -> list[tuple[str, str]]:
    """Rows for the fields of the optional stages after merge, only those the region has."""
    rows = []
    if region.summary is not None:
        rows.append(("summary", f"{_e(region.summary)} <small>({region.summary_tokens} CLIP tokens)</small>"))
    if region.sentences is not None:
        rows.append(("sentences", "<ol>" + "".join(f"<li>{_e(s.text)}</li>" for s in region.sentences) + "</ol>"))
    if region.phrases is not None:
        refs = {"self": "this region", "none": "ungrounded"}
        rows.append(("phrases", "<ul>" + "".join(
            f"<li><q>{_e(p.text)}</q> → {_e(p.region_id if p.target == 'region' else refs[p.target])}</li>"
            for p in region.phrases) + "</ul>" if region.phrases else _text(None)))
    if region.negative_candidates is not None:
        kept = {n.text for n in region.negatives or []}
        items = "".join(_negative(region.fine_caption or "", c, c.text in kept) for c in region.negative_candidates)
        rows.append(("hard negatives", f"{len(region.negatives or [])} kept of {len(region.negative_candidates)}"
                                       + (f"<ul>{items}</ul>" if items else "")))
    if region.parts:
        rows.append(("parts", _parts(region.parts)))
    if region.quality is not None:
        q = region.quality
        share = "n/a" if q.unsupported_noun_share is None else f"{q.unsupported_noun_share:.2f} of {q.nouns}"
        rows.append(("quality", f"{q.words} words; flags: {_e(', '.join(q.flags) or 'none')}; "
                                f"unsupported nouns: {share}"))
    if duplicate is not None:
        rows.append(("near duplicates", f"cluster <code>{_e(duplicate[0])}</code> of {duplicate[1]}"))
    if score is not None:
        rows.append(("region-text score", f"{score:.3f}"))
    return rows


def _card(record: ImageRecord, region: RegionRecord, thumb: str, full: str, thumb_size: tuple[int, int],
          eager: bool, image_note: str | None, side: "SideFiles | None" = None) -> str:
    status = display_status(region)
    rid = _e(region.region_id)
    rows = [
        ("phrase", _text(region.phrase)),
        ("object", _text(region.object_caption)),
        ("validation", _validation(region)),
        ("context", _text(region.context_caption)),
        ("fine", _text(region.fine_caption)),
        *_added_fields(region, *(side.of(region.region_id) if side else (None, None))),
        ("status", f'<span class="badge {status}">{_e(region.status)}</span>'),
        ("error", f'<span class="err">{_e(region.error)}</span>' if region.error else _text(None)),
        ("mask", f"{_text(region.mask_source)}; box [{', '.join(f'{v:.0f}' for v in region.bbox)}]"),
        ("image", f"{_e(record.image_key)} ({record.width}\u00d7{record.height})"
                  + (f' <span class="err">{_e(image_note)}</span>' if image_note else "")),
        ("image caption", _text(record.caption)),
        ("url", _link(record.url)),
    ]
    dl = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in rows)
    loading = "eager" if eager else "lazy"
    return (f'<article class="region {status}" data-status="{status}" data-region="{rid}">\n'
            f'<div class="thumb"><a href="{_e(full)}"><img src="{_e(thumb)}" width="{thumb_size[0]}" '
            f'height="{thumb_size[1]}" alt="region {rid}" loading="{loading}"></a></div>\n'
            f'<div class="meta"><h2><code>{rid}</code></h2><dl>{dl}</dl></div>\n</article>\n')


def _filters() -> str:
    boxes = "".join(
        f'<label><input type="checkbox" value="{s}" checked> <span class="badge {s}">{s}</span> '
        f'(<span class="count" data-status="{s}">0</span>)</label>'
        for s in STATUSES
    )
    return f'<form id="filters">Show: {boxes} <span id="shown"></span></form>'


def _write_atomic(path: Path, chunks: Iterable[str]) -> None:
    """A page streamed from its generator, whole or not at all (a drawing that fails leaves the old page)."""
    write_bytes_atomic(path, (chunk.encode("utf-8") for chunk in chunks))


def _shard_page(data_file: Path, html_dir: Path, page: ShardPage, thumb_side: int, full_side: int | None,
                max_images: int | None, side: "SideFiles") -> Iterator[str]:
    """Yields the shard page while drawing its regions into html_dir/SHARD/; fills in `page`'s counts."""
    asset_dir = html_dir / page.shard
    asset_dir.mkdir(parents=True, exist_ok=True)
    yield _head(f"LongGRIT shard {page.shard}")
    yield (f'<header><h1>Shard {_e(page.shard)} <small><a href="index.html">all shards</a></small></h1>'
           f"{_filters()}</header>\n<main>\n")
    n_cards = 0
    for record in iter_records(data_file):
        if max_images is not None and page.images >= max_images:
            break
        page.images += 1
        if not record.regions:
            continue
        size, (thumb_base, full_base), note = backdrops(record, record.regions[0], [thumb_side, full_side])
        for region in record.regions:
            mask = region_mask(region, *size)
            stem = _file_stem(region.region_id)
            thumb_img, full_img = (draw_parts(draw_region(base, size, region, mask), size, region)
                                   for base in (thumb_base, full_base))
            thumb_img.save(asset_dir / f"{stem}.t.jpg", format="JPEG", quality=85)
            full_img.save(asset_dir / f"{stem}.jpg", format="JPEG", quality=90)
            page.counts[display_status(region)] += 1
            yield _card(record, region, f"{page.shard}/{stem}.t.jpg", f"{page.shard}/{stem}.jpg", thumb_img.size,
                        eager=n_cards < EAGER_THUMBS, image_note=note, side=side)
            n_cards += 1
    if n_cards == 0:
        yield '<p class="none">no regions in this shard</p>\n'
    yield f"</main>\n<script>{_SCRIPT}</script>\n</body></html>\n"


def _index_page(pages: list[ShardPage], out_dir: Path) -> Iterator[str]:
    yield _head("LongGRIT gallery")
    yield f"<header><h1>LongGRIT gallery</h1><div>{_e(out_dir)}</div></header>\n<main>\n"
    yield "<table><tr><th>shard</th><th>images</th><th>regions</th>" + "".join(f"<th>{s}</th>" for s in STATUSES) + "</tr>\n"
    for p in pages:
        name = _e(p.path.name)
        cells = "".join(f'<td><a href="{name}?status={s}">{p.counts[s]}</a></td>' for s in STATUSES)
        yield f'<tr><td><a href="{name}">{_e(p.shard)}</a></td><td>{p.images}</td><td>{p.regions}</td>{cells}</tr>\n'
    total = {s: sum(p.counts[s] for p in pages) for s in STATUSES}
    yield (f"<tr><th>total</th><th>{sum(p.images for p in pages)}</th><th>{sum(total.values())}</th>"
           + "".join(f"<th>{total[s]}</th>" for s in STATUSES) + "</tr>\n</table>\n")
    if not pages:
        yield '<p class="none">no shard files in OUT/data</p>\n'
    yield "</main>\n</body></html>\n"


def write_gallery(out_dir: str | Path, html_dir: str | Path | None = None, shards: Iterable[int] | None = None,
                  max_images: int | None = None, thumb_side: int = THUMB_SIDE, full_side: int | None = FULL_SIDE) -> Gallery:
    """`annotate show OUT`: the gallery of OUT/data in `html_dir` (default OUT/gallery), one shard at a time.
    `max_images` caps the images per shard page (None: all)."""
    out_dir = Path(out_dir)
    if not dataset_dir(out_dir).is_dir():
        raise FileNotFoundError(f"{dataset_dir(out_dir)} does not exist: pass the --output folder of a run")
    files = dataset_files(out_dir, shards)
    store = OutputStore(out_dir)
    html_dir = Path(html_dir) if html_dir is not None else store.gallery_dir
    html_dir.mkdir(parents=True, exist_ok=True)
    pages = []
    side = SideFiles.of_output(store)
    for data_file in files:
        shard = safe_name(data_file.stem) or "shard"
        page = ShardPage(shard=shard, path=html_dir / f"shard-{shard}.html")
        _write_atomic(page.path, _shard_page(data_file, html_dir, page, thumb_side, full_side, max_images,
                                                  side))
        pages.append(page)
    index = html_dir / "index.html"
    _write_atomic(index, _index_page(pages, out_dir))
    return Gallery(index=index, pages=pages)
