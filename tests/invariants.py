"""The runtime's invariants, written once for both suites: tests/ (transformers 5) and tests_legacy/
(LLaVA-3D's transformers 4.37.2, which puts this folder on sys.path in its conftest).

What is here: the method tables (keep-all settings, one pruning setting per method), which family's
counts test runs which pruning method, and the checks each suite runs on its own models and inputs:
keep-all == unpruned, kept counts == the schedule the config describes, greedy decoding with the KV
cache == recomputation without it, and the ranking == a brute force from eager attention weights.

A plain module, not a test module and not a conftest: test modules import it by name. It imports only
torch and adatoken, never a transformers class, so it loads on both stacks.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import torch

import adatoken
from adatoken.core.methods import METHODS

# Every registered method at a setting that keeps every spatial token: the model must compute what it
# computes unpruned.
KEEP_ALL = [("none", {}), ("fastv", {"drop_ratio": 0.0}), ("pdrop", {"ratio": 1.0}),
            ("adatoken3d", {"retention": 1.0}), ("random", {"retention": 1.0}), ("dart", {"keep": 1.0}),
            ("divprune", {"ratio": 1.0}), ("coverage", {"retention": 1.0})]

# Every pruning method at a setting that prunes a 6-layer decoder: method -> its parameters.
PRUNING = {
    "fastv": {"layer": 2, "drop_ratio": 0.5},
    "pdrop": {"layers": (2, 3, 4), "ratio": 0.5},
    "adatoken3d": {"retention": 0.5},
    "random": {"retention": 0.5, "seed": 3},
    "dart": {"layer": 2, "keep": 0.5, "image_pivots": 2, "text_pivots": 2},
    "divprune": {"ratio": 0.3},
    "coverage": {"retention": 0.5},
}

# Which pruning method each family's counts test runs (tests/test_families.py), one per family and each
# method on at least one family, written out so that a new method or family adds a row and never
# moves the others. test_runtime.py runs every method on LLaMA, and tests_legacy/ every method on
# LLaVA-3D's `llava_llama`.
FAMILY_METHOD = {
    "llama": "fastv",
    "qwen2": "pdrop",
    "mistral": "adatoken3d",
    "llava": "coverage",
    "llava_next": "dart",
    "llava_onevision": "divprune",
    "qwen2_vl": "adatoken3d",
    "qwen2_5_vl": "random",
    "qwen3": "dart",
}


def pruning(*methods: str) -> list:
    """pytest params (method, params) with the method as id: the named methods of PRUNING, or all of them."""
    return [pytest.param(m, PRUNING[m], id=m) for m in (methods or PRUNING)]


def check_tables_cover_every_method() -> None:
    """A method registered without a row here would go untested: refuse it."""
    assert sorted(m for m, _ in KEEP_ALL) == sorted(METHODS)
    assert sorted(PRUNING) == sorted(m for m in METHODS if m != "none")
    assert set(FAMILY_METHOD.values()) == set(PRUNING)


# --- checks ----------------------------------------------------------------------------------------------
def check_keep_all(model, logits: Callable[[], torch.Tensor]) -> None:
    """`logits()` runs the model's forward. Under every KEEP_ALL setting it equals the unpruned one,
    and after `unprune` it is bit-identical to it."""
    reference = logits()
    for method, params in KEEP_ALL:
        adatoken.prune(model, method, **params)
        torch.testing.assert_close(logits(), reference, atol=1e-5, rtol=0, msg=lambda m: f"{method}: {m}")
    adatoken.unprune(model)
    assert torch.equal(logits(), reference)


def decoder_layers(model) -> int:
    """The number of decoder layers, from the model's (text) config."""
    config = getattr(model.config, "text_config", None) or model.config
    return config.num_hidden_layers


def expected_counts(method: str, params: dict, num_layers: int, num_spatial: int) -> list[int]:
    """Spatial tokens entering each layer by the schedule the config describes and the method's own
    rounding of it (not the runtime's copy)."""
    built = adatoken.PruneConfig(method, **params).build()
    return built.counts(built.schedule(num_layers), num_spatial)


def check_counts(model, method: str, params: dict, num_spatial: int, length: int) -> None:
    """After a prefill of one sample of `length` tokens, `num_spatial` of them spatial, under `method`:
    the spatial tokens and all tokens entering each layer follow the schedule, and it did prune."""
    expected = expected_counts(method, params, decoder_layers(model), num_spatial)
    stats = adatoken.last_stats(model)
    assert [layer[0] for layer in stats.spatial_in] == expected
    assert expected[-1] < num_spatial
    assert [layer[0] for layer in stats.tokens_in] == [length - num_spatial + n for n in expected]


def grid_points(spatial: torch.Tensor) -> torch.Tensor:
    """[B, S, 3] a 3D point for each spatial token of a [B, S] mask (by its index among its row's spatial tokens:
    a 7 x 5 grid of columns, stacked, 0.5 apart), zero elsewhere: what `coverage` selects by."""
    ordinal = (spatial.long().cumsum(1) - 1).clamp(min=0)
    points = torch.stack((ordinal % 7, ordinal // 7 % 5, ordinal // 35), dim=-1).float() * 0.5
    return points * spatial[..., None]


def greedy_without_cache(model, extend: Callable[[list[int]], tuple[dict, torch.Tensor]], prompt_length: int,
                         steps: int, banned: Sequence[int] = ()) -> list[int]:
    """Greedy decoding by recomputation: each step one uncached pruned forward of the prompt and the tokens
    so far, ranked by the prompt's last token as `generate` ranks it. `extend(tokens)` gives that forward's
    kwargs and spatial mask; `banned` token ids are never chosen (pass what `generate` suppresses)."""
    tokens = []
    for _ in range(steps):
        kwargs, spatial = extend(tokens)
        with torch.no_grad(), adatoken.spatial_tokens(model, spatial, query_index=prompt_length - 1,
                                                      points=grid_points(spatial)):
            logits = model(**kwargs, use_cache=False).logits[0, -1]
        if banned:
            logits = logits.index_fill(0, torch.tensor(list(banned)), float("-inf"))
        tokens.append(int(logits.argmax()))
    return tokens


def top_by_log_attention(rows: torch.Tensor, candidates: torch.Tensor, keep: int) -> set[int]:
    """The `keep` candidates with the largest Σ_heads log attention weight from one query row ([heads, seq]
    eager weights): what Σ_heads q_t·k_j ranks (adatoken3d, pdrop), the two differing by a per-head constant."""
    logit_sum = rows.clamp_min(1e-30).log().sum(0)
    return set(candidates[logit_sum[candidates].topk(keep).indices].tolist())


def top_by_mean_attention(rows: torch.Tensor, candidates: torch.Tensor, keep: int) -> set[int]:
    """The `keep` candidates the query row attends to most, mean over heads (FastV's released ranking)."""
    received = rows.mean(0)
    return set(candidates[received[candidates].topk(keep).indices].tolist())


def kept_spatial(model, layer: int) -> set[int]:
    """The original positions of the spatial tokens that entered `layer` in the last prefill (sample 0)."""
    return set(adatoken.last_stats(model).kept_positions[layer][0])
