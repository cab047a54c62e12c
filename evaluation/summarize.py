"""The summarizer: one report comparing models, from the cached predictions of every task.

Written to the ``eval_summary`` stage folder:
- ``report.md`` and ``report.csv``: one row per (dataset, metric), one column per model, OpenCompass's
  layout; CircularEval's ``acc_origin``/``acc_circular``/``perf_circular`` rows sit side by side;
- ``report.html``: the same table, a plot (primary metric per dataset per model, and circular vs origin
  accuracy for multiple choice) embedded as PNG, and the first items of each dataset for inspection;
- ``details/<model>/<dataset>.jsonl``: every prediction record, in item order.
The report holds nothing run-specific (no paths, times or task counts), so the same predictions give the
same bytes: a rerun that reuses finished tasks can be checked against the original.
"""
from __future__ import annotations

import base64
import csv
import html
import io
import json
from pathlib import Path

from puyu.evaluation.config import EvalJobConfig
from puyu.evaluation.job import read_predictions
from puyu.evaluation.partition import ModelSpec, TaskSpec
from puyu.launcher.atomic import atomic_open, atomic_write_text

MODE = {"mc": "ppl", "gen": "gen", "code": "gen", "bpb": "ppl"}
# the metric each kind is plotted by (first present wins)
PRIMARY = {"mc": ["acc_circular", "acc"], "gen": ["accuracy", "acc"], "code": ["pass@1"], "bpb": []}
CIRCULAR = ("acc_origin", "acc_circular", "perf_circular")
DETAIL_ITEMS = 20


def collect(plan: list[TaskSpec], run_dir: Path) -> dict[tuple[str, str], list[dict]]:
    """(model, dataset) -> prediction records in item order (tasks are planned in range order)."""
    records: dict[tuple[str, str], list[dict]] = {}
    for spec in plan:
        path = spec.predictions(run_dir)
        if not path.is_file():
            raise FileNotFoundError(f"eval summary: predictions {path} missing (task {spec.key} did not finish)")
        records.setdefault((spec.model.name, spec.dataset), []).extend(read_predictions(path))
    return records


def score_all(plan: list[TaskSpec], records: dict) -> dict[str, dict[str, dict[str, float]]]:
    """dataset -> model -> metric -> value."""
    from puyu.evaluation.metrics import score

    kinds = {spec.dataset: spec.kind for spec in plan}
    table: dict[str, dict[str, dict[str, float]]] = {}
    for (model, dataset), recs in records.items():
        table.setdefault(dataset, {})[model] = score(kinds[dataset], recs)
    return table


def _rows(table: dict, kinds: dict[str, str], datasets: list[str], models: list[str]) -> list[list[str]]:
    rows = []
    for ds in datasets:
        per_model = table.get(ds, {})
        metrics = sorted({m for scores in per_model.values() for m in scores},
                         key=lambda m: (m not in CIRCULAR, CIRCULAR.index(m) if m in CIRCULAR else 0, m))
        for metric in metrics:
            values = [per_model.get(model, {}).get(metric) for model in models]
            rows.append([ds, metric, MODE[kinds[ds]]] + ["-" if v is None else f"{v:.2f}" for v in values])
    return rows


def _plot_png(table: dict, kinds: dict[str, str], datasets: list[str], models: list[str]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    primary = [(ds, next((m for m in PRIMARY[kinds[ds]] if any(m in table[ds][x] for x in models)), None))
               for ds in datasets]
    primary = [(ds, m) for ds, m in primary if m]
    mc = [ds for ds in datasets if kinds[ds] == "mc" and all("acc_origin" in table[ds][x] for x in models)]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / max(1, len(models))
    for ax, groups, title in ((axes[0], primary, "primary metric per dataset"),
                              (axes[1], [(ds, m) for ds in mc for m in ("acc_origin", "acc_circular")],
                               "CircularEval: origin vs circular accuracy")):
        for j, model in enumerate(models):
            xs = [i + j * width for i in range(len(groups))]
            ax.bar(xs, [table[ds][model].get(m, 0.0) for ds, m in groups], width, label=model)
        ax.set_xticks([i + width * (len(models) - 1) / 2 for i in range(len(groups))])
        ax.set_xticklabels([f"{ds}\n{m}" for ds, m in groups], fontsize=8)
        ax.set_ylim(0, 100)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def _html(header: list[str], rows: list[list[str]], png: bytes, records: dict, models: list[str],
          datasets: list[str]) -> str:
    esc = html.escape
    out = ["<!doctype html><html><head><meta charset='utf-8'><title>puyu evaluation report</title>",
           "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
           "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}td.n{text-align:right}"
           "pre{white-space:pre-wrap;max-width:60em;margin:0}</style></head><body>",
           "<h1>puyu evaluation report</h1><table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>"]
    for r in rows:
        out.append("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r[:3])
                   + "".join(f"<td class='n'>{esc(c)}</td>" for c in r[3:]) + "</tr>")
    out.append(f"</table><h2>Plot</h2><img alt='accuracy per dataset per model' "
               f"src='data:image/png;base64,{base64.b64encode(png).decode()}'>")
    out.append(f"<h2>Items (first {DETAIL_ITEMS} per dataset and model; all in details/)</h2>")
    for ds in datasets:
        for model in models:
            recs = records.get((model, ds), [])[:DETAIL_ITEMS]
            out.append(f"<details><summary>{esc(ds)} — {esc(model)}</summary><table>")
            out += [f"<tr><td><pre>{esc(json.dumps(r, ensure_ascii=False, sort_keys=True)[:2000])}</pre></td></tr>"
                    for r in recs]
            out.append("</table></details>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def write_report(cfg: EvalJobConfig, plan: list[TaskSpec], models: list[ModelSpec], run_dir: Path,
                 out_dir: Path) -> dict:
    records = collect(plan, run_dir)
    table = score_all(plan, records)
    kinds = {spec.dataset: spec.kind for spec in plan}
    names = [m.name for m in models]
    datasets = [ds for ds in cfg.datasets if ds in table]
    header = ["dataset", "metric", "mode"] + names
    rows = _rows(table, kinds, datasets, names)
    md = ["# puyu evaluation report", "",
          f"Models: {', '.join(names)}. Datasets: {', '.join(f'{ds} ({len(records[(names[0], ds)])} records)' for ds in datasets)}. "
          f"CircularEval: {cfg.infer.circular}.", "",
          "| " + " | ".join(header) + " |", "|" + "---|" * 3 + "---:|" * len(names)]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    md += ["", "Files: `report.csv`, `report.html` (plot and items), `details/<model>/<dataset>.jsonl`."]
    for (model, ds), recs in records.items():
        with atomic_open(out_dir / "details" / model / f"{ds}.jsonl", "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in recs)
    with atomic_open(out_dir / "report.csv", "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    atomic_write_text(out_dir / "report.html", _html(header, rows, _plot_png(table, kinds, datasets, names),
                                                     records, names, datasets))
    report = out_dir / "report.md"
    atomic_write_text(report, "\n".join(md) + "\n")
    return {"report": str(report), "scores": table}
