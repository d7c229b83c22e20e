"""Files adatoken writes (adatoken.core.artifacts): atomic writes, and every saved JSON artifact round-trips and
refuses a missing file, bad JSON, another format or a missing field with an error naming the file and what it
expected."""
import json
import re

import numpy as np
import pytest

import adatoken
from adatoken.calibration.flow import FlowParams, FlowReport
from adatoken.calibration.sweep import SweepResult
from adatoken.core.artifacts import write_atomic, write_json_atomic
from adatoken.core.schedule import Schedule


def _flow_report() -> FlowReport:
    layers = 3
    return FlowReport(params=FlowParams(), model={"model_type": "llama", "num_layers": layers}, num_samples=1,
                      group_tokens=np.array([5.0, 40.0, 7.0, 6.0]), group_attention=np.full((layers, 4, 4), 0.25),
                      lambda_stats={"redundant_share": np.array([0.1, 0.2, 0.3])}, s_self=np.array([0.5, 0.4, 0.3]),
                      f3d=np.array([0.5, 0.45, 0.375]), s_cross=np.array([0.3, 0.2, 0.1]),
                      inf=np.array([2.1, 1.9, 1.6]))


# class, a saved instance, a field its JSON cannot do without
ARTIFACTS = [
    pytest.param(Schedule, lambda: Schedule([1.0, 1.0, 0.5], meta={"method": "test"}), "keep", id="schedule"),
    pytest.param(FlowReport, _flow_report, "params", id="flow"),
    pytest.param(SweepResult, lambda: SweepResult("fastv", "kl", "KL", False, [1, 3], [0.0, 0.5], 0.0,
                                                  [[0.0, 0.1], [0.0, 0.2]]), "ranking", id="sweep"),
    pytest.param(adatoken.PruneConfig, lambda: adatoken.PruneConfig("pdrop", layers=(2, 4), ratio=0.5), "method",
                 id="prune_config"),
]


@pytest.mark.parametrize("cls, make, field", ARTIFACTS)
def test_save_load_round_trip_with_the_format_tag(cls, make, field, tmp_path):
    artifact = make()
    path = artifact.save(tmp_path / "artifact.json")
    data = json.loads(path.read_text())
    assert data == artifact.to_json() == {"format": cls.FORMAT, **artifact.to_dict()}
    assert "format" not in artifact.to_dict() and field in data
    assert cls.load(path).to_json() == data
    assert not list(tmp_path.glob("*.tmp*"))  # the temporary file was renamed into place


@pytest.mark.parametrize("cls, make, field", ARTIFACTS)
@pytest.mark.parametrize("damage", ["missing file", "bad JSON", "other format", "no format", "not an object",
                                    "missing field"])
def test_load_names_the_file_and_what_it_expected(cls, make, field, damage, tmp_path):
    path = tmp_path / "artifact.json"
    data = make().to_json()
    if damage == "missing file":
        with pytest.raises(FileNotFoundError, match=re.escape(f"{cls.KIND} ({cls.FORMAT}) not found: {path}")):
            cls.load(path)
        return
    if damage == "bad JSON":
        path.write_text(json.dumps(data)[:-2])
        expected = f"{path}: not valid JSON .*; expected a {cls.KIND} \\({re.escape(cls.FORMAT)}\\)"
    elif damage in ("other format", "no format", "not an object"):
        other = {"other format": {**data, "format": "adatoken.elsewhere/v1"},
                 "no format": {k: v for k, v in data.items() if k != "format"}, "not an object": [data]}[damage]
        path.write_text(json.dumps(other))
        expected = re.escape(f"{path}: not a {cls.KIND}: expected a JSON object with format {cls.FORMAT!r}")
    else:
        del data[field]
        path.write_text(json.dumps(data))
        expected = re.escape(f"{path}: not a valid {cls.KIND} (") + f".*'{field}'"
    with pytest.raises(ValueError, match=expected):
        cls.load(path)


@pytest.mark.parametrize("cls, tag", [(Schedule, "adatoken.schedule/v1"), (FlowReport, "adatoken.flow/v1"),
                                      (SweepResult, "adatoken.sweep/v1"),
                                      (adatoken.PruneConfig, "adatoken.prune_config/v1")])
def test_format_tags_stay_what_saved_files_say(cls, tag):
    assert cls.FORMAT == tag  # a new tag would refuse every file saved under the old one


def test_a_schedule_saved_by_adatoken_0_1_loads(tmp_path):
    path = tmp_path / "schedule.json"
    path.write_text('{"format": "adatoken.schedule/v1", "num_layers": 4, "retention": 0.6875,\n'
                    ' "keep": [1.0, 1.0, 0.5, 0.25], "meta": {"method": "adatoken3d-fit", "alpha": 0.8}}\n')
    schedule = Schedule.load(path)
    assert schedule.keep == [1.0, 1.0, 0.5, 0.25] and schedule.meta["alpha"] == 0.8


def test_an_interrupted_write_leaves_the_old_file(tmp_path):
    path = write_json_atomic(tmp_path / "result.json", {"version": 1})

    def crash(tmp):
        tmp.write_text('{"version": 2, "half of it')
        raise KeyboardInterrupt  # a kill mid-write

    with pytest.raises(KeyboardInterrupt):
        write_atomic(path, crash)
    assert json.loads(path.read_text()) == {"version": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]  # no temporary file left behind
