"""The lower ends of pyproject's dependency ranges, in .venv-legacy (tests_legacy/requirements.lock pins
them): the env runs exactly those versions, and what the core tests here leave out works on them: the
schedule fit (scipy), figures (matplotlib), the shipped testbed checkpoint (safetensors, tokenizers), and
EM without the optional `eval` extra (pycocoevalcap is not installed here)."""
from importlib.metadata import requires, version

import numpy as np
import pytest
from packaging.requirements import Requirement
from packaging.version import Version

import adatoken


def test_env_runs_the_stated_lower_bounds():
    for req in map(Requirement, requires("adatoken")):
        if req.marker is not None or req.name == "torch":  # extras; torch: one CPU build on these machines
            continue
        lower = [Version(s.version) for s in req.specifier if s.operator == ">="]
        assert lower == [Version(version(req.name))], f"{req}: this env has {version(req.name)}"


def test_schedule_fit_and_figure(tmp_path):
    from adatoken.calibration.plots import plot_retention_per_layer
    inf = np.exp(-np.arange(32) / 6.0) + 0.05 * np.cos(np.arange(32))
    schedule = adatoken.fit_schedule(inf, 32, retention=0.4)
    assert np.mean(schedule.keep) == pytest.approx(0.4) and schedule.keep[:2] == [1.0, 1.0]
    path = plot_retention_per_layer({0.4: {"adatoken3d": list(schedule.keep)}}, tmp_path / "r.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_shipped_testbed_checkpoint_loads():
    from adatoken.testbed import model as testbed_model
    assert type(testbed_model.load()).__name__ == "TestbedModel"


def test_em_without_the_eval_extra():
    import adatoken.eval
    with pytest.raises(ModuleNotFoundError):
        import pycocoevalcap  # noqa: F401  (this env leaves the extra out on purpose)
    result = adatoken.eval.score(["The chair.", "two"], [["chair"], ["2"]], ngram=False)
    assert result["em"] == 1.0
    with pytest.raises(ImportError, match=r'pip install "adatoken\[eval\]"'):
        adatoken.eval.score(["chair"], [["chair"]])
