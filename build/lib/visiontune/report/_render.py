"""Render report blocks to Markdown (images linked) and to self-contained HTML (images inlined as base64)."""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

from visiontune.report._content import Block, Code, Facts, Heading, Image, Inline, Paragraph, Table

# Characters that would start Markdown/HTML syntax inside user strings (class names, reasons). "_" is left alone:
# it is common in class names and CommonMark does not treat intra-word underscores as emphasis.
_MD_SPECIAL = re.compile(r"([\\`*\[\]<>|#])")

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 960px; margin: 2rem auto;
       padding: 0 1rem; color: #1f2328; line-height: 1.5; }
h1 { border-bottom: 1px solid #d0d7de; padding-bottom: .3rem; }
h2 { margin-top: 2rem; border-bottom: 1px solid #eaeef2; padding-bottom: .2rem; }
table { border-collapse: collapse; margin: .5rem 0 1rem; }
th, td { border: 1px solid #d0d7de; padding: .25rem .6rem; }
th { background: #f6f8fa; }
td.r, th.r { text-align: right; font-variant-numeric: tabular-nums; }
code { background: #f6f8fa; padding: .1rem .3rem; border-radius: 4px; font-size: 90%; }
img { max-width: 100%; height: auto; display: block; margin: .5rem 0 1rem; }
ul.facts { list-style: none; padding-left: 0; }
""".strip()


def md_escape(text: str) -> str:
    return _MD_SPECIAL.sub(r"\\\1", " ".join(text.splitlines()))


def _md_inline(value: Inline) -> str:
    if isinstance(value, Code):
        text = " ".join(value.text.splitlines()).replace("|", "\\|")  # a bare | would end a table cell
        return f"`` {text} ``" if "`" in text else f"`{text}`"
    return md_escape(value)


def _md_block(block: Block) -> str:
    if isinstance(block, Heading):
        return f"{'#' * block.level} {md_escape(block.text)}"
    if isinstance(block, Paragraph):
        return md_escape(block.text)
    if isinstance(block, Facts):
        return "\n".join(f"- **{md_escape(key)}:** {_md_inline(value)}" for key, value in block.items)
    if isinstance(block, Table):
        rule = ["---:" if a == "r" else "---" for a in block.align]
        lines = [block.header, rule, *([_md_inline(c) for c in row] for row in block.rows)]
        return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)
    if isinstance(block, Image):
        return f"![{md_escape(block.alt)}]({block.path})"
    raise TypeError(f"unknown report block {block!r}")


def to_markdown(blocks: list[Block]) -> str:
    return "\n\n".join(_md_block(b) for b in blocks) + "\n"


def _html_inline(value: Inline) -> str:
    if isinstance(value, Code):
        return f"<code>{html.escape(value.text)}</code>"
    return html.escape(value)


def _html_table(table: Table) -> str:
    def row(cells: list[str], tag: str) -> str:
        return (
            "<tr>"
            + "".join(f'<{tag} class="{a}">{c}</{tag}>' for a, c in zip(table.align, cells, strict=True))
            + "</tr>"
        )

    head = row([html.escape(h) for h in table.header], "th")
    body = "\n".join(row([_html_inline(c) for c in cells], "td") for cells in table.rows)
    return f"<table>\n<thead>{head}</thead>\n<tbody>\n{body}\n</tbody>\n</table>"


def _html_image(image: Image, run_dir: Path) -> str:
    # Inline the PNG so the HTML file can be mailed or uploaded on its own.
    data = base64.b64encode((run_dir / image.path).read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(image.alt)}" src="data:image/png;base64,{data}">'


def _html_block(block: Block, run_dir: Path) -> str:
    if isinstance(block, Heading):
        return f"<h{block.level}>{html.escape(block.text)}</h{block.level}>"
    if isinstance(block, Paragraph):
        return f"<p>{html.escape(block.text)}</p>"
    if isinstance(block, Facts):
        items = "".join(f"<li><strong>{html.escape(k)}:</strong> {_html_inline(v)}</li>" for k, v in block.items)
        return f'<ul class="facts">{items}</ul>'
    if isinstance(block, Table):
        return _html_table(block)
    if isinstance(block, Image):
        return _html_image(block, run_dir)
    raise TypeError(f"unknown report block {block!r}")


def to_html(blocks: list[Block], run_dir: Path) -> str:
    title = next((b.text for b in blocks if isinstance(b, Heading)), "Run report")
    body = "\n".join(_html_block(b, run_dir) for b in blocks)
    return (
        f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)}</title>\n<style>\n{CSS}\n</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n"
    )
