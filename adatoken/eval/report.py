"""Tables and a figure from a finished sweep, in the layout of the paper's Table II.

    rows = summarize(configs, predictions)           # one ReportRow per config, skipped ones included
    write_report(out_dir, rows, context)             # metrics.json, report.json, report.md, accuracy_vs_flops.png

Accuracy is EM and refined EM (adatoken.eval.metrics), with 95 % Wilson score intervals: the
binomial interval that stays inside [0, 1] and keeps its coverage at the few hundred questions and
the extreme accuracies a per-type column has. VQA question sets (vqav2) also get VQA accuracy, a mean
of per-question scores in [0, 1], with the Wilson interval at that mean (`Accuracy.of_scores`).
FLOPs are the analytic prefill FLOPs of each sample at the token counts that actually entered each layer
(adatoken.core.flops), averaged over samples. Latency is the median over batches of the measured prefill
time: wall-clock, so noisy on a shared CPU.
"""
from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from adatoken.core.artifacts import write_atomic, write_json_atomic, write_text_atomic
from adatoken.eval.boxes import THRESHOLDS, box_iou, captioning_scores, grounding_scores, parse_box, without_boxes
from adatoken.eval.metrics import SQA3D_TYPES, VQA_ANSWER_TYPES, breakdown, score, vqa_types
from adatoken.eval.runner import SweepConfig

