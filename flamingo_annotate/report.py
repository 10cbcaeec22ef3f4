"""`flamingo-annotate report OUTPUT --html FILE`: an output as static HTML pages, each item's picture beside
what every task said about it, to look through the annotations rather than query them.

The pages are plain files: no server, nothing fetched (the pictures are JPEG data URIs in the page, the style
and the few lines of script that filter the page are inline), so FILE can be mailed, opened from a bucket or
attached to a ticket as it is.

Rows come from `pipeline.query.connect` (the `annotations` view: one row per item and task, the latest when a
re-run left two; s3:// outputs read through media.storage), chosen at build time by task, by error, or by any
SQL condition over the view's columns, and taken item by item in id order (`limit` items at most). Pictures
come from the items' sources through `media.thumbnails`, a page at a time. A picture that cannot be made is a
placeholder that says why; an error row shows its error and kind; an output with no rows gives a page saying
so. In the page, the items shown can be narrowed by task, by annotation text and by ok / error; the choice
is kept in the address (`#task=...&status=...&q=...`), so it follows the links between pages.

Pages hold `page_size` items: FILE, then FILE-2.html, FILE-3.html, ... beside it, linked by prev / next.
"""

from __future__ import annotations

import base64
import html
import math
import shlex
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import quote

import duckdb

from media.thumbnails import Thumbnail, ThumbnailConfig, ThumbnailReader
from pipeline import query
from pipeline.runs import read_records
from pipeline.schema import (
    ANNOTATION_COLUMN,
    ERROR_COLUMN,
    ERROR_KIND_COLUMN,
    ID_COLUMN,
    OUTPUT_SCHEMA,
    SOURCE_COLUMN,
    TASK_COLUMN,
)

DEFAULT_LIMIT = 1000     # items; a gallery of a whole large output would be gigabytes of pictures
DEFAULT_PAGE_SIZE = 200
GENERATOR = "flamingo-annotate report"   # in every page's <meta name="generator">: stale pages are ours to remove
_MATCHED = "_report_rows"          # the rows that match the filters
_SHOWN = "_report_items"           # the items shown (--limit), each with its page
_SHOWN_ROWS = "_report_shown_rows"  # the matching rows of those items, with their page
_PAGE_COLUMN = "_report_page"


@dataclass(frozen=True)
class ReportOptions:
    tasks: tuple[str, ...] = ()            # only these tasks' rows (none: all)
    errors_only: bool = False
    where: str | None = None               # SQL condition over the `annotations` columns
    limit: int | None = DEFAULT_LIMIT      # items (None: all)
    page_size: int = DEFAULT_PAGE_SIZE
    thumbnail: ThumbnailConfig = field(default_factory=ThumbnailConfig)
    storage_options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ReportSummary:
    pages: tuple[Path, ...]
    items: int             # items shown
    matched_items: int     # items with a row that matches the filters (more than `items` under a limit)
    rows: int              # rows shown
    error_rows: int
    pictures: int          # items shown with a picture
    placeholders: int      # items shown with a placeholder instead

    def format(self) -> str:
        more = f" of {self.matched_items} (--limit)" if self.matched_items > self.items else ""
        return (f"Wrote {self.pages[0]}" + (f" and {len(self.pages) - 1} more pages" if len(self.pages) > 1 else "")
                + f": {self.items} items{more}, {self.rows} rows ({self.error_rows} errors), "
                f"{self.pictures} pictures, {self.placeholders} placeholders")


