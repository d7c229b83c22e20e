"""FastV (Chen et al., ECCV 2024): after layer K, drop a fraction R of the image tokens, once.

Ranked as FastV's released code ranks: the softmax attention of the last instruction token over each
image token, averaged over heads (the paper's text speaks of attention received from all tokens; the
code uses the last token's row). FastV reads that row from layer K−1's attention weights; here it is
recomputed from layer K's own input (norm → q/k → q/k norms where present → RoPE), so it works under
sdpa and flash attention.
Paper defaults: K = 2, R = 50 %.
Given `retention` instead of `drop_ratio`, R is solved from mean keep = (K + (L − K)(1 − R)) / L.
"""
from dataclasses import dataclass

import torch

from adatoken.core import scoring
from adatoken.core.methods import Method, RankContext, check_layer, one_budget, register
from adatoken.core.schedule import Schedule


@register
class FastV(Method):
    name = "fastv"
    role = "baseline"

    @dataclass
    class Config:
        layer: int = 2
        drop_ratio: float | None = None
        retention: float | None = None

        def __post_init__(self):
            self.drop_ratio = one_budget("fastv", "drop_ratio", self.drop_ratio, self.retention, default=0.5)
            if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 1:
                raise ValueError(f"fastv layer must be an integer >= 1, got {self.layer!r}")

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
        w_q, b_q, w_k, b_k = ctx.qk_weights
        batch = ctx.normed.shape[0]
        head_dim = w_q.shape[0] // ctx.num_heads
        rows = torch.arange(batch, device=ctx.normed.device)
        q = scoring.project_heads(ctx.normed[rows, ctx.query_slot], w_q, b_q, head_dim, ctx.qk_norms[0])
        k = scoring.project_heads(ctx.normed, w_k, b_k, head_dim, ctx.qk_norms[1])
        cos, sin = ctx.cos.float(), ctx.sin.float()
        q = scoring.apply_rope(q, cos[rows, ctx.query_slot][:, None], sin[rows, ctx.query_slot][:, None])
        k = scoring.apply_rope(k.transpose(1, 2), cos[:, None], sin[:, None])
        query_position = ctx.positions.gather(1, ctx.query_slot[:, None])
        key_ok = ctx.valid & (ctx.positions <= query_position)  # causal: not the answer tokens after it
        return scoring.last_token_attention(q, k, key_ok, ctx.scaling)
