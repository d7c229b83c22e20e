"""FastV (Chen et al., ECCV 2024): at layer K, drop a fraction R of the image tokens, once.

As its released code selects (pkunlp-icler/FastV @ d1659729, the in-place branch of
src/transformers/src/transformers/models/llama/modeling_llama.py:736-760): inside the layer loop, at
idx == K, the attention weights layer K-1 returned (`layer_outputs[1]`, :738) are averaged over heads, the
last token's row is read at the image columns, the top `round(N·(1 − R))` are kept (the count the script
passes, (1-R)·N, eval_aokvqa_latency_fastv_inplace.sh:7; `round` as its llava-hf version computes it,
src/FastV/llava-hf/.../modeling_llama.py:1048), sorted, at their original positions (:756). Here layer
K-1's attention row is recomputed from layer K-1's own input and the keys its attention projected (caught as
k_proj returned them; the last token's query: norm -> q -> q norm where present; RoPE -> softmax over the
causal row, fp32), so it needs no attention weights and works under sdpa.
Paper defaults: K = 2, R = 50 %. Given `retention` instead of `drop_ratio`, R is solved from
mean keep = (K + (L - K)(1 - R)) / L.

Variant (ours): ranking="own_layer" ranks with layer K's own input instead of layer K-1's.
"""
from dataclasses import dataclass

import torch

from adatoken.core import scoring
from adatoken.core.methods import Method, RankContext, check_choice, check_layer, one_budget, register
from adatoken.core.schedule import Schedule


@register
class FastV(Method):
    name = "fastv"
    role = "baseline"
    style = ("C0", "o")  # colour and marker in every figure

    @dataclass
    class Config:
        layer: int = 2
        drop_ratio: float | None = None
        retention: float | None = None

        ranking: str = "previous_layer"  # as released; "own_layer": our variant

        def __post_init__(self):
            self.drop_ratio = one_budget("fastv", "drop_ratio", self.drop_ratio, self.retention, default=0.5)
            check_choice("fastv", "ranking", self.ranking, ("previous_layer", "own_layer"))
            if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 1:
                raise ValueError(f"fastv layer must be an integer >= 1, got {self.layer!r}")

    def __init__(self, config):
        super().__init__(config)
        # as released: layer K's drop reads layer K-1's input and the keys its attention projected
        self.uses_previous_input = config.ranking == "previous_layer"

    def counts(self, schedule: Schedule, num_spatial: int) -> list[int]:
        return [round(num_spatial * keep) for keep in schedule.keep]

    def drop_ratio(self, num_layers: int) -> float:
        K = self.config.layer
        check_layer("fastv layer", K, num_layers)
        if self.config.drop_ratio is not None:
            return self.config.drop_ratio
        ratio = (1.0 - self.config.retention) * num_layers / (num_layers - K)
        if ratio > 1.0:
            raise ValueError(
                f"fastv cannot reach retention {self.config.retention} with layer={K} in {num_layers} layers: "
                f"the lowest it reaches is {K / num_layers:.4f}; lower `layer` or raise retention"
            )
        return ratio

    def schedule(self, num_layers: int) -> Schedule:
        K, ratio = self.config.layer, self.drop_ratio(num_layers)
        keep = [1.0] * K + [1.0 - ratio] * (num_layers - K)
        return Schedule(keep, {"method": "fastv", "layer": K, "drop_ratio": ratio})

    def score(self, ctx: RankContext):
        return attention_score(ctx.previous if self.uses_previous_input else ctx)


def attention_score(ctx: RankContext):
    """The softmax attention the last instruction token pays each token, averaged over heads, from the
    input `ctx` describes (FastV's and PyramidDrop's released ranking)."""
    w_q, b_q, _, _ = ctx.qk_weights
    batch = ctx.normed.shape[0]
    head_dim = w_q.shape[0] // ctx.num_heads
    rows = torch.arange(batch, device=ctx.normed.device)
    q = scoring.project_heads(ctx.normed[rows, ctx.query_slot], w_q, b_q, head_dim, ctx.qk_norms[0])
    k = ctx.head_keys()
    cos, sin = ctx.cos.float(), ctx.sin.float()
    q = scoring.apply_rope(q, cos[rows, ctx.query_slot][:, None], sin[rows, ctx.query_slot][:, None])
    k = scoring.apply_rope(k.transpose(1, 2), cos[:, None], sin[:, None])
    query_position = ctx.positions.gather(1, ctx.query_slot[:, None])
    key_ok = ctx.valid & (ctx.positions <= query_position)  # causal: not the answer tokens after it
    return scoring.last_token_attention(q, k, key_ok, ctx.scaling)
