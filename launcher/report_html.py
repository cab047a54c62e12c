"""``report.html``: the chain's ``report.md`` as one self-contained page, with the training loss curves drawn.

A run directory is usually read from a login node or a laptop that copied it: one HTML file with no
external assets (the curves are inline SVG from matplotlib, the styles inline) opens anywhere. The tables
are the Markdown report's own, converted with Python-Markdown; each curve comes from a stage's
``metrics.jsonl`` and is placed right after that stage's heading.
"""
from __future__ import annotations

import html
import io
import json
from pathlib import Path

from puyu.launcher.atomic import atomic_write_text

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: .6em 0; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; } th { background: #f3f3f3; }
td:not(:first-child) { text-align: right; } code { background: #f5f5f5; padding: 0 3px; }
h2 { border-bottom: 2px solid #ddd; margin-top: 1.8em; } figure { margin: .5em 0; }
"""


def loss_curve_svg(metrics: Path, title: str) -> str:
    """An inline SVG of ``loss`` (and ``lr`` on a second axis) against ``step``; "" without records."""
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] if metrics.is_file() else []
    if not records:
        return ""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(6.4, 2.6))
    ax.plot(steps, [r["loss"] for r in records], color="#1f77b4", label="loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize=10)
    if all("lr" in r for r in records):
        lr = ax.twinx()
        lr.plot(steps, [r["lr"] for r in records], color="#aaaaaa", linewidth=1)
        lr.set_ylabel("lr", color="#888888")
    fig.tight_layout()
    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Date": None})
    plt.close(fig)
    svg = buf.getvalue()
    return svg[svg.index("<svg"):]  # drop the XML prologue: the SVG sits inside HTML


def write_report_html(markdown_text: str, path: Path, curves: dict[str, tuple[Path, str]]) -> Path:
    """Write ``markdown_text`` as HTML to ``path``; ``curves`` maps a level-2 heading's text to the
    (metrics.jsonl, title) whose loss curve follows that heading."""
    import markdown

    md = markdown.Markdown(extensions=["tables", "fenced_code"])
    # Raw HTML in the report (model outputs, file names) is text, never markup: drop Markdown's HTML passes.
    md.preprocessors.deregister("html_block")
    md.inlinePatterns.deregister("html")
    body = md.convert(markdown_text)
    for heading, (metrics, title) in curves.items():
        svg = loss_curve_svg(metrics, title)
        tag = f"<h2>{html.escape(heading)}</h2>"
        if svg and tag in body:
            body = body.replace(tag, f"{tag}\n<figure>{svg}</figure>", 1)
    page = (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>puyu report</title>"
            f"<style>{STYLE}</style></head><body>\n{body}\n</body></html>\n")
    atomic_write_text(path, page)
    return path
