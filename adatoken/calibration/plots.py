"""Figures of the calibration: attention by token group, information flow and schedule, redundancy, sweep.

Each function draws one PNG and returns its path. Figures are built with matplotlib's object API
(`Figure`, rendered by Agg), never pyplot, so plotting touches no global state and needs no display.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from adatoken.calibration.fit import normalize_inf
from adatoken.calibration.flow import GROUPS, FlowReport
from adatoken.calibration.sweep import SweepResult
from adatoken.core.artifacts import write_atomic
from adatoken.core.methods import METHODS, Method
from adatoken.core.schedule import Schedule, exponential_curve

GROUP_COLOURS = {"system": "#7f7f7f", "spatial": "#1f77b4", "prompt": "#ff7f0e", "answer": "#2ca02c"}
DPI = 130


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=DPI))


def _legend_below(ax) -> None:
    """A legend under the panel, where it cannot cover the data."""
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.18), frameon=False)


def _layer_axis(ax, num_layers: int) -> None:
    ax.set_xlabel("decoder layer")
    ax.set_xlim(-0.5, num_layers - 0.5)
    step = max(1, num_layers // 8)
    ax.set_xticks(range(0, num_layers, step))


def plot_group_attention(report: FlowReport, path: str | Path) -> Path:
    """The paper's Fig. 2B: for each query group, the share of its attention going to each group, per layer."""
    layers = np.arange(report.num_layers)
    present = [g for g in range(len(GROUPS)) if not np.isnan(report.group_attention[:, g, 0]).all()]
    fig = Figure(figsize=(3.6 * len(present) + 1.2, 3.6), layout="constrained")
    axes = fig.subplots(1, len(present), sharey=True, squeeze=False)[0]
    for ax, g in zip(axes, present):
        shares = np.nan_to_num(report.group_attention[:, g, :])
        ax.stackplot(layers, shares.T, labels=GROUPS, colors=[GROUP_COLOURS[n] for n in GROUPS], alpha=0.85)
        ax.set_title(f"{GROUPS[g]} tokens attend to … (≈{report.group_tokens[g]:.0f} tokens)", fontsize=10)
        ax.set_ylim(0, 1)
        _layer_axis(ax, report.num_layers)
        ax.set_xlim(0, report.num_layers - 1)  # an area plot has no bars to centre on the layer ticks
    axes[0].set_ylabel("share of attention (mean over heads, tokens)")
    axes[-1].legend(title="key group", loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=9)
    fig.suptitle(f"Attention between token groups per layer ({report.num_samples} samples)")
    return _save(fig, path)


