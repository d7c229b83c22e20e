"""The demo's report: report.md, report.json and the figures, from the results of its stages.

    results = DemoResults(context, flow, schedules, fit_errors, configs, predictions, bench, tasks=..., tasks_note=...)
    draw_figures(out, results)                                   # the PNGs named by figure_names(results)
    write(out, results, [out / n for n in figure_names(results)])  # report.md, report.json

The reading at the top of report.md is computed from the numbers (which method keeps accuracy best
at each retention, whether its lead exceeds the 95 % intervals, how close speed comes to FLOPs),
never written in advance: another checkpoint or sample size gives other sentences.
"""
from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from adatoken.calibration.fit import normalize_inf
from adatoken.calibration.flow import FlowReport
from adatoken.core.artifacts import write_json_atomic, write_text_atomic
from adatoken.core.schedule import Schedule
from adatoken.eval.report import Accuracy, ReportRow, plot_accuracy_vs_flops, summarize, task_tables, to_markdown

REPORT_FORMAT = "adatoken.demo/v1"
FIGURES = {
    "group_attention.png": "Attention between token groups, per layer (calibration questions)",
    "information_flow.png": "Information flow per layer, the eq.-5 fit for each retention and the fitted schedules",
    "redundancy.png": "Share of spatial tokens the answer hardly attends to, per layer",
    "accuracy_vs_flops.png": "EM against prefill FLOPs (95 % Wilson intervals)",
    "retention_per_layer.png": "Spatial tokens entering each layer, per method and retention (measured)",
    "speedup_vs_flops.png": "Measured prefill speedup against the analytic FLOPs ratio",
}


@dataclass
class DemoResults:
    context: dict                   # what was run (checkpoint, sizes, threads, command, ...)
    flow: FlowReport
    schedules: dict[float, Schedule]
    fit_errors: dict[float, str]    # retention -> why no schedule could be fitted
    configs: list                   # the eval's SweepConfigs, skipped ones with their reason
    predictions: dict[str, list[dict]]
    bench: dict[str, dict]          # model label -> adatoken.apps.bench result; empty when skipped
    # Table I: task (grounding, captioning) -> config key -> prediction rows; empty, with the reason, when not run
    tasks: dict[str, dict[str, list[dict]]] = field(default_factory=dict)
    tasks_note: str | None = None
    stages: dict = field(default_factory=dict)  # stage -> reused, seconds

    @cached_property
    def summary(self) -> tuple[list[ReportRow], dict]:
        return summarize(self.configs, self.predictions)

    @property
    def rows(self) -> list[ReportRow]:
        return self.summary[0]

    @cached_property
    def task_summaries(self) -> dict[str, tuple[list[ReportRow], dict]]:
        return {task: summarize(self.configs, predictions) for task, predictions in self.tasks.items()}

    @property
    def num_questions(self) -> int:
        return len(next(iter(self.predictions.values())))  # `none` always runs

    @cached_property
    def kept_per_layer(self) -> dict[float, dict[str, list[float]]]:
        """retention -> method -> mean over questions of the share of its spatial tokens entering each layer."""
        kept: dict[float, dict[str, list[float]]] = {}
        for config in self.configs:
            rows = self.predictions.get(config.key)
            if config.retention is None or not rows:
                continue
            shares = np.mean([np.asarray(r["spatial_in"]) / r["spatial_in"][0] for r in rows if r["spatial_in"][0]], 0)
            kept.setdefault(config.retention, {})[config.method] = shares.tolist()
        return kept

    @cached_property
    def reading(self) -> list[str]:
        lines = read_flow(self.flow, self.schedules) + read_accuracy(self.rows)
        lines += read_table_one({task: rows for task, (rows, _) in self.task_summaries.items()}, self.rows)
        lines += [read_bench(label, result) for label, result in self.bench.items()]
        skipped = [r for r in self.rows if r.skipped]
        if skipped:
            lines.append(f"{len(skipped)} configuration(s) could not run ({', '.join(r.key for r in skipped)}); "
                         "the reasons are listed under the accuracy table.")
        return lines