def build_report(output: str, html_path: str | Path, options: ReportOptions | None = None,
                 on_page: Callable[[int, int], None] | None = None) -> ReportSummary:
    """Write the report of `output` to `html_path` (and its further pages beside it). Raises FileNotFoundError
    for a missing output, ValueError for a folder that is not an annotation output or a bad `where`;
    `on_page(page, pages)` is called as each page is written."""
    options = options or ReportOptions()
    html_path = Path(html_path)
    html_path.parent.mkdir(parents=True, exist_ok=True)
    con, rows_view = _connect(output, options.storage_options)
    columns = con.table(rows_view).columns
    missing = [c for c in (ID_COLUMN, SOURCE_COLUMN, TASK_COLUMN, ERROR_COLUMN) if c not in columns]
    if missing:
        raise ValueError(f"{output}: not an annotation output (no {', '.join(missing)} column)")
    _select(con, rows_view, options)
    shown = _count(con, f"SELECT count(*) FROM {_SHOWN}")
    pages = max(1, math.ceil(shown / options.page_size))
    names = [_page_path(html_path, page).name for page in range(1, pages + 1)]
    extra = [c for c in columns if c not in OUTPUT_SCHEMA.names]  # kept input columns (url, caption, key, ...)
    matched = _count(con, f"SELECT count(DISTINCT {_ident(ID_COLUMN)}) FROM {_MATCHED}")
    context = _Context(output, options, _all_tasks(con), extra, matched, names)
    thumbnail = replace(options.thumbnail, **_run_settings(output, options))
    summary = ReportSummary(pages=(), items=0, matched_items=matched, rows=0, error_rows=0, pictures=0,
                            placeholders=0)
    with ThumbnailReader(thumbnail, options.storage_options) as reader:
        for page in range(1, pages + 1):
            page_rows = con.sql(
                f"SELECT * EXCLUDE ({_PAGE_COLUMN}) FROM {_SHOWN_ROWS} WHERE {_PAGE_COLUMN} = {page} "
                f"ORDER BY {_ident(ID_COLUMN)}, {_ident(TASK_COLUMN)}").to_arrow_table().to_pylist()
            items = _group(page_rows)
            pictures = reader.thumbnails({item_id: rows[0][SOURCE_COLUMN] for item_id, rows in items.items()})
            path = _page_path(html_path, page)
            path.write_text(render_page(context, page, items, pictures, first_item=summary.items + 1),
                            encoding="utf-8")
            with_picture = sum(pictures[item_id].jpeg is not None for item_id in items)
            summary = replace(summary, pages=(*summary.pages, path), items=summary.items + len(items),
                              rows=summary.rows + len(page_rows),
                              error_rows=summary.error_rows + sum(row[ERROR_COLUMN] is not None for row in page_rows),
                              pictures=summary.pictures + with_picture,
                              placeholders=summary.placeholders + len(items) - with_picture)
            if on_page:
                on_page(page, pages)
    _remove_stale_pages(html_path, pages)
    return summary


def _connect(output: str, storage_options: Mapping[str, Any]) -> tuple[duckdb.DuckDBPyConnection, str]:
    """A connection to the output and the name of its rows' view. An output folder without a Parquet file yet
    (no run has written to it) reads as an empty table of the output's columns."""
    try:
        return query.connect(output, storage_options), query.ANNOTATIONS_VIEW
    except duckdb.InvalidInputException:  # DuckDB refuses to register a dataset without columns
        if query.open_output(output, storage_options).schema.names:
            raise
    con = duckdb.connect()
    con.register("_report_no_rows", OUTPUT_SCHEMA.empty_table())
    return con, "_report_no_rows"


def _count(con: duckdb.DuckDBPyConnection, sql: str) -> int:
    return int(con.sql(sql).fetchall()[0][0])


def _select(con: duckdb.DuckDBPyConnection, rows_view: str, options: ReportOptions) -> None:
    """The views of the matching rows and of the items shown, with the page each is on."""
    conditions = []
    if options.tasks:
        conditions.append(f"{_ident(TASK_COLUMN)} IN ({', '.join(map(_literal, options.tasks))})")
    if options.errors_only:
        conditions.append(f"{_ident(ERROR_COLUMN)} IS NOT NULL")
    if options.where:
        conditions.append(f"({options.where})")
    where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
    try:
        con.sql(f"CREATE TEMP VIEW {_MATCHED} AS SELECT * FROM {rows_view}{where}")
        con.sql(f"SELECT 1 FROM {_MATCHED} LIMIT 0").fetchall()  # a bad --where fails here, in one line
    except duckdb.Error as error:
        raise ValueError(f"--where {options.where!r}: {' '.join(str(error).split())}") from None
    limit = f" LIMIT {int(options.limit)}" if options.limit else ""
    item = _ident(ID_COLUMN)
    con.sql(f"CREATE TEMP TABLE {_SHOWN} AS SELECT {item}, "
            f"(row_number() OVER (ORDER BY {item}) - 1) // {int(options.page_size)} + 1 AS {_PAGE_COLUMN} "
            f"FROM (SELECT DISTINCT {item} FROM {_MATCHED} ORDER BY 1{limit})")
    # the rows of the items shown, read from the output once (a page's rows are then looked up here)
    con.sql(f"CREATE TEMP TABLE {_SHOWN_ROWS} AS SELECT m.*, s.{_PAGE_COLUMN} FROM {_MATCHED} m "
            f"JOIN {_SHOWN} s USING ({item})")


