"""Self-contained HTML reports (`search --html`, `dedup --html`): one file, thumbnails inside.

Thumbnails are base64 JPEGs made with the safe decoder; every path and query is escaped with
html.escape, so a hostile file name cannot inject markup into the report.
"""

from __future__ import annotations

import base64
import html
import time
from collections.abc import Iterable

from indexer.decode import DecodeLimits, read_file
from indexer.errors import ClipdexError
from indexer.store import Store

from .dedup import DEFAULT_THRESHOLD, DupGroup
from .query import QueryResult
from .thumbs import stored_thumbnail, thumbnail_jpeg

_STYLE = """
body{font-family:system-ui,sans-serif;margin:20px;color:#1d232a;background:#f5f7f9}
h1{font-size:22px} h2{font-size:17px;margin:24px 0 8px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(180px,1fr));gap:10px}
.card{background:#fff;border:1px solid #d9dee3;border-radius:6px;padding:6px;font-size:12px}
.card.dup{border:3px solid #d97706;padding:4px}
.card img{width:100%;height:140px;object-fit:contain;background:#e8ebee}
.noimg{height:140px;display:flex;align-items:center;justify-content:center;background:#e8ebee;
color:#5f6b76}
.score{font-weight:600;font-size:14px} .path{color:#5f6b76;word-break:break-all}
.query img{max-width:240px;max-height:180px} .error{color:#c0262d}
"""


def _img(jpeg: bytes | None, alt: str) -> str:
    if jpeg is None:
        return f'<div class="noimg">{html.escape(alt)}</div>'
    data = base64.b64encode(jpeg).decode()
    return f'<img src="data:image/jpeg;base64,{data}" alt="{html.escape(alt)}">'


def _stored_jpeg(store: Store, sha: str) -> bytes | None:
    img = store.image(sha)
    try:
        return stored_thumbnail(img, DecodeLimits()) if img else None
    except ClipdexError:
        return None


def _card(jpeg: bytes | None, title: str, paths: Iterable[str], dup: bool) -> str:
    rows = "".join(f'<div class="path">{html.escape(p)}</div>' for p in paths)
    return (f'<div class="card{" dup" if dup else ""}">{_img(jpeg, "no thumbnail")}'
            f'<div class="score">{html.escape(title)}</div>{rows}</div>')


def _page(title: str, body: list[str]) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f'<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>'
            f'<h1>{html.escape(title)}</h1><p>written by clipdex at {stamp}</p>'
            + "".join(body) + "</body></html>\n")


def _query_image(result: QueryResult) -> str:
    if result.kind != "image":
        return ""
    try:
        jpeg: bytes | None = thumbnail_jpeg(read_file(result.query, DecodeLimits()),
                                            DecodeLimits())
    except ClipdexError:
        jpeg = None
    return f'<div class="query">{_img(jpeg, "query not decodable")}</div>'


def search_report(store: Store, results: list[QueryResult],
                  near: float = DEFAULT_THRESHOLD) -> str:
    """One section per query: the query, then its hits as thumbnails with scores and paths."""
    body: list[str] = []
    for res in results:
        body.append(f"<h2>{html.escape(res.kind)}: {html.escape(res.query)}</h2>")
        body.append(_query_image(res))
        if res.error:
            body.append(f'<p class="error">{html.escape(res.error)}</p>')
            continue
        cards = [_card(_stored_jpeg(store, h.sha256),
                       f"#{h.rank}  {h.score:.4f}" + ("  near-duplicate" if h.score >= near
                                                      else ""), h.paths, h.score >= near)
                 for h in res.hits]
        body.append('<div class="grid">' + "".join(cards) + "</div>")
    return _page(f"clipdex search ({len(results)} queries)", body)


def dedup_report(store: Store, groups: list[DupGroup], threshold: float) -> str:
    """A contact sheet: one row of thumbnails per near-duplicate group."""
    body = [f"<p>{len(groups)} group(s) at similarity &gt;= {threshold}; the first image of "
            "each group is its representative (the oldest).</p>"]
    for i, g in enumerate(groups, 1):
        body.append(f"<h2>group {i}: {len(g.members)} images</h2>")
        cards = [_card(_stored_jpeg(store, m.sha256),
                       f"{m.score:.4f}" + ("  representative" if j == 0 else ""), m.paths, j > 0)
                 for j, m in enumerate(g.members)]
        body.append('<div class="grid">' + "".join(cards) + "</div>")
    return _page("clipdex near-duplicate groups", body)


def write_search_report(path: str, store: Store, results: list[QueryResult]) -> None:
    _write(path, search_report(store, results))


def write_dedup_report(path: str, store: Store, groups: list[DupGroup],
                       threshold: float) -> None:
    _write(path, dedup_report(store, groups, threshold))


def _write(path: str, page: str) -> None:
    with open(path, "w", encoding="utf-8") as f:  # the umask's mode, like any file users write
        f.write(page)
