"""Tables and a figure from a finished sweep, in the layout of the paper's Table II.

    rows = summarize(configs, predictions)           # one ReportRow per config, skipped ones included
    write_report(out_dir, rows, context)             # metrics.json, report.json, report.md, accuracy_vs_flops.png

Accuracy is EM and refined EM (adatoken.eval.metrics), with 95 % Wilson score intervals: the
binomial interval that stays inside [0, 1] and keeps its coverage at the few hundred questions and
the extreme accuracies a per-type column has. FLOPs are the analytic prefill FLOPs of each sample at
the token counts that actually entered each layer (adatoken.core.flops), averaged over samples. Latency is
the median over batches of the measured prefill time: wall-clock, so noisy on a shared CPU.
"""
from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from adatoken.core.artifacts import write_atomic, write_json_atomic, write_text_atomic
from adatoken.eval.metrics import SQA3D_TYPES, breakdown, score
from adatoken.eval.runner import SweepConfig

REPORT_FORMAT = "adatoken.eval.report/v1"
Z_95 = 1.959963984540054  # two-sided 95 % normal quantile
NGRAM_SHOWN = {"bleu_4": "BLEU-4", "rouge_l": "ROUGE-L", "meteor": "METEOR", "cider": "CIDEr"}


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (95 % by default)."""
    if n <= 0:
        raise ValueError(f"a Wilson interval needs at least one trial, got n={n}")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # min/max: at p = 0 or 1 rounding can put the near end a hair past p
    return (max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half)))


@dataclass
class Accuracy:
    n: int
    value: float | None
    ci95: tuple[float, float]

    @classmethod
    def of(cls, hits: Sequence[bool]) -> "Accuracy":
        n = len(hits)
        return cls(n, sum(hits) / n if n else None, wilson_interval(sum(hits), n))


@dataclass
class ReportRow:
    """One config's line of the table. Skipped configs carry only their reason."""

    key: str
    method: str
    retention: float | None          # requested mean spatial retention (None: unpruned)
    skipped: str | None = None
    em: Accuracy | None = None
    refined_em: Accuracy | None = None
    em_by_type: dict[str, Accuracy] = field(default_factory=dict)
    ngram: dict[str, float | None] = field(default_factory=dict)
    ngram_unavailable: dict[str, str] = field(default_factory=dict)  # metric -> why it is None
    measured_retention: float | None = None  # mean over samples of mean over layers of kept / input spatial
    final_keep: float | None = None          # mean over samples of kept at the last layer / input spatial
    prefill_flops: float | None = None       # mean per sample
    flops_ratio: float | None = None         # prefill_flops / that of `none`
    prefill_ms: float | None = None          # median over batches
    answer_s: float | None = None            # total generation time of all batches
    label: str = ""                          # the budget as printed: "0.4", "final 0.1" (SweepConfig.label)


def summarize(configs: Sequence[SweepConfig], predictions: dict[str, list[dict]], *, ngram: bool = False,
              style: str = "llava3d") -> tuple[list[ReportRow], dict]:
    """One ReportRow per config (in sweep order) and metrics.json's content: each config's full scores."""
    all_rows = [row for rows in predictions.values() for row in rows]
    types = _question_types(all_rows)
    report, metrics = [], {}
    for config in configs:
        if config.skipped is not None:
            report.append(ReportRow(config.key, config.method, config.retention, skipped=config.skipped,
                                    label=config.label))
            continue
        rows = predictions[config.key]
        scores = score([r["prediction"] for r in rows], [r["references"] for r in rows],
                       qtypes=[r["qtype"] for r in rows] if types else None,
                       question_ids=[r["question_id"] for r in rows], style=style, ngram=ngram)
        samples = scores.pop("samples")  # per-sample rows are in the predictions files already
        scores["by_type"] = breakdown(samples, types=types) if types else None  # in the table's column order
        metrics[config.key] = scores
        report.append(ReportRow(
            config.key, config.method, config.retention,
            em=Accuracy.of([s["em"] for s in samples]),
            refined_em=Accuracy.of([s["refined_em"] for s in samples]),
            em_by_type={t: Accuracy.of([s["em"] for s in samples if s["qtype"] == t]) for t in types},
            ngram={name: scores[name] for name in NGRAM_SHOWN} if ngram else {},
            ngram_unavailable={n: why for n, why in scores["unavailable"].items() if n in NGRAM_SHOWN} if ngram else {},
            measured_retention=_mean_retention(rows),
            final_keep=_final_keep(rows),
            prefill_flops=statistics.fmean(r["prefill_flops"] for r in rows),
            prefill_ms=_median_batch(rows, "batch_prefill_s", 1e3),
            answer_s=sum(_per_batch(rows, "batch_answer_s")),
            label=config.label,
        ))
    unpruned = next((r for r in report if r.method == "none" and r.prefill_flops), None)
    for row in report:
        if unpruned is not None and row.prefill_flops is not None:
            row.flops_ratio = row.prefill_flops / unpruned.prefill_flops
    return report, metrics