REPORT_FORMAT = "adatoken.eval.report/v1"
Z_95 = 1.959963984540054  # two-sided 95 % normal quantile
NGRAM_SHOWN = {"bleu_4": "BLEU-4", "rouge_l": "ROUGE-L", "meteor": "METEOR", "cider": "CIDEr"}


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (95 % by default)."""
    if n <= 0:
        raise ValueError(f"a Wilson interval needs at least one trial, got n={n}")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must lie in [0, n], got {successes} of n={n}")
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
        return cls.of_scores([float(hit) for hit in hits])

    @classmethod
    def of_mean(cls, scores: Sequence[float]) -> "Accuracy":
        """Mean of unbounded per-sample scores (CIDEr) with the normal 95 % interval from their sample variance."""
        n = len(scores)
        if n == 0:
            return cls(0, None, (0.0, 0.0))
        mean = math.fsum(scores) / n
        half = Z_95 * (statistics.stdev(scores) / math.sqrt(n) if n > 1 else 0.0)
        return cls(n, mean, (mean - half, mean + half))

    @classmethod
    def of_scores(cls, scores: Sequence[float]) -> "Accuracy":
        """Mean of per-question scores in [0, 1] (0/1 hits: a proportion) with the 95 % Wilson interval at that mean.

        For scores between 0 and 1 (VQA accuracy: 0, 0.3, 0.6, 0.9, 1) this is conservative: a score in [0, 1]
        with mean p has variance at most p(1 - p), that of a 0/1 score, so the interval is at least as wide as
        a normal interval with the true variance, and unlike one built on the sample variance it neither leaves
        [0, 1] nor shrinks to a point when every score is 0 or 1. No questions: value None, interval [0, 1].
        """
        n = len(scores)
        if n == 0:  # a type no question of the subset has (SQA3D tables list all six)
            return cls(0, None, (0.0, 1.0))
        total = sum(scores)
        return cls(n, total / n, wilson_interval(total, n))


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
    vqa_acc: Accuracy | None = None          # VQA question sets only (report.json leaves both out otherwise)
    vqa_by_type: dict[str, Accuracy] = field(default_factory=dict)  # by answer type
    ngram: dict[str, float | None] = field(default_factory=dict)
    ngram_unavailable: dict[str, str] = field(default_factory=dict)  # metric -> why it is None
    # 3D grounding rows (qtype "grounding"): "acc@0.25", "acc@0.5", and per ScanRefer subset "unique acc@0.5" ...
    grounding: dict[str, Accuracy] = field(default_factory=dict)
    # dense captioning rows (qtype "captioning"): "cider@0.5", "bleu_4@0.5", ... (per-object means, Scan2Cap's)
    captioning: dict[str, Accuracy] = field(default_factory=dict)
    measured_retention: float | None = None  # mean over samples of mean over layers of kept / input spatial
    final_keep: float | None = None          # mean over samples of kept at the last layer / input spatial
    prefill_flops: float | None = None       # mean per sample
    flops_ratio: float | None = None         # prefill_flops / that of `none`
    prefill_ms: float | None = None          # median over batches
    answer_s: float | None = None            # total generation time of all batches
    label: str = ""                          # the budget as printed: "0.4", "final 0.1" (SweepConfig.label)


def summarize(configs: Sequence[SweepConfig], predictions: dict[str, list[dict]], *, ngram: bool = False,
              style: str = "llava3d", vqa: bool = False) -> tuple[list[ReportRow], dict]:
    """One ReportRow per config (in sweep order) and metrics.json's content: each config's full scores.

    vqa: also VQA accuracy, overall and by answer type (a VQAv2-format question set).
    """
    all_rows = [row for rows in predictions.values() for row in rows]
    types = _question_types(all_rows, vqa)
    report, metrics = [], {}
    for config in configs:
        if config.skipped is not None:
            report.append(ReportRow(config.key, config.method, config.retention, skipped=config.skipped,
                                    label=config.label))
            continue
        rows = predictions[config.key]
        scores = score([r["prediction"] for r in rows], [r["references"] for r in rows],
                       qtypes=[r["qtype"] for r in rows] if types else None,
                       question_ids=[r["question_id"] for r in rows], style=style, ngram=ngram, vqa=vqa)
        samples = scores.pop("samples")  # per-sample rows are in the predictions files already
        scores["by_type"] = breakdown(samples, types=types) if types else None  # in the table's column order
        metrics[config.key] = scores
        report.append(ReportRow(
            config.key, config.method, config.retention,
            em=Accuracy.of([s["em"] for s in samples]),
            refined_em=Accuracy.of([s["refined_em"] for s in samples]),
            em_by_type={t: Accuracy.of([s["em"] for s in samples if s["qtype"] == t]) for t in types},
            vqa_acc=Accuracy.of_scores([s["vqa_accuracy"] for s in samples]) if vqa else None,
            vqa_by_type={t: Accuracy.of_scores([s["vqa_accuracy"] for s in samples if s["qtype"] == t])
                         for t in types} if vqa else {},
            ngram={name: scores[name] for name in NGRAM_SHOWN} if ngram else {},
            ngram_unavailable={n: why for n, why in scores["unavailable"].items() if n in NGRAM_SHOWN} if ngram else {},
            **_task_scores(rows),
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


def _task_scores(rows: list[dict]) -> dict:
    """ReportRow's grounding and captioning fields for one config's rows (empty when it has no such rows).

    Grounding: the box parsed from each answer ("[cx, cy, cz, dx, dy, dz]", boxes.parse_box; none: IoU 0) against
    the row's box. Captioning: a caption that states a box is matched at that box's IoU with the object; one that
    does not is about the object its question gave (Scan2Cap's proposal, the testbed's point), IoU 1, so its @0.25
    and @0.5 scores are equal."""
    out: dict = {}
    grounding = [r for r in rows if r["qtype"] == "grounding"]
    if grounding:
        subsets = [r.get("subset") for r in grounding]
        found = grounding_scores([parse_box(r["prediction"]) for r in grounding], [r["box"] for r in grounding],
                                 subsets if None not in subsets else None)
        ious = found["ious"]
        out["grounding"] = {f"acc@{k:g}": Accuracy.of([iou >= k for iou in ious]) for k in THRESHOLDS}
        for subset in sorted(set(subsets) - {None}):
            out["grounding"].update({f"{subset} acc@{k:g}": Accuracy.of(
                [iou >= k for iou, s in zip(ious, subsets) if s == subset]) for k in THRESHOLDS})
    captioning = [r for r in rows if r["qtype"] == "captioning"]
    if captioning:
        boxes = [parse_box(r["prediction"]) for r in captioning]
        ious = [1.0 if box is None else box_iou(box, r["box"]) for box, r in zip(boxes, captioning)]
        found = captioning_scores([without_boxes(r["prediction"]) for r in captioning],
                                  [[without_boxes(ref) for ref in r["references"]] for r in captioning], ious)
        out["captioning"] = {}
        for name, scores in found["per_object"].items():
            for k in THRESHOLDS:
                if scores is not None:
                    out["captioning"][f"{name}@{k:g}"] = Accuracy.of_mean(
                        [s if iou >= k else 0.0 for s, iou in zip(scores, ious)])
    return out


def _question_types(rows: list[dict], vqa: bool = False) -> list[str]:
    found = {r["qtype"] for r in rows if r["qtype"] is not None}
    if vqa:  # yes/no, number, other, as VQA papers print them; any other type after them
        return vqa_types(list(found)) + sorted(found - set(VQA_ANSWER_TYPES))
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
                                      "rows": [_row_json(r) for r in rows]}, indent=2) + "\n")
    write_text_atomic(paths[2], to_markdown(rows, context))
    title = (f"{_headline_name(rows)} vs prefill FLOPs: {context.get('model', 'model')} on "
             f"{context.get('dataset', 'dataset')} (n={context.get('num_questions', '?')})")
    plot_accuracy_vs_flops(rows, paths[3], title)
    return paths


def _row_json(row: ReportRow) -> dict:
    """A row as report.json stores it; the VQA fields only for VQA question sets, so other reports keep their keys."""
    data = asdict(row)
    if row.vqa_acc is None:
        del data["vqa_acc"], data["vqa_by_type"]
    return data


def _headline(row: ReportRow) -> Accuracy | None:
    """The score the figure plots: VQA accuracy for VQA question sets, Acc@0.5 for grounding, CIDEr@0.5 for
    captioning (with EM, a question set of one kind has only one of these), EM otherwise."""
    if row.vqa_acc is not None:
        return row.vqa_acc
    return row.grounding.get("acc@0.5") or row.captioning.get("cider@0.5") or row.em


def _headline_name(rows: Sequence[ReportRow]) -> str:
    if any(r.vqa_acc is not None for r in rows):
        return "VQA accuracy"
    if any(r.grounding for r in rows):
        return "grounding Acc@0.5"
    return "CIDEr@0.5 (x100)" if any(r.captioning for r in rows) else "EM"


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


def _tasks_only(rows: Sequence[ReportRow]) -> bool:
    """Whether every scored question is a grounding or captioning one: their answers are boxes and captions, which
    exact match scores 0 everywhere, so the main table shows the task's headline score instead."""
    ran = [r for r in rows if r.skipped is None]
    return bool(ran) and all(r.grounding or r.captioning for r in ran) and all(
        set(r.em_by_type) <= {"grounding", "captioning"} for r in ran)


