"""Figures write non-empty PNGs: the flow report's three (with and without a fitted schedule) and the sweep's."""
import pytest

from adatoken.calibration import plots
from adatoken.calibration.fit import fit_schedule
from adatoken.calibration.flow import analyze
from adatoken.calibration.sweep import sweep
from tiny_models import build_model, flow_sample

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _is_png(path) -> bool:
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG_SIGNATURE


@pytest.fixture(scope="module")
def report():
    model = build_model("llama", "sdpa")
    return analyze(model, [flow_sample(model, "llama", seed=0), flow_sample(model, "llama", seed=1, answer=False)],
                   progress=False)


def test_flow_figures_are_pngs(report, tmp_path):
    schedule = fit_schedule(report.inf, report.num_layers, retention=0.5)
    paths = plots.plot_report(report, tmp_path / "figures", schedule)
    assert [p.name for p in paths] == ["group_attention.png", "information_flow.png", "redundancy.png"]
    assert all(_is_png(p) for p in paths)
    assert _is_png(plots.plot_information_flow(report, tmp_path / "no_schedule.png"))


def test_sweep_figure_is_png(tmp_path):
    model = build_model("llama", "sdpa")
    result = sweep(model, [flow_sample(model, "llama")], layers=[1, 3], drop_ratios=[0.0, 0.5], progress=False)
    assert _is_png(plots.plot_sweep(result, tmp_path / "sweep.png"))
