"""Schedules: validation, JSON, the eq.-5 curve at a budget, and the calibration fit (eqs. 5-7)."""
import math

import numpy as np
import pytest

from adatoken.calibration.fit import ALPHA_BOUNDS, BETA_BOUNDS, FLOOR_BOUNDS, fit_curve, fit_schedule, normalize_inf
from adatoken.core.schedule import Schedule, curve_schedule, exponential_curve


def realistic_inf(num_layers: int, seed: int) -> np.ndarray:
    """An INF curve shaped like the ones 3D/2D LMMs give: spatial tokens matter most in the first
    layers (layer 0 a little below its neighbour), a fast decay, a bump at mid depth, and noise."""
    rng = np.random.default_rng(seed)
    depth = np.arange(num_layers) * 32 / num_layers  # the same profile whatever the layer count
    inf = 1 + 3 * np.exp(-0.35 * depth) + 0.4 * np.exp(-(((depth - 10) / 3) ** 2)) + 0.08 * rng.normal(size=num_layers)
    inf[0] *= 0.7
    return inf


# --- Schedule ------------------------------------------------------------------------------------

def test_schedule_json_round_trip(tmp_path):
    schedule = Schedule(keep=[1.0, 1.0, 0.5, 0.25], meta={"method": "test", "alpha": 0.8})
    path = tmp_path / "schedule.json"
    schedule.save(path)
    loaded = Schedule.load(path)
    assert loaded.keep == schedule.keep
    assert loaded.meta == schedule.meta
    assert loaded.retention == pytest.approx(0.6875)
    assert loaded.counts(10) == [10, 10, 5, 3]  # 2.5 rounds half up


@pytest.mark.parametrize("keep, message", [
    ([1.0, 0.5, 0.6], "non-increasing"),
    ([0.9, 0.5], r"keep\[0\] == 1.0"),
    ([1.0, 1.2], r"\[0, 1\]"),
    ([1.0, -0.1], r"\[0, 1\]"),
    ([1.0, float("nan")], r"\[0, 1\]"),
    ([], "at least one layer"),
])
def test_bad_schedules_raise(keep, message):
    with pytest.raises(ValueError, match=message):
        Schedule(keep=keep)


def test_schedule_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        Schedule.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        Schedule.load(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="'keep' list"):
        Schedule.from_dict({"layers": [1.0]})


@pytest.mark.parametrize("num_layers, retention", [(12, 0.2), (12, 0.4), (32, 0.1), (32, 0.2), (32, 0.4), (32, 0.9)])
def test_curve_schedule_mean_equals_retention(num_layers, retention):
    schedule = curve_schedule(num_layers, retention)
    assert schedule.retention == pytest.approx(retention, abs=1e-9)
    assert schedule.keep[:2] == [1.0, 1.0]


def test_curve_schedule_infeasible_raises():
    with pytest.raises(ValueError, match="at least 0.1750"):  # 2 layers keep all, 10 keep min_keep 1 %
        curve_schedule(12, 0.1, first_layer=2)
    with pytest.raises(ValueError, match="at least 0.1667"):
        curve_schedule(12, 0.1, first_layer=2, min_keep=0.0)


# --- eq. 6 and the curve fit -----------------------------------------------------------------------

def test_normalize_inf_is_min_max():
    assert normalize_inf([2.0, 4.0, 3.0]).tolist() == [0.0, 1.0, 0.5]


@pytest.mark.parametrize("num_layers, alpha, beta, center, floor", [
    (32, 0.8, 0.3, 4.0, 0.05),
    (32, 0.8, 0.12, 9.5, -0.2),
    (12, 0.8, 0.6, 2.0, -0.1),
    (80, 0.8, 0.05, 20.0, 0.3),
])
def test_fit_curve_recovers_parameters(num_layers, alpha, beta, center, floor):
    values = exponential_curve(num_layers, alpha, beta, center, floor)
    fit = fit_curve(values)
    for got, want in [(fit.alpha, alpha), (fit.beta, beta), (fit.center, center), (fit.floor, floor)]:
        assert abs(got - want) <= 1e-3 * abs(want)
    assert fit.loss < 1e-10


def test_fit_curve_alpha_and_center_are_one_degree_of_freedom():
    # alpha·exp(-beta(i - L)) depends on alpha and L only through alpha·exp(beta·L): a curve made with
    # alpha = 1.1 is fitted exactly, but reported with alpha at the reference (0.8) and L moved to match.
    num_layers, alpha, beta, center, floor = 24, 1.1, 0.25, 3.0, 0.1
    values = exponential_curve(num_layers, alpha, beta, center, floor)
    fit = fit_curve(values)
    assert fit.alpha == 0.8
    assert fit.alpha * math.exp(fit.beta * fit.center) == pytest.approx(alpha * math.exp(beta * center), rel=1e-4)
    np.testing.assert_allclose(fit.curve(num_layers), values, atol=1e-5)
    # asking for the reference the curve was made with gives every parameter back
    fit = fit_curve(values, alpha=1.1)
    assert (fit.alpha, fit.beta, fit.center, fit.floor) == pytest.approx((alpha, beta, center, floor), rel=1e-3)


def test_fit_curve_respects_bounds_on_rising_input():
    # a curve that rises with depth is not an eq.-5 decay; the fit stays inside the documented bounds
    fit = fit_curve(np.linspace(0.0, 1.0, 16))
    assert ALPHA_BOUNDS[0] <= fit.alpha <= ALPHA_BOUNDS[1]
    assert BETA_BOUNDS[0] <= fit.beta <= BETA_BOUNDS[1]
    assert 0.0 <= fit.center <= 15.0
    assert FLOOR_BOUNDS[0] <= fit.floor <= FLOOR_BOUNDS[1]


