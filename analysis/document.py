"""A report as a list of blocks (headings, paragraphs, tables, images), rendered to Markdown and HTML.

Markdown links the plots as files beside it; HTML embeds them as base64 data URIs so that the
page is one self-contained file with no external resources.
"""
from __future__ import annotations

import base64
import html
import re
from pathlib import Path
from typing import NamedTuple


class Heading(NamedTuple):
    level: int
    text: str


class Para(NamedTuple):
    text: str  # may hold *italic*


class Table(NamedTuple):
    header: list[str]
    rows: list[list[str]]


class Image(NamedTuple):
    path: Path
    caption: str


def to_markdown(blocks: list) -> str:
    out = []
    for b in blocks:
        if isinstance(b, Heading):
            out.append(f"{'#' * b.level} {b.text}")
        elif isinstance(b, Para):
            out.append(b.text)
        elif isinstance(b, Table):
            cells = lambda row: "| " + " | ".join(str(c).replace("|", r"\|") for c in row) + " |"
            out.append("\n".join([cells(b.header), cells(["---"] * len(b.header)), *map(cells, b.rows)]))
        else:
            out.append(f"![{b.caption}]({b.path.name})")
    return "\n\n".join(out) + "\n"


def _inline_html(text: str) -> str:
    """Escaped text with Markdown's *italic* as <em>."""
    return re.sub(r"\*(.+?)\*", r"<em>\1</em>", html.escape(text))


_CSS = ("body{font-family:system-ui,sans-serif;max-width:62em;margin:2em auto;padding:0 1em;line-height:1.45;"
        "color:#222}table{border-collapse:collapse;margin:1em 0;font-size:.9em}th,td{border:1px solid #ccc;"
        "padding:.25em .6em;text-align:left}th{background:#f3f3f3}td.n{text-align:right;"
        "font-variant-numeric:tabular-nums}figure{margin:1em 0}img{max-width:100%}"
        "figcaption{font-size:.85em;color:#555}")
# a number, or a mean ± std over seeds, with its [lo, hi] from 3 seeds on
_NUMERIC = re.compile(r"^[−+-]?\d+(\.\d+)?%?( ± \d+(\.\d+)?( \[[−+-]?\d+(\.\d+)?, [−+-]?\d+(\.\d+)?\])?)?$")
_NUM_CLASS = ' class="n"'  # numbers are right-aligned


def to_html(blocks: list, title: str) -> str:
    body = []
    for b in blocks:
        if isinstance(b, Heading):
            body.append(f"<h{b.level}>{_inline_html(b.text)}</h{b.level}>")
        elif isinstance(b, Para):
            body.append(f"<p>{_inline_html(b.text)}</p>")
        elif isinstance(b, Table):
            head = "".join(f"<th>{_inline_html(h)}</th>" for h in b.header)
            cell = lambda c: f"<td{_NUM_CLASS if _NUMERIC.match(str(c)) else ''}>{_inline_html(str(c))}</td>"
            rows = "".join("<tr>" + "".join(map(cell, row)) + "</tr>" for row in b.rows)
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        else:
            data = base64.b64encode(b.path.read_bytes()).decode("ascii")
            body.append(f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(b.caption)}">'
                        f"<figcaption>{html.escape(b.caption)}</figcaption></figure>")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
