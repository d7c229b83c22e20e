"""`adatoken bench` end to end on the tiny shape: every row measured, infeasible configs skipped with a reason."""
import json

import pytest

from adatoken.apps import bench
from adatoken.cli import main
from adatoken.core import models


def test_bench_writes_json_and_markdown(tmp_path):
    out = tmp_path / "bench.json"
    assert main(["bench", "--shape", "tiny-6l", "--spatial", "48", "--text", "12", "--retentions", "0.2", "0.5",
                 "--new-tokens", "3", "--repeats", "1", "--batch", "1", "2", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert [r["batch"] for r in results] == [1, 2]
    rows = {row["config"]: row for row in results[0]["rows"]}
    assert set(rows) == {"none"} | {f"{m}@{r}" for m in bench.METHODS for r in ("0.2", "0.5")}
    assert "lowest it reaches" in rows["fastv@0.2"]["skipped"]  # 6 layers cannot reach 0.2 with K = 2
    measured = rows["adatoken3d@0.5"]
    for key in ("prefill_s", "ttft_s", "e2e_s", "decode_tok_s", "flops_ratio", "ranking_share", "kv_cache_bytes"):
        assert measured[key] > 0, key
    assert measured["flops_ratio"] > 1 and rows["none"]["flops_ratio"] == 1
    # the ranking is timed through the runtime's selection timer: a part of each pruned prefill, none unpruned
    assert measured["ranking_share"] < 1 and rows["none"]["ranking_share"] == 0
    # measured KV cache: each layer holds only what it kept (fp32, batch 1)
    assert measured["kv_cache_bytes"] < rows["none"]["kv_cache_bytes"]
    assert "adatoken3d@0.5" in out.with_suffix(".md").read_text()


def test_bench_times_a_checkpoint_with_its_own_weights(tmp_path):
    """`bench --checkpoint`: a saved image-text-to-text model (LLaVA-1.5) is timed as it is, its decoder pruned."""
    from tiny_models import tiny_llava_checkpoint

    tiny_llava_checkpoint(tmp_path / "llava")
    out = tmp_path / "bench.json"
    assert main(["bench", "--checkpoint", str(tmp_path / "llava"), "--spatial", "32", "--text", "12",
                 "--retentions", "0.4", "--methods", "fastv", "--new-tokens", "2", "--repeats", "1",
                 "--out", str(out)]) == 0
    [result] = json.loads(out.read_text())
    rows = {row["config"]: row for row in result["rows"]}
    assert result["shape"] == str(tmp_path / "llava") and result["config"]["model_type"] == "llava"
    assert rows["fastv@0.4"]["flops_ratio"] > 1 and rows["fastv@0.4"]["kv_cache_bytes"] < rows["none"]["kv_cache_bytes"]


def test_throughput_sizes_the_batch_from_the_measured_footprint(tmp_path):
    out = tmp_path / "throughput.json"
    assert main(["bench", "--shape", "tiny-6l", "--throughput", "--memory-budget-gb", "0.05", "--spatial", "400",
                 "--text", "12", "--retentions", "0.5", "--methods", "adatoken3d", "--new-tokens", "2",
                 "--out", str(out)]) == 0
    rows = {r["config"]: r for r in json.loads(out.read_text())["rows"]}
    # CPU resident-set peaks are too noisy to compare methods in a unit test (the GPU allocator's are
    # exact); here: every config is sized from its own measured footprint and timed at that batch.
    budget = int(0.05 * 2 ** 30)
    for row in rows.values():
        assert row["batch"] <= max(1, budget // row["per_sequence_bytes"] + 1)
        assert row["fits"] == (row["peak_bytes"] <= budget)
        assert row["tokens_per_s"] == pytest.approx(row["batch"] * 2 / row["e2e_s"])  # every sequence counted


def test_throughput_batch_is_the_largest_the_footprint_allows(monkeypatch):
    """With a footprint of 10 MB plus 3 MB per sequence, a 50 MB budget holds 13 sequences: (50 - 10) // 3."""
    def footprint(setup, new_tokens):
        return 10**7 + 3 * 10**6 * len(setup.spatial)  # the batch is the spatial mask's rows

    monkeypatch.setattr(bench, "generation_peak_bytes", footprint)
    model = models.build("tiny-6l")
    [row] = bench.throughput(model, {"adatoken3d@0.5": {"method": "adatoken3d", "retention": 0.5}}, 5 * 10**7,
                             spatial=48, text=12, new_tokens=2, device="cpu")
    assert row["batch"] == 13 and row["per_sequence_bytes"] == 3 * 10**6
    assert row["peak_bytes"] == 49 * 10**6 and row["fits"]
    assert row["tokens_per_s"] == pytest.approx(13 * 2 / row["e2e_s"])