def plot_information_flow(report: FlowReport, path: str | Path,
                          schedule: Schedule | Sequence[Schedule] | None = None) -> Path:
    """Eqs. 1–4 per layer; with fitted schedules (one, or one per retention), also normalised INF with
    each eq.-5 fit and the retention per layer each schedule gives."""
    schedules = [schedule] if isinstance(schedule, Schedule) else list(schedule or [])
    layers = np.arange(report.num_layers)
    panels = 3 if schedules else 2
    fig = Figure(figsize=(4.4 * panels, 4.6 + 0.3 * max(len(schedules) - 1, 0)), layout="constrained")
    axes = fig.subplots(1, panels)
    terms, fit = axes[:2]

    terms.plot(layers, report.s_self, "o-", ms=3, label="S_self: answer → spatial (eq. 1)")
    terms.plot(layers, report.s_cross, "s-", ms=3, label="S_cross: prompt/system ↔ spatial (eq. 3)")
    terms.plot(layers, report.f3d, "^-", ms=3, label="F_3D: running S_self (eq. 2)")
    terms.set_ylabel("attention share")
    terms.set_title("Terms of the information contribution")
    _legend_below(terms)
    _layer_axis(terms, report.num_layers)

    fit.plot(layers, normalize_inf(report.inf), "o", color="black", ms=4, label="INF, min–max normalised (eqs. 4, 6)")
    colours = _schedule_colours(len(schedules))
    for colour, sched in zip(colours, schedules):
        if "beta" not in sched.meta:  # a hand-made schedule has no eq.-5 curve to draw
            continue
        m = sched.meta
        curve = exponential_curve(report.num_layers, m["alpha"], m["beta"], m["center"], m["floor"])
        fit.plot(layers, curve, "-", color=colour,
                 label=f"{_retention_label(sched, len(schedules))}α·exp(−β(i−L))+M (eq. 5)\nα={m['alpha']:.2f} "
                       f"β={m['beta']:.2f} L={m['center']:.1f} M={m['floor']:.2f}")
    fit.set_ylabel("normalised INF")
    fit.set_title("Information contribution per layer")
    _legend_below(fit)
    _layer_axis(fit, report.num_layers)

    if schedules:
        keep = axes[2]
        if len(schedules) == 1:
            keep.bar(np.arange(schedules[0].num_layers), schedules[0].keep, color=GROUP_COLOURS["spatial"], alpha=0.8,
                     label="share of spatial tokens entering the layer")
            keep.axhline(schedules[0].retention, color="black", ls="--", lw=1,
                         label=f"mean retention {schedules[0].retention:.2f}")
        else:  # several budgets: steps, so the curves stay readable on top of each other
            for colour, sched in zip(colours, schedules):
                keep.step(np.arange(sched.num_layers), sched.keep, where="mid", color=colour,
                          label=f"mean retention {sched.retention:.2f}")
        keep.set_ylim(0, 1.05)
        keep.set_ylabel("spatial tokens kept")
        keep.set_title("Fitted retention schedule" + ("s" if len(schedules) > 1 else ""))
        _legend_below(keep)
        _layer_axis(keep, schedules[0].num_layers)
    fig.suptitle(f"Information flow of spatial tokens ({report.num_samples} samples)")
    return _save(fig, path)


def _schedule_colours(count: int) -> list:
    return ["tab:red"] if count == 1 else [matplotlib.colormaps["viridis"](x) for x in np.linspace(0.1, 0.85, count)]


def _retention_label(schedule: Schedule, count: int) -> str:
    return "" if count == 1 else f"retention {schedule.retention:.2f}: "


def plot_redundancy(report: FlowReport, path: str | Path) -> Path:
    """Per layer: share of spatial tokens the answer hardly attends to, and how concentrated λ is."""
    layers = np.arange(report.num_layers)
    threshold = report.params.redundancy_threshold
    fig = Figure(figsize=(6.4, 3.8), layout="constrained")
    ax = fig.subplots()
    ax.bar(layers, report.redundant_share, color=GROUP_COLOURS["spatial"], alpha=0.8,
           label=f"redundant: λ < {threshold:.0%} of the mean spatial λ")
    ax.plot(layers, report.lambda_stats["top10_share"], "o-", color="tab:red", ms=3,
            label="share of spatial attention held by the top 10 % tokens")
    ax.axhline(report.redundancy, color="black", ls="--", lw=1, label=f"mean redundancy {report.redundancy:.0%}")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("share")
    ax.legend(fontsize=8, loc="upper left")
    _layer_axis(ax, report.num_layers)
    ax.set_title(f"Redundant spatial tokens per layer ({report.num_samples} samples)")
    return _save(fig, path)


def plot_sweep(result: SweepResult, path: str | Path) -> Path:
    """The paper's Fig. 2A: the metric against the share of spatial tokens dropped, one line per layer."""
    fig = Figure(figsize=(5.6, 3.8), layout="constrained")
    ax = fig.subplots()
    drops = 100 * np.asarray(result.drop_ratios)
    ax.axhline(result.baseline, color="black", ls="--", lw=1, label="unpruned", zorder=1)
    # hollow markers of shrinking size per layer: where lines coincide (e.g. all at the unpruned value)
    # the markers nest inside each other instead of hiding one another
    for k, (layer, values) in enumerate(zip(result.layers, result.metric)):
        ax.plot(drops, values, "osD^v"[k % 5] + "-", ms=max(11 - 2.5 * k, 3), mfc="none", mew=1.5, alpha=0.85,
                label=f"drop at layer {layer}")
    ax.set_xlabel("spatial tokens dropped at that layer (%)")
    better = "higher" if result.higher_is_better else "lower"
    ax.set_ylabel(f"{result.metric_label}\n({better} is better)")
    ax.set_xticks(drops)
    ax.set_title(f"Sensitivity to dropping spatial tokens ({result.ranking} ranking)")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_report(report: FlowReport, out_dir: str | Path,
                schedule: Schedule | Sequence[Schedule] | None = None) -> list[Path]:
    """All figures of a flow report into out_dir: group_attention.png, information_flow.png, redundancy.png."""
    out_dir = Path(out_dir)
    return [plot_group_attention(report, out_dir / "group_attention.png"),
            plot_information_flow(report, out_dir / "information_flow.png", schedule),
            plot_redundancy(report, out_dir / "redundancy.png")]