def to_markdown(rows: list[ReportRow], context: dict) -> str:
    unit, scale = _flops_unit(rows)
    ngram_names = [n for n in NGRAM_SHOWN if any(n in r.ngram for r in rows)]
    vqa = any(r.vqa_acc is not None for r in rows)
    tasks_only = _tasks_only(rows)
    headline = _headline_name(rows)
    scored = [headline if headline.startswith("CIDEr") else f"{headline} %"] if tasks_only else ["EM %", "refined EM %"]
    lines = [f"# Pruning sweep: {context.get('model', '?')} on {context.get('dataset', '?')}", ""]
    for name, value in context.items():
        lines.append(f"- {name}: `{value}`" if name == "command" else f"- {name}: {value}")
    lines += [
        "",
        *([VQA_NOTE, ""] if vqa else []),
        (f"{headline}: the task table's headline score (below), with its 95 % interval in brackets. "
         if tasks_only else "EM and refined EM in %, with 95 % Wilson score intervals in brackets. ") +
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
    head = ["method", "retention", "measured", "final", *(["VQA acc %"] if vqa else []), *scored,
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
                     *([_pct(row.vqa_acc)] if vqa else []),
                     *([_pct(_headline(row))] if tasks_only else [_pct(row.em), _pct(row.refined_em)]),
                     *(_num(row.ngram.get(n), ".3f") for n in ngram_names),
                     _num(row.prefill_flops / scale, ".3f"), _num(row.flops_ratio, ".2f"),
                     _num(row.prefill_ms, ".1f"), _num(row.answer_s, ".1f")]
        lines.append(_table_row(cells))

    if vqa:  # VQA reports break VQA accuracy down by answer type (report.json keeps EM by type too)
        lines += _by_type_table(rows, "vqa_by_type", "VQA accuracy by answer type (%, 95 % Wilson interval at the "
                                                     "mean score)")
    elif not tasks_only:
        lines += _by_type_table(rows, "em_by_type", "EM by question type (%, 95 % Wilson interval)")
    lines += task_tables(rows)
    reasons = {f"{NGRAM_SHOWN[n]}: {why}" for r in rows for n, why in r.ngram_unavailable.items()}
    if reasons:
        lines += ["", "Not computed (–): " + "; ".join(sorted(reasons)) + "."]
    if skipped:
        lines += ["", "## Skipped configurations", ""]
        lines += [f"{i}. {row.key}: {row.skipped}" for i, row in enumerate(skipped, start=1)]
    return "\n".join(lines) + "\n"


VQA_NOTE = ("VQA acc: the official VQA accuracy (docs/metrics.md: each prediction against the ten human answers, "
            "min(1, matches / 3) averaged over the ten leave-one-out sets of nine), mean over questions, in %, with a "
            "95 % Wilson score interval at that mean (conservative for scores between 0 and 1). EM and refined EM "
            "are scored as for every question set: against any of the ten answers, after adatoken's answer cleaning.")


def _by_type_table(rows: list[ReportRow], name: str, title: str) -> list[str]:
    """Markdown lines of one accuracy per type and config (`name`: em_by_type or vqa_by_type); none without types."""
    counts = next((getattr(r, name) for r in rows if getattr(r, name)), {})
    if not counts:
        return []
    lines = ["", f"## {title}", ""]
    head = ["method", "retention", *(f"{t} (n={acc.n})" for t, acc in counts.items())]
    lines += [_table_row(head), _table_row(["---"] * len(head))]
    for row in (r for r in rows if r.skipped is None):
        lines.append(_table_row([row.method, row.label, *(_pct(getattr(row, name).get(t)) for t in counts)]))
    return lines


def task_tables(rows: list[ReportRow]) -> list[str]:
    """The paper's Table I columns: grounding Acc@0.25 / Acc@0.5 (and by ScanRefer subset), captioning metric@k."""
    ran = [r for r in rows if r.skipped is None]
    lines = []
    for name, title, note, scale in (
            ("grounding", "3D grounding", "Acc@k: % of referring expressions whose predicted box has IoU >= k with "
                                          "the object's (docs/metrics.md), 95 % Wilson interval", 100),
            ("captioning", "Dense captioning", "metric@k: per-object caption score, 0 where the caption's box has IoU "
                                               "< k (Scan2Cap), mean x 100 with a normal 95 % interval", 100)):
        columns = next((list(getattr(r, name)) for r in ran if getattr(r, name)), [])
        if not columns:
            continue
        n = getattr(next(r for r in ran if getattr(r, name)), name)[columns[0]].n
        lines += ["", f"## {title} (n={n})", "", note + ".", "",
                  _table_row(["method", "retention", *columns]), _table_row(["---"] * (len(columns) + 2))]
        for row in ran:
            cells = []
            for column in columns:
                acc = getattr(row, name).get(column)
                if acc is None or acc.value is None:
                    cells.append("–")
                    continue
                low, high = (scale * v for v in acc.ci95)
                cells.append(f"{scale * acc.value:.1f} [{low:.1f}, {high:.1f}]")
            lines.append(_table_row([row.method, row.label, *cells]))
    return lines


def _table_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def plot_accuracy_vs_flops(rows: list[ReportRow], path: str | Path, title: str) -> None:
    """One line per method through its retentions, x = prefill FLOPs (relative to `none` when it ran),
    y = EM (VQA accuracy for VQA question sets) with its 95 % interval; the unpruned model is a star and a
    dashed line across."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from adatoken.calibration.plots import method_style

    ran = [r for r in rows if r.skipped is None and _headline(r) is not None and _headline(r).value is not None]
    relative = any(r.flops_ratio is not None for r in ran)
    unit, scale = _flops_unit(rows)

    def x(row: ReportRow) -> float:
        return row.flops_ratio if relative else row.prefill_flops / scale

    def yerr(points: list[ReportRow]) -> list[list[float]]:
        """Distances from each accuracy down and up to its interval's ends, as errorbar wants them."""
        return [[100 * (_headline(r).value - _headline(r).ci95[0]) for r in points],
                [100 * (_headline(r).ci95[1] - _headline(r).value) for r in points]]

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    methods = list(dict.fromkeys(r.method for r in ran if r.method != "none"))
    # Methods at one retention cost nearly the same FLOPs and sit on top of each other: each method's own
    # marker (variants dashed) and see-through interval bars keep each one visible.
    for method in methods:
        points = sorted((r for r in ran if r.method == method), key=x)
        _, caps, bars = ax.errorbar([x(r) for r in points], [100 * _headline(r).value for r in points],
                                    yerr=yerr(points), **method_style(method), linestyle="--" if ":" in method else "-",
                                    markersize=6, capsize=3, linewidth=1.5, elinewidth=1, label=method)
        for artist in (*caps, *bars):
            artist.set_alpha(0.35)
    for retention in sorted({r.retention for r in ran if r.retention is not None}):
        cluster = [r for r in ran if r.retention == retention]
        top = max(cluster, key=lambda r: _headline(r).ci95[1])
        label = top.label if top.label.startswith("final") else f"retention {top.label}"
        ax.annotate(label, (statistics.fmean(x(r) for r in cluster), 100 * _headline(top).ci95[1]),
                    textcoords="offset points", xytext=(0, 5), ha="center", fontsize=8, color="0.3")
    for r in (r for r in ran if r.method == "none"):
        ax.errorbar([x(r)], [100 * _headline(r).value], yerr=yerr([r]), marker="*", markersize=14, color="black",
                    capsize=3, linestyle="none", label="none (unpruned)")
        ax.axhline(100 * _headline(r).value, color="black", linestyle="--", linewidth=0.8, alpha=0.6)
    ax.set_xlabel("prefill FLOPs relative to unpruned" if relative else f"prefill {unit} per sample")
    name = _headline_name(rows)
    ax.set_ylabel(f"{name}, 95 % normal interval" if name.startswith("CIDEr") else f"{name} (%), 95 % Wilson interval")
    ax.set_title(title, fontsize=10, wrap=True)  # long dataset names would run off the figure
    ax.grid(True, alpha=0.3)
    ax.margins(x=0.08, y=0.12)  # room for the retention labels above the points
    if ran:
        ax.legend(fontsize=8, loc="best", title="method", title_fontsize=8)
    fig.tight_layout()
    write_atomic(path, fig.savefig)
    plt.close(fig)
