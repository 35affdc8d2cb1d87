"""Markdown and self-contained HTML from a list of report sections."""

from __future__ import annotations

import base64
import html
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.artifacts import atomic_path


def _fmt(v, col: str) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return ""
    if isinstance(v, float):
        if "seconds" in col:
            return f"{v:,.1f}"
        if col.endswith("_pt"):
            return f"{v:+.1f}"
        if col == "time_ratio":
            return f"{v:,.1f}"
        return f"{v:.4f}"
    return str(v)


def md_table(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in df.iterrows():
        lines.append("| " + " | ".join(_fmt(r[c], c).replace("|", "\\|") for c in cols) + " |")
    return "\n".join(lines)


def html_table(df: pd.DataFrame) -> str:
    css = df.attrs.get("css")
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(r[c], c))}</td>" for c in df.columns) + "</tr>"
        for _, r in df.iterrows()
    )
    cls = f" class='{css}'" if css else ""
    return f"<table{cls}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


class Verdict(list):
    """Sentences shown first and highlighted."""


def render(sections: list[tuple[str, object]], title: str, out_dir: Path) -> None:
    """sections: (heading, content) where content is a Verdict, str (markdown/plain), DataFrame (with
    ``attrs["css"]`` naming a table class, optionally), or Path (image)."""
    md = [f"# {title}", ""]
    ht = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
        "body{font-family:system-ui,sans-serif;max-width:1180px;margin:1.5em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;font-size:13px;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 6px;"
        "text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}"
        "table.main td,table.main th{white-space:nowrap}table.main td:nth-child(2){text-align:left}"
        "table.main td:nth-child(5){font-weight:600}table.details{font-size:12px}"
        "table.details td:last-child{text-align:left;max-width:420px}"
        ".verdict{background:#eef5ff;border-left:4px solid #3b7dd8;padding:.4em 1em;margin:1em 0}"
        ".verdict p{margin:.5em 0}"
        "img{max-width:100%}pre{background:#f6f6f6;padding:1em;overflow:auto;font-size:12px}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    for heading, content in sections:
        if heading:
            md += [f"## {heading}", ""]
            ht.append(f"<h2>{html.escape(heading)}</h2>")
        if isinstance(content, Verdict):
            md += ["> " + line + "\n>" for line in content] + [""]
            ht.append("<div class='verdict'>" + "".join(f"<p>{html.escape(x)}</p>" for x in content) + "</div>")
        elif isinstance(content, pd.DataFrame):
            md += [md_table(content), ""]
            ht.append(html_table(content))
        elif isinstance(content, Path):
            md += [f"![{heading}]({content.name})", ""]
            data = base64.b64encode(content.read_bytes()).decode()
            ht.append(f"<img alt='{html.escape(heading)}' src='data:image/png;base64,{data}'>")
        elif isinstance(content, str) and content.startswith("```"):
            md += [content, ""]
            ht.append(f"<pre>{html.escape(content.strip('`').strip())}</pre>")
        else:
            md += [str(content), ""]
            ht.append(f"<p>{html.escape(str(content))}</p>")
    ht.append("</body></html>")
    for name, lines in (("report.md", md), ("report.html", ht)):
        with atomic_path(out_dir / name) as tmp:
            tmp.write_text("\n".join(lines) + "\n")
