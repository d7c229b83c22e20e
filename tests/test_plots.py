"""Figures write non-empty PNGs, and the analyze → fit → sweep commands write their JSON and figures."""
import argparse
import json

import pytest

from adatoken import calibrate_cli, plots
from adatoken.flow import analyze
from adatoken.schedule import Schedule, fit_schedule
from adatoken.sweep import sweep
from conftest import build_model
from test_flow import _sample

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _is_png(path) -> bool:
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG_SIGNATURE


@pytest.fixture(scope="module")
def report():
    model = build_model("llama", "sdpa")
    return analyze(model, [_sample(model, "llama", seed=0), _sample(model, "llama", seed=1, answer=False)],
                   progress=False)


def test_flow_figures_are_pngs(report, tmp_path):
    schedule = fit_schedule(report.inf, report.num_layers, retention=0.5)
    paths = plots.plot_report(report, tmp_path / "figures", schedule)
    assert [p.name for p in paths] == ["group_attention.png", "information_flow.png", "redundancy.png"]
    assert all(_is_png(p) for p in paths)
    assert _is_png(plots.plot_information_flow(report, tmp_path / "no_schedule.png"))


def test_sweep_figure_is_png(tmp_path):
    model = build_model("llama", "sdpa")
    result = sweep(model, [_sample(model, "llama")], layers=[1, 3], drop_ratios=[0.0, 0.5], progress=False)
    assert _is_png(plots.plot_sweep(result, tmp_path / "sweep.png"))


def _cli(*argv):
    parser = argparse.ArgumentParser(prog="adatoken")
    calibrate_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    assert args.func(args) == 0


def test_cli_analyze_fit_sweep(tmp_path, capsys):
    small = ["--num-samples", "1", "--spatial-tokens", "24", "--device", "cpu", "--quiet", "--out", str(tmp_path)]
    _cli("analyze", "--model", "tiny-qwen2", "--chunk-size", "10", *small)
    flow = json.loads((tmp_path / "flow.json").read_text())
    assert flow["num_layers"] == 12 and flow["num_samples"] == 1
    assert all(_is_png(tmp_path / name) for name in ("group_attention.png", "information_flow.png", "redundancy.png"))

    _cli("fit", str(tmp_path / "flow.json"), "--retention", "0.4")
    schedule = Schedule.load(tmp_path / "schedule.json")
    assert schedule.retention == pytest.approx(0.4) and _is_png(tmp_path / "schedule.png")

    _cli("sweep", "--model", "tiny-llama", "--layers", "3", "--drop-ratios", "0", "0.5", *small)
    result = json.loads((tmp_path / "sweep.json").read_text())
    assert result["layers"] == [3] and len(result["metric"][0]) == 2 and _is_png(tmp_path / "sweep.png")
    assert "redundancy" in capsys.readouterr().out


def test_testbed_source_puts_the_answer_after_the_last_instruction_token(monkeypatch):
    from adatoken.testbed import model as testbed_model
    from adatoken.testbed.tokenizer import build_tokenizer

    # no checkpoint ships yet: an untrained testbed stands in for testbed.load()
    monkeypatch.setattr(testbed_model, "load", lambda path=None: testbed_model.TestbedModel.create().eval())
    args = argparse.Namespace(model="testbed", model_path=None, num_samples=2, device="cpu", dtype="float32")
    source = calibrate_cli.load_source(args)
    assert source.model.config.model_type == "llama" and len(source.samples) == 2
    table = source.model.get_input_embeddings().weight
    token_at = lambda embeds, i: int((table - embeds[i]).abs().sum(1).argmin())  # noqa: E731
    colon, eos = build_tokenizer().convert_tokens_to_ids([":", "</s>"])
    for sample in source.samples:
        embeds = sample.inputs["inputs_embeds"][0]
        assert int(sample.spatial_mask[0].nonzero().max()) < sample.query_index < embeds.shape[0] - 1
        assert token_at(embeds, sample.query_index) == colon  # "ASSISTANT:" ends the instruction
        assert token_at(embeds, -1) == eos                   # the answer, then </s>


def test_model_path_loads_a_local_checkpoint(tmp_path):
    build_model("qwen2").save_pretrained(tmp_path / "checkpoint")
    args = argparse.Namespace(model="tiny-llama", model_path=tmp_path / "checkpoint", num_samples=1, spatial_tokens=8,
                              seed=0, device="cpu", dtype="float32", attn="sdpa")
    source = calibrate_cli.load_source(args)
    assert source.model.config.model_type == "qwen2" and source.model.config._attn_implementation == "sdpa"
    assert int(source.samples[0].spatial_mask.sum()) == 8
    with pytest.raises(ValueError, match="local checkpoint directory"):
        calibrate_cli.load_source(argparse.Namespace(**{**vars(args), "model_path": tmp_path / "missing"}))