# --- the budgeted fit ------------------------------------------------------------------------------

@pytest.mark.parametrize("num_layers, first_layer", [(12, 1), (32, 2)])
@pytest.mark.parametrize("retention", [0.1, 0.2, 0.4])
@pytest.mark.parametrize("seed", [0, 1])
def test_fit_schedule_meets_retention(num_layers, first_layer, retention, seed):
    schedule = fit_schedule(realistic_inf(num_layers, seed), num_layers, retention, first_layer=first_layer)
    assert abs(schedule.retention - retention) < 1e-3
    assert schedule.keep[:first_layer] == [1.0] * first_layer
    meta = schedule.meta
    assert ALPHA_BOUNDS[0] <= meta["alpha"] <= ALPHA_BOUNDS[1]
    assert BETA_BOUNDS[0] <= meta["beta"] <= BETA_BOUNDS[1]
    assert 0.0 <= meta["center"] <= num_layers - 1
    assert FLOOR_BOUNDS[0] <= meta["floor"] <= FLOOR_BOUNDS[1]
    assert meta["slsqp"]["success"]
    # the smooth budget in SLSQP was already close to the real one (within its two soft edges, 0 and min_keep)
    assert abs(meta["floor_shift"]) < 0.015
    # the recorded parameters redraw the schedule
    curve = exponential_curve(num_layers, meta["alpha"], meta["beta"], meta["center"], meta["floor"])
    clipped = np.clip(curve, meta["min_keep"], 1)[first_layer:]  # no layer below min_keep (1 % by default)
    np.testing.assert_allclose(schedule.keep[first_layer:], clipped, atol=1e-9)


def test_fit_schedule_follows_the_curve_when_the_budget_does_not_bind():
    # INF that is exactly an eq.-5 curve, asked for the retention that curve gives by itself: the fit has
    # nothing to trade off and returns that curve (up to the smooth-clip correction of step 3).
    num_layers, first_layer = 32, 2
    inf = exponential_curve(num_layers, 0.8, 0.2, 3.0, 0.0)
    natural = np.clip(normalize_inf(inf), 0.01, 1)  # no layer below the default min_keep
    natural[:first_layer] = 1.0
    schedule = fit_schedule(inf, num_layers, float(natural.mean()), first_layer=first_layer)
    np.testing.assert_allclose(schedule.keep, natural, atol=5e-3)


def test_fit_schedule_budget_extremes():
    # at both ends of the feasible range the schedule is forced; bisection lands on it to rounding
    inf = realistic_inf(16, 0)
    everything = fit_schedule(inf, 16, 1.0)
    np.testing.assert_allclose(everything.keep, 1.0, atol=1e-12)
    assert everything.counts(2560) == [2560] * 16
    assert fit_schedule(inf, 16, 2 / 16, first_layer=2, min_keep=0.0).counts(2560) == [2560, 2560] + [0] * 14
    assert fit_schedule(inf, 16, (2 + 14 * 0.01) / 16, first_layer=2).counts(2560) == [2560, 2560] + [26] * 14


def test_fit_schedule_json_round_trip(tmp_path):
    schedule = fit_schedule(realistic_inf(12, 0), 12, 0.4)
    schedule.save(tmp_path / "fit.json")
    loaded = Schedule.load(tmp_path / "fit.json")
    assert loaded.keep == schedule.keep
    assert loaded.meta == schedule.meta
    assert loaded.meta["method"] == "adatoken3d-fit"


@pytest.mark.parametrize("kwargs, message", [
    (dict(retention=0.1), r"feasible retentions are \[0.1750, 1\]"),  # 2 of 12 layers keep everything, 10 at least 1 %
    (dict(retention=0.0), r"feasible retentions are \[0.1750, 1\]"),
    (dict(retention=-0.2), r"feasible retentions are \[0.1750, 1\]"),  # 2 layers keep all, 10 keep >= 1 %
    (dict(retention=1.5), r"feasible retentions are \[0.1750, 1\]"),
    (dict(retention=0.1, min_keep=0.0), r"feasible retentions are \[0.1667, 1\]"),
    (dict(retention=0.1, first_layer=1), None),  # the same budget is feasible from layer 1: [0.0925, 1]
    (dict(retention=0.4, first_layer=0), r"first_layer must be in \[1, 11\]"),
    (dict(retention=0.4, num_layers=10), "inf has 12 values but num_layers is 10"),
    (dict(retention=0.4, alpha=2.0), r"alpha must be in \[0.5, 1.2\]"),
    (dict(retention=0.4, smooth_lambda=-1.0), "smooth_lambda must be >= 0"),
])
def test_fit_schedule_bad_requests(kwargs, message):
    kwargs = {"inf": realistic_inf(12, 0), "num_layers": 12, **kwargs}
    if message is None:
        assert fit_schedule(**kwargs).retention == pytest.approx(kwargs["retention"], abs=1e-3)
        return
    with pytest.raises(ValueError, match=message):
        fit_schedule(**kwargs)


@pytest.mark.parametrize("inf, message", [
    ([1.0, 1.0, 1.0], "constant"),
    ([1.0, float("nan"), 0.0], "NaN or inf at layers \\[1\\]"),
    ([1.0], "at least 2"),
    ([[1.0, 0.5]], "1-D"),
])
def test_fit_schedule_bad_inf(inf, message):
    with pytest.raises(ValueError, match=message):
        fit_schedule(inf, 3, 0.5, first_layer=1)