# ----- the reading: sentences computed from the numbers ---------------------------------------------
def _pct(acc: Accuracy) -> str:
    return f"{100 * acc.value:.1f} % [{100 * acc.ci95[0]:.1f}, {100 * acc.ci95[1]:.1f}]"


def read_flow(flow: FlowReport, schedules: dict[float, Schedule]) -> list[str]:
    s_self = np.asarray(flow.s_self)
    most, least = int(np.nanargmax(s_self)), int(np.nanargmin(s_self))
    inf = normalize_inf(flow.inf)
    quarter = max(1, len(inf) // 4)
    lines = [f"Over {flow.num_samples} calibration questions the answer pays the spatial tokens the largest share "
             f"of its attention in layer {most} ({s_self[most]:.3f}) and the smallest in layer {least} "
             f"({s_self[least]:.3f}); in an average layer {flow.redundancy:.0%} of the spatial tokens get under "
             f"{flow.params.redundancy_threshold:.0%} of the mean spatial attention. Normalised INF averages "
             f"{inf[:quarter].mean():.2f} over the first {quarter} layers and {inf[-quarter:].mean():.2f} over the "
             f"last {quarter}."]
    if schedules:
        residuals = [s.meta["rms_residual"] for s in schedules.values()]
        lines.append(f"The eq.-5 curve fits normalised INF with an RMS residual of {min(residuals):.3f}–"
                     f"{max(residuals):.3f} across the {len(schedules)} fitted retention(s).")
    return lines


def read_accuracy(rows: list[ReportRow]) -> list[str]:
    ran = [r for r in rows if r.em is not None and r.em.value is not None]
    unpruned = next((r for r in ran if r.method == "none"), None)
    if unpruned is None:
        return []
    lines = [f"Unpruned, the model answers {_pct(unpruned.em)} of {unpruned.em.n} test questions exactly (EM, 95 % "
             "Wilson interval)."]
    if unpruned.em.value == 0:
        lines.append("With no question answered, the accuracy comparison below says nothing about the methods "
                     "(an untrained checkpoint?).")
    for retention in sorted({r.retention for r in ran if r.retention is not None}):
        lines.append(_read_retention(retention, sorted((r for r in ran if r.retention == retention),
                                                        key=lambda r: -r.em.value), unpruned))
    return lines


def _apart(a: Accuracy, b: Accuracy) -> bool:
    """Whether the two 95 % intervals do not overlap: a conservative test that the difference is real."""
    return a.ci95[0] > b.ci95[1] or b.ci95[0] > a.ci95[1]


def _read_retention(retention: float, ranked: list[ReportRow], unpruned: ReportRow) -> str:
    """One sentence on one retention; `ranked` holds the configs that ran there, best EM first."""
    best = ranked[0]
    leaders = [r for r in ranked if r.em.value == best.em.value]
    if len(leaders) > 1:
        text = f"At retention {retention:g}, {', '.join(r.method for r in leaders)} tie at {_pct(best.em)}"
    else:
        text = f"At retention {retention:g}, {best.method} keeps accuracy best, {_pct(best.em)}"
    rest = ranked[len(leaders):]
    if rest:
        runner = rest[0]
        apart = _apart(best.em, runner.em)
        lead = 100 * (best.em.value - runner.em.value)
        text += (f"; next is {runner.method} at {_pct(runner.em)}, {lead:.1f} points lower, "
                 f"{'beyond' if apart else 'within'} the 95 % intervals (they "
                 f"{'do not overlap' if apart else 'overlap'})")
    ada = next((r for r in ranked if r.method == "adatoken3d"), None)
    if ada is not None and ada not in leaders:
        text += f"; adatoken3d ranks {ranked.index(ada) + 1} of {len(ranked)} with {_pct(ada.em)}"
    gap = 100 * (best.em.value - unpruned.em.value)
    text += ". The best " + ("matches the unpruned model" if gap == 0 else
                             f"is {abs(gap):.1f} points {'above' if gap > 0 else 'below'} the unpruned model, "
                             f"{'beyond' if _apart(best.em, unpruned.em) else 'within'} the intervals")
    if best.flops_ratio is not None:
        text += f", at {best.flops_ratio:.2f} of its prefill FLOPs"
    return text + "."


# The score each Table I task is read by (the paper's: ScanRefer Acc@0.5 and Scan2Cap CIDEr@0.5), and its name.
TABLE_ONE_SCORE = {"grounding": ("acc@0.5", "3D grounding Acc@0.5"),
                   "captioning": ("cider@0.5", "dense captioning CIDEr@0.5 (x100)")}


def _score(acc: Accuracy) -> str:
    return f"{100 * acc.value:.1f} [{100 * acc.ci95[0]:.1f}, {100 * acc.ci95[1]:.1f}]"


def read_table_one(tasks: dict[str, list[ReportRow]], qa_rows: list[ReportRow]) -> list[str]:
    """Per task, one sentence: the unpruned score, and at each retention the best method and how much of the
    unpruned score FastV and AdaToken-3D keep beside how much of the unpruned QA EM they keep (does pruning hurt
    grounding more than question answering?)."""
    qa = {r.key: r.em for r in qa_rows if r.em is not None and r.em.value is not None}
    qa_unpruned = qa.get("none")
    lines = []
    for task, rows in tasks.items():
        metric, name = TABLE_ONE_SCORE[task]
        scores = {r.key: getattr(r, task)[metric] for r in rows if r.skipped is None and metric in getattr(r, task)}
        unpruned = scores.get("none")
        if unpruned is None:
            continue
        text = f"Table I, {name}: unpruned {_score(unpruned)} over {unpruned.n}"
        if unpruned.value == 0:
            lines.append(text + "; with nothing right unpruned, pruning has nothing to lose here.")
            continue
        by_retention: dict[float, list[ReportRow]] = {}
        for row in rows:
            if row.key in scores and row.retention is not None:
                by_retention.setdefault(row.retention, []).append(row)
        for retention, ran in sorted(by_retention.items()):
            best = max(ran, key=lambda r: scores[r.key].value)
            text += f"; at retention {retention:g} {best.method} scores best, {_score(scores[best.key])}"
            kept = []
            for row in ran:
                if row.method in ("fastv", "adatoken3d") and row.key in qa and qa_unpruned and qa_unpruned.value:
                    kept.append(f"{row.method} keeps {scores[row.key].value / unpruned.value:.0%} of it "
                                f"(of QA EM: {qa[row.key].value / qa_unpruned.value:.0%})")
            text += (", " + ", ".join(kept)) if kept else ""
        lines.append(text + ".")
    return lines


def read_bench(label: str, result: dict) -> str:
    rows = [r for r in result["rows"] if "skipped" not in r]
    unpruned = next(r for r in rows if r["method"] == "none")
    pruned = [r for r in rows if r["method"] != "none"]
    if not pruned:
        return f"{label}: unpruned prefill {1e3 * unpruned['prefill_s']:.1f} ms; no pruned config could run."
    speedups = [r["prefill_speedup"] for r in pruned]
    ratios = [r["flops_ratio"] for r in pruned]
    efficiency = [s / f for s, f in zip(speedups, ratios)]
    return (f"{label}, {result['spatial_tokens']} spatial + {result['text_tokens']} text tokens: the unpruned prefill "
            f"takes {1e3 * unpruned['prefill_s']:.1f} ms; pruned prefills run "
            f"{min(speedups):.2f}–{max(speedups):.2f}x "
            f"faster for {min(ratios):.2f}–{max(ratios):.2f}x fewer FLOPs. Speedup / FLOPs ratio is "
            f"{min(efficiency):.2f}–{max(efficiency):.2f} (median {statistics.median(efficiency):.2f}; 1 means time "
            "falls exactly as FLOPs do).")


# ----- writing -------------------------------------------------------------------------------------
def accuracy_table(rows: list[ReportRow]) -> str:
    """A terminal table: EM with its 95 % Wilson interval per config, skipped configs with their reason."""
    lines = [f"{'method':<11}{'retention':>10}  {'EM % [95 % Wilson]':<22}{'FLOPs vs none':>14}"]
    for row in rows:
        retention = "1" if row.retention is None else f"{row.retention:g}"
        if row.skipped:
            lines.append(f"{row.method:<11}{retention:>10}  skipped: {row.skipped}")
            continue
        em = f"{100 * row.em.value:.1f} [{100 * row.em.ci95[0]:.1f}, {100 * row.em.ci95[1]:.1f}]"
        lines.append(f"{row.method:<11}{retention:>10}  {em:<22}{row.flops_ratio:>14.2f}")
    return "\n".join(lines)


def bench_table(result: dict) -> str:
    """The prefill columns of `adatoken bench`'s table (bench/*.md holds all of them)."""
    from adatoken.apps.bench import PREFILL_COLUMNS, markdown_table

    return (f"{result['spatial_tokens']} spatial + {result['text_tokens']} text tokens, batch {result['batch']}, "
            f"{result['threads']} thread(s), median of {result['repeats']}\n\n"
            + markdown_table(result["rows"], PREFILL_COLUMNS))


def figure_names(results: DemoResults) -> list[str]:
    """The figures this run's results make (no speed figure without the benchmark)."""
    names = ["group_attention.png", "information_flow.png", "redundancy.png", "accuracy_vs_flops.png"]
    names += ["retention_per_layer.png"] if results.kept_per_layer else []
    return names + (["speedup_vs_flops.png"] if results.bench else [])


def draw_figures(out: Path, results: DemoResults) -> None:
    """Every figure of `figure_names` into `out`."""
    from adatoken.calibration import plots  # matplotlib: only when drawing

    plots.plot_report(results.flow, out, [results.schedules[r] for r in sorted(results.schedules)])
    title = f"EM vs prefill FLOPs: {results.context['model']} on testbed test (n={results.num_questions})"
    plot_accuracy_vs_flops(results.rows, out / "accuracy_vs_flops.png", title)
    if results.kept_per_layer:
        plots.plot_retention_per_layer(results.kept_per_layer, out / "retention_per_layer.png")
    if results.bench:
        plots.plot_speedup_vs_flops({k: v["rows"] for k, v in results.bench.items()}, out / "speedup_vs_flops.png")


def _figure(path: Path) -> str:
    return f"![{FIGURES.get(path.name, path.stem)}]({path.name})"


def to_report_markdown(results: DemoResults, figures: list[Path]) -> str:
    shown = {p.name: p for p in figures}
    lines = [f"# AdaToken-3D on the testbed: {results.context['model']}", ""]
    lines += [f"- {k}: `{v}`" if k == "command" else f"- {k}: {v}" for k, v in results.context.items()]
    lines += ["", "## What the numbers show", "", *(f"- {line}" for line in results.reading), ""]
    lines += ["## Stages", "", "| stage | this run | seconds |", "|---|---|---|"]
    lines += [f"| {name} | {'reused' if s['reused'] else 'computed'} | {s['seconds']:.1f} |"
              for name, s in results.stages.items()]

    lines += ["", f"## Information flow ({results.flow.num_samples} calibration questions)", ""]
    lines += [_figure(shown[name]) + "\n" for name in ("group_attention.png", "information_flow.png", "redundancy.png")]
    lines += ["Fitted AdaToken-3D schedules (`schedules/`, usable as `adatoken.prune(model, 'adatoken3d', "
              "schedule=PATH)`):", "",
              "| retention | α | β | L | M | RMS residual | share of spatial tokens entering each layer |",
              "|---|---|---|---|---|---|---|"]
    for retention in sorted({*results.schedules, *results.fit_errors}):
        if retention in results.fit_errors:
            lines.append(f"| {retention:g} | not fitted: {results.fit_errors[retention]} | | | | | |")
            continue
        s = results.schedules[retention]
        m = s.meta
        lines.append(f"| {retention:g} | {m['alpha']:.2f} | {m['beta']:.2f} | {m['center']:.1f} | {m['floor']:.2f} | "
                     f"{m['rms_residual']:.3f} | {' '.join(f'{k:.2f}' for k in s.keep)} |")

    context = {"model": results.context["model"], "dataset": "testbed test", "num_questions": results.num_questions}
    sweep = to_markdown(results.rows, context).splitlines()
    lines += ["", *("#" + line if line.startswith("#") else line for line in sweep), ""]
    lines += [_figure(shown[name]) + "\n" for name in ("accuracy_vs_flops.png", "retention_per_layer.png")
              if name in shown]

    lines += ["## Table I: 3D grounding and dense captioning", ""]
    if not results.tasks:
        lines += [f"Table I: {results.tasks_note}.", ""]
    else:
        lines += ["The same configurations on seeded subsets of the testbed's grounding and captioning test sets "
                  "(`adatoken eval --dataset testbed-grounding|testbed-captioning` runs the whole sets).", ""]
        for rows, _ in results.task_summaries.values():
            lines += [("#" + line if line.startswith("#") else line) for line in task_tables(rows)]
        lines += [""]

    lines += ["## Prefill speed", ""]
    if not results.bench:
        lines += ["Not measured in this run (--skip-bench).", ""]
    else:
        lines += ["Prefill of one question (batch 1, the KV cache on, logits of the last position, as `generate` "
                  "runs it), each configuration timed once per round in rotating order after a warm-up round; "
                  "medians, ratios within the run (`adatoken bench`'s method). The LLaVA-3D-proportioned model has "
                  "random weights and runs adatoken3d on its eq.-5 curve, since the fitted schedules have the "
                  "testbed's depth.", ""]
        for label, result in results.bench.items():
            lines += [f"### {label}", "", bench_table(result)]
        lines += [_figure(shown["speedup_vs_flops.png"]), ""]
    return "\n".join(lines)


def to_json(results: DemoResults, figures: list[Path]) -> dict:
    rows, metrics = results.summary
    return {
        "format": REPORT_FORMAT, "context": results.context, "stages": results.stages, "reading": results.reading,
        "flow": results.flow.to_json(),
        "schedules": {f"{r:g}": s.to_json() for r, s in sorted(results.schedules.items())},
        "fit_errors": {f"{r:g}": why for r, why in sorted(results.fit_errors.items())},
        "eval": {"rows": [asdict(r) for r in rows], "metrics": metrics,
                 "kept_per_layer": {f"{r:g}": by_method for r, by_method in results.kept_per_layer.items()}},
        "tasks": {task: {"rows": [asdict(r) for r in rows], "metrics": metrics}
                  for task, (rows, metrics) in results.task_summaries.items()},
        "tasks_note": results.tasks_note,
        "bench": results.bench,
        "figures": [p.name for p in figures],
    }


def write(out: str | Path, results: DemoResults, figures: list[Path]) -> list[Path]:
    """report.md and report.json in `out`, around the figures drawn there; returns every path (report.md first)."""
    out = Path(out)
    paths = [out / "report.md", out / "report.json"]
    write_text_atomic(paths[0], to_report_markdown(results, figures))
    write_json_atomic(paths[1], to_json(results, figures), indent=1)
    return paths + figures

