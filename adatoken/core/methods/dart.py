"""DART (Wen et al., 2025, "Stop Looking for Important Tokens ... Duplication Matters More"): at layer K, keep
the image tokens least like a few pivot tokens, so that what survives is not duplicated.

As its released code selects (ZichenWen1/DART @ 5a19452f, llava/model/language_model/modeling_llama_self.py;
`selection.dart_keep` has the line-by-line account): before layer K runs (:337; K = 2, model_vqa_loader.py:172),
pivots are the 4 image tokens and the 4 text tokens after the image whose layer-(K-1) keys have the largest
L1 norm (:419-428); for each pivot the `per_pivot` image tokens least cosine-similar to it, in the final norm of
layer K's input (:340-341, 436), are kept. per_pivot = max_num_trunction // 8 (:409; 128 in its scripts), so
4 + 8·per_pivot image tokens stay (132 of LLaVA-1.5's 576). Kept tokens keep their original positions (:359).
Here max_num_trunction is `keep`·N (default 128/576), or solved from `retention` as FastV's drop is. The
released code handles one image span in a batch of one: here the image tokens are a sample's spatial tokens,
the text after them its prompt tokens after its last spatial token up to the last instruction token (the
prompt of a `generate` call, with or without a cache), and positions are counted without padding, so a sample
selects the same in any batch.
"""
from dataclasses import dataclass

import torch

from adatoken.core import selection
from adatoken.core.methods import Method, RankContext, check_layer, one_budget, register
from adatoken.core.schedule import Schedule


@register
class DART(Method):
    name = "dart"
    role = "baseline"
    style = ("C1", "P")  # colour and marker in every figure
    uses_previous_input = True  # the pivots' keys are layer K-1's

    @dataclass
    class Config:
        layer: int = 2
        keep: float | None = None  # max_num_trunction / N: 128 of LLaVA-1.5's 576 in its scripts
        retention: float | None = None
        image_pivots: int = 4
        text_pivots: int = 4

        def __post_init__(self):
            self.keep = one_budget("dart", "keep", self.keep, self.retention, default=128 / 576)
            for name in ("layer", "image_pivots", "text_pivots"):
                value = getattr(self, name)
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ValueError(f"dart {name} must be an integer >= 1, got {value!r}")

    def schedule(self, num_layers: int) -> Schedule:
        K = self.config.layer
        check_layer("dart layer", K, num_layers)
        keep = self.config.keep
        if keep is None:
            keep = (self.config.retention * num_layers - K) / (num_layers - K)
            if keep < 0:
                raise ValueError(f"dart cannot reach retention {self.config.retention} with layer={K} in "
                                 f"{num_layers} layers: the lowest it reaches is {K / num_layers:.4f}")
        return Schedule([1.0] * K + [keep] * (num_layers - K), {"method": "dart", "layer": K, "keep": keep})

    def counts(self, schedule: Schedule, num_spatial: int) -> list[int]:
        return [num_spatial if keep == 1.0 else self._kept(round(num_spatial * keep), num_spatial)
                for keep in schedule.keep]

    def _kept(self, truncation: int, num_spatial: int) -> int:
        """4 image pivots + per_pivot for each of the 8 pivots (:409, 429-445), at most every token."""
        c = self.config
        return min(num_spatial, c.image_pivots + (c.image_pivots + c.text_pivots) * self._per_pivot(truncation))

    def _per_pivot(self, truncation: int) -> int:
        return truncation // (self.config.image_pivots + self.config.text_pivots)

    def score(self, ctx: RankContext) -> torch.Tensor:
        c = self.config
        before = ctx.previous
        keys = before.head_keys()  # as layer K-1's attention projected them (:419 reads its key_states)
        # rotated at the positions the sample has alone (a key's L1 norm, unlike attention, depends on where
        # RoPE puts it, and a left-padded row's positions may count its padding)
        cos, sin = (before.cos, before.sin) if before.rope_at is None else \
            before.rope_at((before.valid.long().cumsum(1) - 1).clamp(min=0))
        key_l1 = _rotated_l1(keys, cos.float()[:, :, None], sin.float()[:, :, None])          # [B, L]
        states = ctx.final_norm(ctx.hidden)
        scores = torch.zeros(ctx.candidates.shape, device=ctx.hidden.device)
        for b, target in enumerate(ctx.target):
            slots = ctx.valid[b].nonzero().flatten()  # real tokens in order; their rank = position without padding
            rows = slice(None) if len(slots) == ctx.valid.shape[1] else slots  # no padding: views, not copies
            spatial = ctx.candidates[b, rows]
            last_spatial = int(spatial.nonzero().max()) if bool(spatial.any()) else len(slots)
            query = int((slots == ctx.query_slot[b]).nonzero())
            image = spatial.nonzero().flatten().tolist()
            text = list(range(last_spatial + 1, query + 1))  # the prompt after the image, not answer tokens
            per_pivot = (target - min(c.image_pivots, len(image))) // (c.image_pivots + c.text_pivots)
            kept = selection.dart_keep(states[b, rows], key_l1[b, rows], image, text, per_pivot=per_pivot,
                                       image_pivots=c.image_pivots, text_pivots=c.text_pivots)
            # the kept set first; then (only if the count asks for more, with fewer text pivots than configured)
            # the tokens whose keys have the largest L1 norm
            sample_l1 = key_l1[b, rows]
            scores[b, slots] = sample_l1 / (1 + sample_l1.max())
            scores[b, slots[kept]] = 2.0
        return scores


def _rotated_l1(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Σ |RoPE(k)| over heads and dims, for keys [B, L, H, hd] (rotate-half), without building the rotated keys."""
    half = keys.shape[-1] // 2
    lo, hi, cos, sin = keys[..., :half], keys[..., half:], cos[..., :half], sin[..., :half]
    return (lo * cos - hi * sin).abs().sum((-1, -2)) + (hi * cos + lo * sin).abs().sum((-1, -2))
