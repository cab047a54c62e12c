"""report.html: the Markdown report as one self-contained page with the loss curves after their headings."""
from __future__ import annotations

import json
import re

from puyu.launcher.report_html import write_report_html


def test_report_html_has_the_tables_and_a_curve_after_each_heading_with_metrics(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": i, "loss": 6 - 0.1 * i, "lr": 1e-3}) + "\n" for i in range(1, 30)))
    report = ("# puyu pipeline report\n\n## Pretraining\n\n| step | loss |\n|---:|---:|\n| 1 | 5.9000 |\n\n"
              "## Finetuning\n\nno metrics here <script>\n")
    page = write_report_html(report, tmp_path / "report.html",
                             {"Pretraining": (metrics, "pretraining loss"),
                              "Finetuning": (tmp_path / "missing.jsonl", "finetuning loss")}).read_text()
    assert page.startswith("<!DOCTYPE html>") and "<table>" in page and "5.9000</td>" in page
    pretraining, finetuning = page.split("<h2>Finetuning</h2>")
    assert pretraining.count("<svg") == 1 and pretraining.index("<h2>Pretraining</h2>") < pretraining.index("<svg")
    assert "<svg" not in finetuning  # no metrics, no empty plot
    assert "<script>" not in page and "&lt;script&gt;" in page  # report text is escaped, never markup
    assert not re.search(r'(src|href)="https?://', page) and "<link" not in page  # self-contained