def _all_tasks(con: duckdb.DuckDBPyConnection) -> list[str]:
    return [str(row[0]) for row in con.sql(f"SELECT DISTINCT {_ident(TASK_COLUMN)} FROM {_MATCHED} "
                                           "ORDER BY 1").fetchall()]


def _run_settings(output: str, options: ReportOptions) -> dict[str, Any]:
    """How the last run read its input (`media_keys`, `max_item_bytes`, `max_pixels`), so that the pictures are
    of what it annotated; unset where no record says (settings given in `options.thumbnail` are kept)."""
    records = read_records(output, options.storage_options)
    settings = (records[-1].get("settings") or {}) if records else {}
    defaults, chosen = ThumbnailConfig(), options.thumbnail
    found: dict[str, Any] = {}
    if chosen.media_keys is None and settings.get("media_keys"):
        found["media_keys"] = tuple(settings["media_keys"])
    for name in ("max_item_bytes", "max_pixels"):
        if getattr(chosen, name) == getattr(defaults, name) and isinstance(settings.get(name), int):
            found[name] = settings[name]
    return found


def _group(rows: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    items: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        items.setdefault(row[ID_COLUMN], []).append(row)
    return items


def _page_path(html_path: Path, page: int) -> Path:
    """FILE for page 1, FILE-2.html (FILE's own suffix, if any) for page 2, and so on."""
    return html_path if page == 1 else html_path.with_name(f"{html_path.stem}-{page}{html_path.suffix or '.html'}")


def _remove_stale_pages(html_path: Path, pages: int) -> None:
    """Pages beyond the last one, left by an earlier, longer report to the same FILE (only pages this command
    wrote: they carry its generator tag)."""
    page = pages + 1
    while (path := _page_path(html_path, page)).is_file():
        if GENERATOR not in path.read_text(encoding="utf-8", errors="replace")[:2000]:
            return
        path.unlink()
        page += 1


# --- HTML ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Context:
    """What every page of one report shows alike."""

    output: str
    options: ReportOptions
    tasks: list[str]        # every task among the matching rows (the task filter's choices)
    extra: list[str]        # kept input columns, shown with each item
    matched_items: int      # items with a matching row, shown or not (--limit)
    page_names: list[str]   # file names of the pages, in order (links are relative: the folder can move)


def render_page(context: _Context, page: int, items: Mapping[str, list[dict[str, Any]]],
                pictures: Mapping[str, Thumbnail], first_item: int) -> str:
    """One page of the report: header, filters, one card per item, prev / next links."""
    options = context.options
    filters = _filters_text(options)
    shown = min(context.matched_items, options.limit or context.matched_items)
    if items:
        where = (f"items {first_item}-{first_item + len(items) - 1} of {shown}" +
                 (f" (of {context.matched_items} matching; --limit {options.limit})"
                  if shown < context.matched_items else ""))
        body = "\n".join(_item_html(item_id, rows, pictures[item_id], context.extra) for item_id, rows in items.items())
    else:
        where = "no items"
        body = (f'<p class="empty">No rows in {_e(context.output)}'
                f'{" match " + _e(filters) if filters else ""}.</p>')
    pages = len(context.page_names)
    title = f"{context.output}: annotations, page {page} of {pages}"
    return _PAGE.format(
        title=_e(title), generator=GENERATOR, output=_e(context.output),
        summary=_e(f"{where}; page {page} of {pages}" + (f"; built with {filters}" if filters else "")),
        nav=_nav(context.page_names, page), task_options="".join(
            f'<option value="{_e(task)}">{_e(task)}</option>' for task in context.tasks),
        items=body, style=_STYLE, script=_SCRIPT)


def _filters_text(options: ReportOptions) -> str:
    parts = [f"--task {shlex.quote(task)}" for task in options.tasks]
    parts += ["--errors-only"] if options.errors_only else []
    parts += [f"--where {shlex.quote(options.where)}"] if options.where else []
    return " ".join(parts)


def _nav(names: Sequence[str], page: int) -> str:
    links = []
    if page > 1:
        links.append(f'<a rel="prev" href="{_e(quote(names[page - 2]))}">&larr; prev</a>')
    links.append(f'<span class="page">page {page} of {len(names)}</span>')
    if page < len(names):
        links.append(f'<a rel="next" href="{_e(quote(names[page]))}">next &rarr;</a>')
    return '<nav class="pages">' + " ".join(links) + "</nav>"


def _item_html(item_id: str, rows: list[dict[str, Any]], picture: Thumbnail, extra: Sequence[str]) -> str:
    if picture.jpeg is not None:
        kind = "video" if picture.frames > 1 else "image"
        data = base64.b64encode(picture.jpeg).decode("ascii")
        figure = (f'<img src="data:image/jpeg;base64,{data}" alt="{kind}: {_e(_short(item_id))}" '
                  f'class="{kind}" decoding="async">')
    else:
        figure = f'<div class="placeholder" role="img">{_e(picture.problem or "no picture")}</div>'
    metadata = {name: rows[0].get(name) for name in extra}
    meta = "".join(f"<dt>{_e(name)}</dt><dd>{_e(str(value))}</dd>" for name, value in metadata.items()
                   if value is not None)
    status = "error" if any(row[ERROR_COLUMN] is not None for row in rows) else "ok"
    return (f'<article class="item {status}" data-id="{_e(item_id)}">\n'
            f'<figure>{figure}<figcaption title="{_e(item_id)}">{_e(_short(item_id))}</figcaption></figure>\n'
            + (f'<dl class="meta">{meta}</dl>\n' if meta else "")
            + "\n".join(_row_html(row) for row in rows) + "\n</article>")


def _row_html(row: Mapping[str, Any]) -> str:
    task, error = str(row[TASK_COLUMN]), row[ERROR_COLUMN]
    details = ", ".join(f"{name} {row[name]}" for name in ("model", "run_id") if row.get(name))
    if error is not None:
        text = error
        content = (f'<p class="error"><span class="kind">{_e(str(row.get(ERROR_KIND_COLUMN) or "error"))}</span> '
                   f"{_e(error)}</p>")
    else:
        text = str(row[ANNOTATION_COLUMN] or "")
        score = row.get("score")
        labels = _label_scores_html(row.get("label_scores"), text)  # the chosen label's score is among them
        content = (f'<p class="annotation">{_e(text)}</p>'
                   + (f'<p class="score">score {score:.3f}</p>' if isinstance(score, float) and not labels else "")
                   + labels)
    status = "error" if error is not None else "ok"
    return (f'<section class="row {status}" data-task="{_e(task)}" data-status="{status}" '
            f'data-text="{_e(text.lower())}" title="{_e(details)}">'
            f"<h3>{_e(task)}</h3>{content}</section>")


def _label_scores_html(scores: Sequence[Mapping[str, Any]] | None, chosen: str) -> str:
    """The candidate labels side by side, a row for their score and one for each further field the output has
    a value of (the calibrated score of a task with `calibrate: true`, ...); the chosen label's column marked."""
    if not scores:
        return ""
    fields = [name for name in scores[0] if name != "label" and any(entry.get(name) is not None for entry in scores)]
    marks = [' class="chosen"' if entry.get("label") == chosen else "" for entry in scores]
    head = "<tr><th>label</th>" + "".join(f"<th{mark}>{_e(str(entry.get('label')))}</th>"
                                          for entry, mark in zip(scores, marks)) + "</tr>"
    body = "".join(f"<tr><th>{_e(name)}</th>" + "".join(f"<td{mark}>{_number(entry.get(name))}</td>"
                                                        for entry, mark in zip(scores, marks)) + "</tr>"
                   for name in fields)
    return f'<div class="scroll"><table class="label-scores">{head}{body}</table></div>'


def _number(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else _e("" if value is None else str(value))


def _short(item_id: str) -> str:
    """The part of an id worth reading at a glance: the file name, and the key inside a shard."""
    return item_id.rsplit("/", 1)[-1]


def _e(text: str) -> str:
    return html.escape(text, quote=True)


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;background:#f4f4f5;color:#18181b}
header{position:sticky;top:0;background:#fff;border-bottom:1px solid #ddd;padding:8px 16px;z-index:1}
h1{font-size:16px;margin:0 0 4px;word-break:break-all}
.summary{margin:0 0 6px;color:#555}
form{display:flex;gap:8px;flex-wrap:wrap;align-items:center}
nav.pages{margin:6px 0}nav.pages a{margin:0 6px}
main{display:grid;grid-template-columns:repeat(auto-fill,minmax(230px,1fr));gap:12px;padding:12px 16px}
article{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px;overflow:hidden}
article.error{border-color:#e4a5a5}
figure{margin:0 0 6px}figure img{width:100%;height:150px;object-fit:contain;background:#e4e4e7}
figcaption{font-size:12px;color:#555;word-break:break-all}
.placeholder{height:150px;box-sizing:border-box;display:flex;align-items:center;justify-content:center;text-align:center;
background:#eee;color:#a33;font-size:12px;padding:8px;word-break:break-word}
dl.meta{font-size:12px;margin:0 0 6px;display:grid;grid-template-columns:auto 1fr;gap:0 6px}
dl.meta dt{color:#777}dl.meta dd{margin:0;word-break:break-all}
section.row{border-top:1px solid #eee;padding-top:4px;margin-top:4px}
h3{font-size:12px;text-transform:uppercase;letter-spacing:.04em;color:#666;margin:0}
.annotation{margin:2px 0;font-size:15px}.score{margin:0;font-size:12px;color:#777}
p.error{color:#a33;margin:2px 0;word-break:break-word}
.kind{background:#a33;color:#fff;border-radius:3px;padding:0 4px;font-size:11px}
.scroll{overflow-x:auto}
table.label-scores{font-size:12px;border-collapse:collapse;margin-top:2px;color:#555}
table.label-scores td,table.label-scores th{padding:0 8px 0 0;text-align:left;font-weight:normal;white-space:nowrap}
table.label-scores tr>th:first-child{color:#999}
table.label-scores .chosen{font-weight:bold;color:#18181b}
.empty{padding:24px;font-size:16px}
[hidden]{display:none!important}
"""

# The filters: rows hidden by task / status / text, an item hidden when none of its rows is left; the choice
# lives in the address, and the prev / next links carry it along.
_SCRIPT = """
(function () {
  var task = document.getElementById("filter-task"), status = document.getElementById("filter-status"),
      text = document.getElementById("filter-text"), count = document.getElementById("shown");
  function apply() {
    var t = task.value, s = status.value, q = text.value.trim().toLowerCase(), n = 0;
    document.querySelectorAll("article.item").forEach(function (item) {
      var any = false;
      item.querySelectorAll("section.row").forEach(function (row) {
        var keep = (!t || row.dataset.task === t) && (!s || row.dataset.status === s) &&
                   (!q || row.dataset.text.indexOf(q) !== -1);
        row.hidden = !keep;
        any = any || keep;
      });
      item.hidden = !any;
      if (any) n++;
    });
    count.textContent = n + " items on this page shown";
    var state = new URLSearchParams();
    if (t) state.set("task", t);
    if (s) state.set("status", s);
    if (q) state.set("q", q);
    var hash = state.toString() ? "#" + state.toString() : "";
    document.querySelectorAll("nav.pages a").forEach(function (a) {
      a.setAttribute("href", a.getAttribute("href").split("#")[0] + hash);
    });
    try { history.replaceState(null, "", hash || location.pathname); } catch (e) { /* some file:// pages */ }
  }
  var saved = new URLSearchParams(location.hash.slice(1));
  task.value = saved.get("task") || "";
  status.value = saved.get("status") || "";
  text.value = saved.get("q") || "";
  [task, status, text].forEach(function (el) { el.addEventListener("input", apply); });
  apply();
})();
"""

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="generator" content="{generator}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>{style}</style>
</head>
<body>
<header>
<h1>{output}</h1>
<p class="summary">{summary}</p>
<form id="filters" onsubmit="return false">
<label>task <select id="filter-task"><option value="">all tasks</option>{task_options}</select></label>
<label>rows <select id="filter-status"><option value="">ok and errors</option><option value="ok">ok</option>
<option value="error">errors</option></select></label>
<label>text <input id="filter-text" type="search" placeholder="annotation or error contains"></label>
<span id="shown"></span>
</form>
{nav}
</header>
<main>
{items}
</main>
<footer>{nav}</footer>
<script>{script}</script>
</body>
</html>
"""
