"""A :class:`Report` as one self-contained HTML page (plots as embedded base64 PNGs, inline CSS, nothing
external) and as markdown (plots behind relative links, tables as markdown tables)."""

from __future__ import annotations

import base64
import html
import re

from orchestrator.report.model import Plot, Report, Table

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d2129;background:#f6f7f9}
main{max-width:1280px;margin:0 auto;padding:24px 32px 64px}
h1{font-size:1.7em;margin:0 0 4px}h2{border-bottom:2px solid #d8dce3;padding-bottom:4px;margin-top:40px}
h3{font-size:1.05em;margin:24px 0 8px}.meta{color:#5f6673;margin:0 0 16px}
nav a{margin-right:14px;color:#2457a6;text-decoration:none}
figure{margin:12px 0;background:#fff;border:1px solid #e1e4ea;border-radius:6px;padding:12px}
figure img{max-width:100%;height:auto;display:block;margin:0 auto}
figcaption,.caption{color:#5f6673;font-size:.9em;margin-top:6px}
.table{display:inline-block;max-width:100%;overflow-x:auto;background:#fff;border:1px solid #e1e4ea;
border-radius:6px;vertical-align:top}
table{border-collapse:collapse;font-size:.88em}
th,td{padding:5px 10px;border-bottom:1px solid #eceef2;text-align:left;white-space:nowrap}
th{background:#eef1f5;white-space:normal;vertical-align:bottom;min-width:3em}
.num{text-align:right;font-variant-numeric:tabular-nums}
tbody tr:nth-child(even){background:#fafbfc}
pre{background:#fff;border:1px solid #e1e4ea;border-radius:6px;padding:12px;overflow-x:auto;
font:13px/1.45 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace}
"""


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def numeric_columns(table: Table) -> list[bool]:
    """Columns whose cells are all numbers (or ``-``, missing): right-aligned."""
    return [any(_is_number(r[i]) for r in table.rows) and all(_is_number(r[i]) or r[i] == "-" for r in table.rows)
            for i in range(len(table.columns))]


def anchor(title: str) -> str:
    """A title as an HTML id and file-name stem: lower case, runs of other characters as one ``-``."""
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-") or "section"


def render_html(report: Report, generated: str) -> str:
    """The report as one HTML page; ``generated`` is the time shown under the title."""
    esc = html.escape
    out = ["<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>{esc(report.title)}</title><style>{CSS}</style></head><body><main>",
           f"<h1>{esc(report.title)}</h1>",
           f'<p class="meta">{esc(str(report.source.resolve()))} &middot; generated {esc(generated)}</p>',
           "<nav>" + "".join(f'<a href="#{anchor(s.title)}">{esc(s.title)}</a>' for s in report.sections) + "</nav>"]
    for section in report.sections:
        out.append(f'<section id="{anchor(section.title)}"><h2>{esc(section.title)}</h2>')
        for item in section.items:
            out.append(f"<h3>{esc(item.title)}</h3>" if item.title else "")
            if isinstance(item, Plot):
                data = base64.b64encode(item.png).decode("ascii")
                caption = f"<figcaption>{esc(item.caption)}</figcaption>" if item.caption else ""
                out.append(f'<figure><img src="data:image/png;base64,{data}" alt="{esc(item.title)}">'
                           f"{caption}</figure>")
            elif isinstance(item, Table):
                align = [' class="num"' if numeric else "" for numeric in numeric_columns(item)]
                head = "".join(f"<th{a}>{esc(c)}</th>" for a, c in zip(align, item.columns))
                body = "".join("<tr>" + "".join(f"<td{a}>{esc(c)}</td>" for a, c in zip(align, row)) + "</tr>"
                               for row in item.rows)
                out.append(f'<div class="table"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody>'
                           "</table></div>")
                if item.caption:
                    out.append(f'<p class="caption">{esc(item.caption)}</p>')
            elif item.code:
                out.append(f"<pre>{esc(item.text)}</pre>")
            else:
                out.append(f'<p class="caption">{esc(item.text)}</p>')
        out.append("</section>")
    out.append("</main></body></html>")
    return "\n".join(out) + "\n"


def _md_cell(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def render_markdown(report: Report, generated: str, files: dict[int, str]) -> str:
    """``files`` maps ``id(plot)`` to its PNG's path relative to the report."""
    out = [f"# {report.title}", "", f"`{report.source.resolve()}`, generated {generated}", ""]
    for section in report.sections:
        out += [f"## {section.title}", ""]
        for item in section.items:
            out += [f"### {item.title}", ""] if item.title else []
            if isinstance(item, Plot):
                out += [f"![{item.title}]({files[id(item)]})", ""]
                out += [f"*{item.caption}*", ""] if item.caption else []
            elif isinstance(item, Table):
                out.append("| " + " | ".join(_md_cell(c) for c in item.columns) + " |")
                out.append("|" + "|".join("---:" if numeric else "---" for numeric in numeric_columns(item)) + "|")
                out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in item.rows]
                out += ["", f"*{item.caption}*"] if item.caption else []
                out.append("")
            elif item.code:
                out += ["```json", item.text, "```", ""]
            else:
                out += [item.text, ""]
    return "\n".join(out)