def _question_types(rows: list[dict]) -> list[str]:
    found = {r["qtype"] for r in rows if r["qtype"] is not None}
    # SQA3D tables show its six types in the reference evaluators' order; other sets sort theirs
    return list(SQA3D_TYPES) if found and found <= set(SQA3D_TYPES) else sorted(found)


def _mean_retention(rows: list[dict]) -> float | None:
    kept = [sum(r["spatial_in"]) / (len(r["spatial_in"]) * r["spatial_in"][0]) for r in rows if r["spatial_in"][0]]
    return statistics.fmean(kept) if kept else None


def _final_keep(rows: list[dict]) -> float | None:
    kept = [r["spatial_in"][-1] / r["spatial_in"][0] for r in rows if r["spatial_in"][0]]
    return statistics.fmean(kept) if kept else None


def _per_batch(rows: list[dict], name: str) -> list[float]:
    """One value per batch (every row of a batch carries it), leaving out batches where it was not measured."""
    values = {r["batch"]: r.get(name) for r in rows}
    return [v for v in values.values() if v is not None]


def _median_batch(rows: list[dict], name: str, scale: float) -> float | None:
    values = _per_batch(rows, name)
    return statistics.median(values) * scale if values else None


# --- writing ---------------------------------------------------------------------------------------
def write_report(out: str | Path, rows: list[ReportRow], metrics: dict, context: dict) -> list[Path]:
    """metrics.json, report.json, report.md and accuracy_vs_flops.png in `out`; returns their paths.

    context: what the run was (model, dataset, split, questions, command, batch size, ...), shown
    above the table and stored in report.json.
    """
    out = Path(out)
    paths = [out / "metrics.json", out / "report.json", out / "report.md", out / "accuracy_vs_flops.png"]
    write_json_atomic(paths[0], {"context": context, "configs": metrics})
    write_text_atomic(paths[1], json.dumps({"format": REPORT_FORMAT, "context": context,
                                      "rows": [asdict(r) for r in rows]}, indent=2) + "\n")
    write_text_atomic(paths[2], to_markdown(rows, context))
    title = (f"EM vs prefill FLOPs: {context.get('model', 'model')} on {context.get('dataset', 'dataset')} "
             f"(n={context.get('num_questions', '?')})")
    plot_accuracy_vs_flops(rows, paths[3], title)
    return paths


def _pct(acc: Accuracy | None, ci: bool = True) -> str:
    if acc is None or acc.value is None:
        return "–"
    text = f"{100 * acc.value:.1f}"
    return f"{text} [{100 * acc.ci95[0]:.1f}, {100 * acc.ci95[1]:.1f}]" if ci else text


