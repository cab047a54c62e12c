"""The summarizer: one report comparing models, from the cached predictions of every task.

Written to the ``eval_summary`` stage folder:
- ``report.md`` and ``report.csv``: one row per (dataset, metric), one column per model, OpenCompass's
  layout; CircularEval's ``acc_origin``/``acc_circular``/``perf_circular`` rows sit side by side;
- ``report.html``: the same table, a plot (primary metric per dataset per model, and circular vs origin
  accuracy for multiple choice) embedded as PNG, and the first items of each dataset for inspection;
- ``report_groups.csv`` (and a section of ``report.md``/``report.html``): the primary metric per category and
  per subject of every dataset whose items have them (MMLU's 57 subjects in lm-eval's four categories,
  HellaSwag's two sources, custom datasets' subjects), each group scored over its own items, so a category
  is the micro average of its subjects as lm-eval's group scores are;
- ``details/<model>/<dataset>.jsonl``: every prediction record, in item order.
``report.md`` also says which sandbox protections each code dataset's programs ran under and which LLM judge
graded each judged dataset. The report holds nothing run-specific (no run paths, times or task counts; a
judge is named as configured), so the same predictions give the same bytes: a rerun that reuses finished
tasks can be checked against the original.
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


def group_rows(records: dict, kinds: dict[str, str], datasets: list[str], models: list[str]) -> list[list[str]]:
    """[dataset, "category"|"subject", group, items, metric, value per model] for every group of every dataset."""
    from puyu.evaluation.inferencers import GROUP_KEYS
    from puyu.evaluation.metrics import score

    rows = []
    for ds in datasets:
        for key in GROUP_KEYS:
            by_group: dict[str, dict[str, list[dict]]] = {}
            for model in models:
                for r in records.get((model, ds), []):
                    if key in r:
                        by_group.setdefault(r[key], {}).setdefault(model, []).append(r)
            for group in sorted(by_group):
                scores = {m: score(kinds[ds], recs) for m, recs in by_group[group].items()}
                metric = next((m for m in PRIMARY[kinds[ds]] if any(m in sc for sc in scores.values())), None)
                if metric is None:
                    continue
                items = max(len({r.get("origin_id", r["id"]) for r in recs}) for recs in by_group[group].values())
                rows.append([ds, key, group, str(items), metric]
                            + [f"{scores[m][metric]:.2f}" if m in scores else "-" for m in models])
    return rows


def sandbox_lines(records: dict, kinds: dict[str, str], datasets: list[str]) -> list[str]:
    """Which sandbox protections the programs of each code dataset ran under (they depend on what the
    kernel of the task's node allowed, so a score says what its programs could and could not touch)."""
    lines = []
    for ds in datasets:
        if kinds[ds] == "code":
            seen = sorted({r["sandbox"] for (_, d), recs in records.items() if d == ds for r in recs if r.get("sandbox")})
            lines.append(f"Sandbox ({ds}): {'; '.join(seen) or 'unknown (no program ran)'}.")
    return lines


def judge_lines(cfg: EvalJobConfig, datasets: list[str]) -> list[str]:
    """Who judged the open answers of each judged dataset (``judge_accuracy``)."""
    from puyu.evaluation.judge import judge_spec

    return [f"LLM judge ({ds}): {judge_spec(ds, cfg.judges[ds]).describe()}, greedy." for ds in datasets
            if ds in cfg.judges]


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


def _html_table(header: list[str], rows: list[list[str]], text_columns: int) -> list[str]:
    esc = html.escape
    out = ["<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>"]
    for r in rows:
        out.append("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r[:text_columns])
                   + "".join(f"<td class='n'>{esc(c)}</td>" for c in r[text_columns:]) + "</tr>")
    return out + ["</table>"]


def _html(header: list[str], rows: list[list[str]], png: bytes, records: dict, models: list[str],
          datasets: list[str], groups: tuple[list[str], list[list[str]]]) -> str:
    esc = html.escape
    out = ["<!doctype html><html><head><meta charset='utf-8'><title>puyu evaluation report</title>",
           "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
           "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}td.n{text-align:right}"
           "pre{white-space:pre-wrap;max-width:60em;margin:0}</style></head><body>",
           "<h1>puyu evaluation report</h1>"]
    out += _html_table(header, rows, 3)
    out.append(f"<h2>Plot</h2><img alt='accuracy per dataset per model' "
               f"src='data:image/png;base64,{base64.b64encode(png).decode()}'>")
    if groups[1]:
        out.append("<h2>Per category and subject</h2>")
        out += _html_table(*groups, 5)
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
          f"CircularEval: {cfg.infer.circular}.", *sandbox_lines(records, kinds, datasets),
          *judge_lines(cfg, datasets), "",
          "| " + " | ".join(header) + " |", "|" + "---|" * 3 + "---:|" * len(names)]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    groups = (["dataset", "by", "group", "items", "metric"] + names, group_rows(records, kinds, datasets, names))
    if groups[1]:
        md += ["", "## Per category and subject", "", "| " + " | ".join(groups[0]) + " |",
               "|" + "---|" * 3 + "---:|---|" + "---:|" * len(names)]
        md += ["| " + " | ".join(r) + " |" for r in groups[1]]
    md += ["", "Files: `report.csv`, `report_groups.csv`, `report.html` (plot, groups and items), "
               "`details/<model>/<dataset>.jsonl`."]
    for (model, ds), recs in records.items():
        with atomic_open(out_dir / "details" / model / f"{ds}.jsonl", "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in recs)
    with atomic_open(out_dir / "report.csv", "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    with atomic_open(out_dir / "report_groups.csv", "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(groups[0])
        writer.writerows(groups[1])
    atomic_write_text(out_dir / "report.html", _html(header, rows, _plot_png(table, kinds, datasets, names),
                                                     records, names, datasets, groups))
    report = out_dir / "report.md"
    atomic_write_text(report, "\n".join(md) + "\n")
    return {"report": str(report), "scores": table}