# ----- the demo's comparison figures ---------------------------------------------------------------
def method_style(method: str) -> dict:
    """One colour and marker per method (or `method:variant`) in every panel and figure, from its registration."""
    colour, marker = getattr(METHODS.get(method.split(":")[0]), "style", Method.style)
    return {"color": colour, "marker": marker}


def plot_retention_per_layer(kept: dict[float, dict[str, Sequence[float]]], path: str | Path) -> Path:
    """One panel per mean retention: for each method, the share of the input's spatial tokens that
    entered each layer (as measured, averaged over questions). kept: retention -> method -> per layer."""
    retentions = sorted(kept)
    methods = list(dict.fromkeys(m for r in retentions for m in kept[r]))
    fig = Figure(figsize=(4.2 * len(retentions) + 0.5, 3.9), layout="constrained")
    axes = fig.subplots(1, len(retentions), sharey=True, squeeze=False)[0]
    for ax, retention in zip(axes, retentions):
        for method in methods:
            shares = kept[retention].get(method)
            if shares is not None:
                ax.step(np.arange(len(shares)), shares, where="mid", lw=1.6, alpha=0.85, label=method,
                        color=method_style(method)["color"])
        ax.axhline(retention, color="black", ls="--", lw=0.8, label=f"mean over layers = {retention:g}")
        ax.set_ylim(0, 1.05)
        ax.set_title(f"retention {retention:g}", fontsize=10)
        _layer_axis(ax, max(len(s) for s in kept[retention].values()))
    axes[0].set_ylabel("share of spatial tokens entering the layer")
    handles, labels = axes[-1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", fontsize=8)
    fig.suptitle("Spatial tokens kept per layer, by method (measured)")
    return _save(fig, path)


def plot_speedup_vs_flops(results: dict[str, Sequence[dict]], path: str | Path) -> Path:
    """One panel per benchmarked model: measured prefill speedup against the analytic FLOPs ratio, each
    config a point labelled with its retention; on the diagonal, time falls exactly as FLOPs do.
    results: model label -> rows of `adatoken.apps.bench.run_sweep` (skipped rows are left out)."""
    fig = Figure(figsize=(4.6 * len(results) + 0.5, 4.2), layout="constrained")
    axes = fig.subplots(1, len(results), squeeze=False)[0]
    for ax, (label, rows) in zip(axes, results.items()):
        ran = [r for r in rows if "skipped" not in r]
        top = max([1.0] + [max(r["flops_ratio"], r["prefill_speedup"]) for r in ran]) * 1.08
        ax.plot([1, top], [1, top], color="black", ls="--", lw=0.8, label="speedup = FLOPs ratio")
        for method in dict.fromkeys(r["method"] for r in ran):
            points = [r for r in ran if r["method"] == method]
            ax.plot([r["flops_ratio"] for r in points], [r["prefill_speedup"] for r in points], ls="none", ms=7,
                    alpha=0.85, label=method, **method_style(method))
            for r in points:
                if method != "none":
                    ax.annotate(f"{r['retention']:.2g}", (r["flops_ratio"], r["prefill_speedup"]), fontsize=7,
                                textcoords="offset points", xytext=(4, -9), color="0.35")
        ax.set_xlim(0.8, top)
        ax.set_ylim(0.8, top)
        ax.set_xlabel("analytic prefill FLOPs ratio (unpruned / pruned)")
        ax.set_title(label, fontsize=10)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("measured prefill speedup (median)")
    axes[-1].legend(fontsize=8, loc="upper left")
    fig.suptitle("Prefill speedup against FLOPs saved (labels: mean retention)")
    return _save(fig, path)