def _num(value: float | None, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def _flops_unit(rows: list[ReportRow]) -> tuple[str, float]:
    largest = max((r.prefill_flops for r in rows if r.prefill_flops), default=0.0)
    return ("TFLOPs", 1e12) if largest >= 1e12 else ("GFLOPs", 1e9)


def to_markdown(rows: list[ReportRow], context: dict) -> str:
    unit, scale = _flops_unit(rows)
    ngram_names = [n for n in NGRAM_SHOWN if any(n in r.ngram for r in rows)]
    lines = [f"# Pruning sweep: {context.get('model', '?')} on {context.get('dataset', '?')}", ""]
    for name, value in context.items():
        lines.append(f"- {name}: `{value}`" if name == "command" else f"- {name}: {value}")
    lines += [
        "",
        "EM and refined EM in %, with 95 % Wilson score intervals in brackets. "
        f"{unit}: analytic prefill FLOPs per sample at the tokens that entered each layer; "
        "'vs none' is that divided by the unpruned model's. Retention: requested, and measured "
        "(mean over samples and layers of the fraction of spatial tokens entering the layer); final: the "
        "fraction entering the last layer (the budget as the paper's fit states it, docs/method.md); a "
        "requested 'final a' asked adatoken3d's curve to end at a and ran every other method at that curve's "
        "mean retention. "
        "Prefill ms: median over batches of the measured prefill time, wall-clock on this machine "
        "(noisy on a shared CPU; compare within one run only). Time: total generation time of the config.",
        "",
    ]
    head = ["method", "retention", "measured", "final", "EM %", "refined EM %",
            *(NGRAM_SHOWN[n] for n in ngram_names), unit, "vs none", "prefill ms", "time s"]
    lines += [_table_row(head), _table_row(["---"] * len(head))]
    skipped = []
    for row in rows:
        retention = row.label
        if row.skipped is not None:
            skipped.append(row)
            cells = [row.method, retention, f"skipped ({len(skipped)})"] + [""] * (len(head) - 3)
        else:
            cells = [row.method, retention, _num(row.measured_retention, ".3f"), _num(row.final_keep, ".3f"),
                     _pct(row.em), _pct(row.refined_em),
                     *(_num(row.ngram.get(n), ".3f") for n in ngram_names),
                     _num(row.prefill_flops / scale, ".3f"), _num(row.flops_ratio, ".2f"),
                     _num(row.prefill_ms, ".1f"), _num(row.answer_s, ".1f")]
        lines.append(_table_row(cells))

    types = next((list(r.em_by_type) for r in rows if r.em_by_type), [])
    if types:
        counts = next(r.em_by_type for r in rows if r.em_by_type)
        lines += ["", "## EM by question type (%, 95 % Wilson interval)", ""]
        head = ["method", "retention", *(f"{t} (n={counts[t].n})" for t in types)]
        lines += [_table_row(head), _table_row(["---"] * len(head))]
        for row in (r for r in rows if r.skipped is None):
            lines.append(_table_row([row.method, row.label, *(_pct(row.em_by_type.get(t)) for t in types)]))
    reasons = {f"{NGRAM_SHOWN[n]}: {why}" for r in rows for n, why in r.ngram_unavailable.items()}
    if reasons:
        lines += ["", "Not computed (–): " + "; ".join(sorted(reasons)) + "."]
    if skipped:
        lines += ["", "## Skipped configurations", ""]
        lines += [f"{i}. {row.key}: {row.skipped}" for i, row in enumerate(skipped, start=1)]
    return "\n".join(lines) + "\n"


def _table_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def plot_accuracy_vs_flops(rows: list[ReportRow], path: str | Path, title: str) -> None:
    """One line per method through its retentions, x = prefill FLOPs (relative to `none` when it ran),
    y = EM with its 95 % interval; the unpruned model is a star and a dashed line across."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from adatoken.calibration.plots import method_style

    ran = [r for r in rows if r.skipped is None and r.em is not None and r.em.value is not None]
    relative = any(r.flops_ratio is not None for r in ran)
    unit, scale = _flops_unit(rows)

    def x(row: ReportRow) -> float:
        return row.flops_ratio if relative else row.prefill_flops / scale

    def yerr(points: list[ReportRow]) -> list[list[float]]:
        """Distances from each EM down and up to its interval's ends, as errorbar wants them."""
        return [[100 * (r.em.value - r.em.ci95[0]) for r in points],
                [100 * (r.em.ci95[1] - r.em.value) for r in points]]

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    methods = list(dict.fromkeys(r.method for r in ran if r.method != "none"))
    # Methods at one retention cost nearly the same FLOPs and sit on top of each other: each method's own
    # marker (variants dashed) and see-through interval bars keep each one visible.
    for method in methods:
        points = sorted((r for r in ran if r.method == method), key=x)
        _, caps, bars = ax.errorbar([x(r) for r in points], [100 * r.em.value for r in points], yerr=yerr(points),
                                    **method_style(method), linestyle="--" if ":" in method else "-",
                                    markersize=6, capsize=3, linewidth=1.5, elinewidth=1, label=method)
        for artist in (*caps, *bars):
            artist.set_alpha(0.35)
    for retention in sorted({r.retention for r in ran if r.retention is not None}):
        cluster = [r for r in ran if r.retention == retention]
        top = max(cluster, key=lambda r: r.em.ci95[1])
        label = top.label if top.label.startswith("final") else f"retention {top.label}"
        ax.annotate(label, (statistics.fmean(x(r) for r in cluster), 100 * top.em.ci95[1]),
                    textcoords="offset points", xytext=(0, 5), ha="center", fontsize=8, color="0.3")
    for r in (r for r in ran if r.method == "none"):
        ax.errorbar([x(r)], [100 * r.em.value], yerr=yerr([r]), marker="*", markersize=14, color="black",
                    capsize=3, linestyle="none", label="none (unpruned)")
        ax.axhline(100 * r.em.value, color="black", linestyle="--", linewidth=0.8, alpha=0.6)
    ax.set_xlabel("prefill FLOPs relative to unpruned" if relative else f"prefill {unit} per sample")
    ax.set_ylabel("EM (%), 95 % Wilson interval")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.margins(x=0.08, y=0.12)  # room for the retention labels above the points
    if ran:
        ax.legend(fontsize=8, loc="best", title="method", title_fontsize=8)
    fig.tight_layout()
    write_atomic(path, fig.savefig)
    plt.close(fig)
