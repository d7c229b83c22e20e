"""FastV (Chen et al., ECCV 2024): after layer K, drop a fraction R of the image tokens, once.

Ranked by the attention each spatial token receives (softmax, mean over heads and query rows),
recomputed from layer K's own q and k so it works under sdpa. Paper defaults: K = 2, R = 50 %.
Given `retention` instead of `drop_ratio`, R is solved from mean keep = (K + (L − K)(1 − R)) / L.
"""
from dataclasses import dataclass

from adatoken import scoring
from adatoken.methods import Method, RankContext, check_fraction, check_layer, register
from adatoken.schedule import Schedule


@register
class FastV(Method):
    name = "fastv"

    @dataclass
    class Config:
        layer: int = 2
        drop_ratio: float | None = None
        retention: float | None = None

        def __post_init__(self):
            if self.drop_ratio is not None and self.retention is not None:
                raise ValueError("fastv takes drop_ratio or retention, not both")
            if self.drop_ratio is None and self.retention is None:
                self.drop_ratio = 0.5
            check_fraction("drop_ratio", self.drop_ratio, low_open=False)
            check_fraction("retention", self.retention)
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
        batch, length, _ = ctx.normed.shape
        head_dim = w_q.shape[0] // ctx.num_heads
        x = ctx.normed.float()
        q = x @ w_q.float().T + (b_q.float() if b_q is not None else 0)
        k = x @ w_k.float().T + (b_k.float() if b_k is not None else 0)
        q = scoring.apply_rope(q.view(batch, length, -1, head_dim).transpose(1, 2), ctx.cos[:, None].float(), ctx.sin[:, None].float())
        k = scoring.apply_rope(k.view(batch, length, -1, head_dim).transpose(1, 2), ctx.cos[:, None].float(), ctx.sin[:, None].float())
        query_position = ctx.positions.gather(1, ctx.query_slot[:, None])
        rows = ctx.valid & (ctx.positions <= query_position)  # the prompt's rows, not answer tokens
        return scoring.attention_received(q, k, ctx.valid, rows, ctx.positions, ctx.scaling)
