"""AdaToken-3D's budgets, defaults and calibration warnings (issue: AdaToken-3D as published and released)."""
import warnings

import numpy as np
import pytest

import adatoken
from adatoken.calibration.fit import fit_schedule
from adatoken.core.schedule import endpoint_schedule
from adatoken.eval.runner import load_schedules, sweep_configs


@pytest.mark.parametrize("final_keep", [0.1, 0.2, 0.4])
@pytest.mark.parametrize("num_layers", [12, 32])
def test_final_keep_schedules_end_at_their_budget(final_keep, num_layers):
    generic = adatoken.PruneConfig("adatoken3d", final_keep=final_keep).build().schedule(num_layers)
    assert generic.keep[:2] == [1.0, 1.0] and generic.final_keep == pytest.approx(final_keep)
    assert all(a >= b for a, b in zip(generic.keep, generic.keep[1:]))
    inf = np.exp(-0.2 * np.arange(num_layers)) + 0.05 * np.cos(np.arange(num_layers))
    fitted = fit_schedule(inf, num_layers, final_keep=final_keep)
    assert fitted.final_keep == pytest.approx(final_keep) and fitted.keep[:2] == [1.0, 1.0]
    assert all(a >= b for a, b in zip(fitted.keep, fitted.keep[1:]))


def test_endpoint_curve_is_eq5_through_both_ends():
    schedule = endpoint_schedule(32, 0.2, beta=0.25, first_layer=2)
    meta = schedule.meta
    i = np.arange(32)
    curve = meta["alpha"] * np.exp(-meta["beta"] * (i - meta["center"])) + meta["floor"]
    np.testing.assert_allclose(schedule.keep[2:], curve[2:], atol=1e-12)
    assert curve[1] == pytest.approx(1.0) and curve[31] == pytest.approx(0.2)


def test_uncalibrated_adatoken3d_warns_once_and_says_how_to_calibrate():
    with pytest.warns(UserWarning, match="without a fitted schedule.*adatoken analyze.*adatoken fit"):
        adatoken.PruneConfig("adatoken3d", retention=0.4).build().schedule(12)
    schedule = endpoint_schedule(12, 0.3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        adatoken.PruneConfig("adatoken3d", schedule=schedule).build().schedule(12)
        adatoken.PruneConfig("random", retention=0.4).build().schedule(12)  # the control does not pose as the method


def test_no_layer_is_emptied_unless_asked():
    inf = np.linspace(1.0, 0.0, 32)  # a linear fall: the fitted floor is negative, the curve crosses 0
    schedule = fit_schedule(inf, 32, retention=0.1)
    assert min(schedule.keep) >= 0.01 and min(schedule.counts(100)) >= 1
    emptied = fit_schedule(inf, 32, retention=0.1, min_keep=0.0)
    assert min(emptied.counts(100)) == 0


def test_nearly_flat_flow_warns():
    with pytest.warns(UserWarning, match="nearly flat"):
        fit_schedule(1.0 + 0.01 * np.sin(np.arange(12)), 12, retention=0.5)


def test_eval_gives_the_random_control_adatoken3ds_schedule(tmp_path):
    fitted = {0.4: fit_schedule(np.exp(-0.3 * np.arange(12)), 12, retention=0.4)}
    configs = {c.key: c for c in sweep_configs(["adatoken3d", "random", "adatoken3d:released"], [0.4], 12, fitted)}
    assert configs["random@0.4"].prune.params.schedule is configs["adatoken3d@0.4"].prune.params.schedule
    generic = {c.key: c for c in sweep_configs(["adatoken3d", "random"], [0.4], 12)}
    keep = [c.prune.build().schedule(12).keep for c in generic.values()]
    assert keep[0] == keep[1]
    assert configs["adatoken3d:released@0.4"].prune.params.variant == "released"


def test_eval_final_keep_budget_runs_every_method_at_adatoken3ds_cost(tmp_path):
    configs = {c.key: c for c in sweep_configs(["none", "fastv", "random", "adatoken3d", "adatoken3d:released"],
                                               [0.1], 32, budget="final_keep")}
    assert list(configs) == ["none", "fastv@final0.1", "random@final0.1", "adatoken3d@final0.1",
                             "adatoken3d:released@final0.1"]
    ours = configs["adatoken3d@final0.1"].prune.build().schedule(32)
    assert ours.keep[-1] == pytest.approx(0.1, abs=1e-6) and configs["adatoken3d@final0.1"].label == "final 0.1"
    assert configs["random@final0.1"].prune.build().schedule(32).keep == ours.keep
    assert configs["fastv@final0.1"].prune.params.retention == pytest.approx(ours.retention, abs=1e-4)
    assert configs["adatoken3d:released@final0.1"].prune.build().schedule(32).keep[-1] == pytest.approx(0.1, abs=0.01)

    fitted = fit_schedule(np.exp(-0.1 * np.arange(32)), 32, final_keep=0.2)
    fitted.save(tmp_path / "fit.json")
    schedules = load_schedules([tmp_path], budget="final_keep")
    assert list(schedules) == [0.2]
    configs = {c.key: c for c in sweep_configs(["pdrop", "adatoken3d"], [0.2, 0.4], 32, schedules, "final_keep")}
    assert configs["adatoken3d@final0.2"].prune.params.schedule is schedules[0.2]
    assert configs["pdrop@final0.2"].prune.params.retention == pytest.approx(fitted.retention, abs=1e-4)
    assert configs["pdrop@final0.4"].skipped == configs["adatoken3d@final0.4"].skipped \
        == "no fitted schedule for final_keep 0.4 (schedules given for: 0.2)"


@pytest.mark.parametrize("params", [{"variant": "released", "alpha": 1.0}, {"final_keep": 0.2, "floor": 0.1},
                                    {"schedule": endpoint_schedule(12, 0.3), "min_keep": 0.0}])
def test_options_a_budget_would_ignore_are_refused(params):
    with pytest.raises(ValueError, match="adatoken3d ignores"):
        adatoken.PruneConfig("adatoken3d", **params)
