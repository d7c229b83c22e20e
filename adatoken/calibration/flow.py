"""Information-flow analysis (paper § III-A/B): where each layer's attention goes, and eqs. 1–4.

    report = adatoken.calibration.flow.analyze(model, samples)     # samples: FlowSample, one forward each
    report.save("flow.json"); print(report.table())
    schedule = adatoken.fit_schedule(report.inf, report.num_layers, retention=0.4)

How it is measured. A forward pre-hook on every decoder layer takes the layer's input and recomputes
that layer's attention rows from its own weights: input_layernorm → q_proj / k_proj → RoPE as the layer
applies it (`Adapter.layer_rope`: the `position_embeddings` it receives, or, on transformers 4.37, its
`position_ids`) → scaled logits, causal and padding mask → softmax, in fp32.
Rows are computed `chunk_size` query tokens at a time and reduced at once to
  - group sums: for each query row, the attention mass on each token group (system, spatial, prompt,
    answer; `adatoken.core.layout.GROUPS`), averaged over heads, summed per query group;
  - λ sums: the attention each token receives from the λ rows (below), averaged over heads.
So memory stays at one chunk, O(batch · heads · chunk · tokens), never layers × heads × tokens²,
and the model may run under sdpa or flash attention: it is never asked for attention weights.

Definitions (every number is a mean over heads first, then over samples):
  - group_attention[i, g, h]: in layer i, the attention a token of group g pays to all tokens of
    group h, averaged over the tokens of g. Each row with tokens sums to 1 (padding receives none).
  - λ_j(i) (the paper's λ): the attention spatial token j receives in layer i from the answer tokens,
    averaged over them; from the last instruction token when the sample has no answer tokens.
  - eq. 1  S_self(i)  = Σ_j λ_j(i): the share of the answer's attention that lands on spatial tokens.
  - eq. 2  F_3D(i)    = σ·S_self(i) + γ·F_3D(i−1) for i ≥ 1, and F_3D(0) = S_self(0).
  - eq. 3  S_cross(i) = a1·λ_sp(i) + a2·λ_ss(i), where λ_sp = group_attention[i, prompt, spatial]
    (the spatial–prompt interaction) and λ_ss = group_attention[i, spatial, system] (the
    system–spatial one). Causality leaves only these directions non-zero: prompt tokens follow the
    spatial tokens, system tokens precede them.
  - eq. 4  INF(i)     = exp(S_cross(i)/ε) + α_i·F_3D(i) + log(1 + S_self(i)).
  - redundancy: a spatial token is *redundant* in layer i when λ_j(i) < 5 % of the mean λ of its
    sample's spatial tokens in that layer, i.e. it gets under a twentieth of the share it would get if
    the answer's spatial attention were spread evenly. `redundant_share[i]` is the fraction of spatial
    tokens that are redundant, averaged over samples; `redundancy` its mean over layers (the paper's
    "over 60 % of spatial tokens contribute under 5 %"). Relative to the mean, not to the largest λ,
    so one outlier token cannot make every other token look redundant, and it does not depend on how
    many spatial tokens there are.
  - the same sentence read as a statement about mass: `low_mass_share[i]` is the largest share of spatial
    tokens that together receive under 5 % of the spatial λ mass (the bottom tokens, counted up from the
    least attended); `redundancy_mass` its mean over layers. Both readings are reported beside the paper's
    sentence, which does not say which one it means.
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from adatoken.core import adapters
from adatoken.core.artifacts import JsonArtifact
from adatoken.core.layout import GROUPS, TokenLayout, check_query_index, check_window, find_spatial
from adatoken.core.runtime import is_pruned
from adatoken.core.scoring import apply_rope

SYSTEM, SPATIAL, PROMPT, ANSWER = range(len(GROUPS))
LAMBDA_STATS = ("lambda_mean", "lambda_median", "lambda_max", "top10_share", "redundant_share", "low_mass_share")


@dataclass
class FlowSample:
    """One calibration forward: the model call's inputs and where the spatial tokens are.

    inputs: keyword arguments of `model(**inputs)` (input_ids or inputs_embeds, attention_mask,
        pixel_values, ...); a batch is fine, every row counts as one sample. Left or right padding.
    spatial_mask: bool [B, S], True at spatial tokens; None derives it from input_ids and the model's
        image token id (LLaVA-style models).
    query_index: position of the last instruction token, per row (int, list or tensor [B]); tokens
        after it are answer tokens (give the answer as part of the input to measure the answer's
        attention, as the paper does). None: each row's last real token, i.e. no answer tokens.
    """

    inputs: dict
    spatial_mask: torch.Tensor | None = None
    query_index: int | Sequence[int] | torch.Tensor | None = None


@dataclass(frozen=True)
class FlowParams:
    """Parameters of eqs. 2–4 and of the redundancy figure. The paper gives no values; ours:

    sigma, gamma = 0.5, 0.5: with σ = 1 − γ, F_3D is an exponential moving average of S_self (weights
        sum to 1) with a half-life of one layer, so it stays on S_self's [0, 1] scale and remembers
        the previous layer as much as the current one. The paper bounds σ to [0, 1]. The recursion
        starts at F_3D(0) = S_self(0), as a moving average usually does: started at 0, F_3D would rise
        over the first layers whatever the model does, and that artificial rise would pull the eq.-5
        fit (which wants INF to fall with depth) off the model's real curve.
    a1, a2 = 0.5, 0.5: the paper says nothing about which interaction weighs more, so S_cross is the
        plain mean of the two shares and lies in [0, 1] like S_self.
    epsilon = 1.0: with S_cross in [0, 1], exp(S_cross/ε) spans [1, e]; its variation is then of the
        same order as the other two terms (α·F_3D ∈ [0, α], log(1 + S_self) ∈ [0, ln 2]) and no term
        swamps the others. Smaller ε makes the cross term dominate exponentially.
    alpha = 1.0: the weight α_i of F_3D, one float for every layer or one per layer. (Not the α of
        eq. 5, whose default 0.8 lives in `fit_schedule`.)
    redundancy_threshold = 0.05: the paper's 5 %, relative to the mean spatial λ (module docstring).
    Eq. 6 min-max normalises INF before the fit, so only INF's shape across layers matters.
    """

    sigma: float = 0.5
    gamma: float = 0.5
    a1: float = 0.5
    a2: float = 0.5
    epsilon: float = 1.0
    alpha: float | tuple[float, ...] = 1.0
    redundancy_threshold: float = 0.05

    def __post_init__(self):
        if not 0.0 <= self.sigma <= 1.0:
            raise ValueError(f"sigma must be in [0, 1] (the paper's range), got {self.sigma}")
        if not self.epsilon > 0:
            raise ValueError(f"epsilon must be > 0, got {self.epsilon}")
        if not 0.0 < self.redundancy_threshold <= 1.0:
            raise ValueError(f"redundancy_threshold must be in (0, 1], got {self.redundancy_threshold}")
        if not isinstance(self.alpha, (int, float)):
            object.__setattr__(self, "alpha", tuple(float(a) for a in self.alpha))

    def alpha_per_layer(self, num_layers: int) -> np.ndarray:
        if isinstance(self.alpha, tuple):
            if len(self.alpha) != num_layers:
                raise ValueError(f"alpha has {len(self.alpha)} values but the model has {num_layers} layers: "
                                 "give one float, or one per layer")
            return np.asarray(self.alpha)
        return np.full(num_layers, float(self.alpha))


def information_contribution(s_self, prompt_to_spatial, spatial_to_system, params: FlowParams = FlowParams()) -> dict:
    """Eqs. 2–4 from per-layer S_self (eq. 1) and the two interaction shares; arrays of one value per layer."""
    s_self = np.asarray(s_self, dtype=np.float64)
    f3d = s_self.copy()  # F_3D(0) = S_self(0): see FlowParams on why the recursion does not start at 0
    for i in range(1, len(s_self)):
        f3d[i] = params.sigma * s_self[i] + params.gamma * f3d[i - 1]
    s_cross = (params.a1 * np.asarray(prompt_to_spatial, np.float64)
               + params.a2 * np.asarray(spatial_to_system, np.float64))
    inf = np.exp(s_cross / params.epsilon) + params.alpha_per_layer(len(s_self)) * f3d + np.log1p(s_self)
    return {"f3d": f3d, "s_cross": s_cross, "inf": inf}


# ----- the reduction (pure tensor code) ----------------------------------------------------------
def _one_hot(groups: torch.Tensor, dtype) -> torch.Tensor:
    """[B, N] group ids (-1 = padding) -> [B, N, G] indicator, all-zero for padding."""
    return torch.nn.functional.one_hot(groups.clamp(min=0), len(GROUPS)).to(dtype) * (groups >= 0)[..., None]


def reduce_chunk(weights: torch.Tensor, query_groups: torch.Tensor, key_groups: torch.Tensor,
                 lambda_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reduce softmax attention rows of Q query tokens to group sums and λ sums.

    weights [B, H, Q, K]: attention of Q query tokens over the first K tokens; query_groups [B, Q] and
    key_groups [B, K]: ids into GROUPS (-1 = padding); lambda_rows [B, Q]: the rows λ is taken from.
    Returns sums [B, G, G] fp64 (row g: Σ over g's query rows of the head-mean mass on each key group)
    and λ sums [B, K] fp32 (Σ over the λ rows of the head-mean attention each key receives).
    """
    # masked_fill, not a product: a padding row has no key to attend to, its softmax is NaN
    probs = weights.float().mean(1).masked_fill((query_groups < 0)[..., None], 0.0)   # [B, Q, K]
    key_mass = (probs @ _one_hot(key_groups, probs.dtype)).double()                    # [B, Q, G]
    sums = _one_hot(query_groups, torch.float64).transpose(1, 2) @ key_mass
    lambda_sums = (probs * lambda_rows[..., None]).sum(1)
    return sums, lambda_sums


def _attention_chunks(q: torch.Tensor, k: torch.Tensor, real: torch.Tensor, scaling: float, chunk_size: int):
    """Yield (start, stop, weights [B, H, stop-start, stop]): causal softmax rows, one chunk at a time.

    q [B, H, S, hd], k [B, Hkv, S, hd], rotated, fp32. Keys after the chunk's last row are causally
    invisible to all of its rows, so they are never computed. GQA without copying the keys: query head
    h uses key head h // (H / Hkv), as transformers' repeat_kv does.
    """
    batch, heads, length, head_dim = q.shape
    kv_heads = k.shape[1]
    per_kv = heads // kv_heads
    q = q.view(batch, kv_heads, per_kv, length, head_dim)
    positions = torch.arange(length, device=q.device)
    for start in range(0, length, chunk_size):
        stop = min(start + chunk_size, length)
        rows = q[:, :, :, start:stop].reshape(batch, kv_heads, per_kv * (stop - start), head_dim)
        weights = (rows @ k[:, :, :stop].transpose(-1, -2)).view(batch, heads, stop - start, stop)
        allowed = real[:, None, None, :stop] & (positions[:stop] <= positions[start:stop, None])
        # softmax in place, as torch computes it (subtract the row max, exp, normalise): the chunk then
        # holds one [B, H, chunk, stop] block instead of the three that out-of-place ops would make
        weights.mul_(scaling).masked_fill_(~allowed, float("-inf"))
        weights.sub_(weights.amax(dim=-1, keepdim=True)).exp_()
        yield start, stop, weights.div_(weights.sum(dim=-1, keepdim=True))


# ----- the hooks ---------------------------------------------------------------------------------
@dataclass
class _Current:
    """The sample being analysed: its token groups, and what each layer has accumulated so far."""

    groups: torch.Tensor        # [B, S] ids into GROUPS, -1 = padding
    lambda_rows: torch.Tensor   # [B, S] bool
    group_sums: list = field(default_factory=list)    # per layer [B, G, G]
    lambda_sums: list = field(default_factory=list)   # per layer [B, S]


class _FlowHooks:
    """Forward pre-hooks on every decoder layer that reduce the layer's attention as described above."""

    def __init__(self, adapter: adapters.Adapter, chunk_size: int):
        self.adapter = adapter
        self.chunk_size = chunk_size
        self.scaling = adapter.head_dim ** -0.5
        self.current: _Current | None = None
        self.handles = [layer.register_forward_pre_hook(self._hook(idx), with_kwargs=True)
                        for idx, layer in enumerate(adapter.layers)]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def _hook(self, idx: int):
        def hook(module, args, kwargs):
            if self.current is not None:
                self._reduce_layer(idx, args[0] if args else kwargs["hidden_states"], kwargs)
        return hook

    @torch.no_grad()
    def _reduce_layer(self, idx: int, hidden: torch.Tensor, layer_kwargs: dict) -> None:
        current, adapter = self.current, self.adapter
        batch, length = hidden.shape[:2]
        w_q, b_q, w_k, b_k = adapter.qk_weights(idx)
        x = adapter.input_norm(idx)(hidden).float()
        q = torch.nn.functional.linear(x, w_q.float(), None if b_q is None else b_q.float())
        k = torch.nn.functional.linear(x, w_k.float(), None if b_k is None else b_k.float())
        q, k = (t.view(batch, length, -1, adapter.head_dim) for t in (q, k))
        q_norm, k_norm = adapter.qk_norms(idx)  # Qwen3-style per-head norms come before RoPE
        q = q if q_norm is None else q_norm(q)
        k = k if k_norm is None else k_norm(k)
        cos, sin = (t.float()[:, None] for t in adapter.layer_rope(idx, hidden, layer_kwargs))
        q = apply_rope(q.transpose(1, 2), cos, sin)
        k = apply_rope(k.transpose(1, 2), cos, sin)

        sums = torch.zeros(batch, len(GROUPS), len(GROUPS), dtype=torch.float64, device=hidden.device)
        lambda_sums = torch.zeros(batch, length, dtype=torch.float32, device=hidden.device)
        groups = current.groups
        for start, stop, weights in _attention_chunks(q, k, groups >= 0, self.scaling, self.chunk_size):
            chunk_sums, chunk_lambda = reduce_chunk(weights, groups[:, start:stop], groups[:, :stop],
                                                    current.lambda_rows[:, start:stop])
            sums += chunk_sums
            lambda_sums[:, :stop] += chunk_lambda
        current.group_sums.append(sums.cpu())
        current.lambda_sums.append(lambda_sums.cpu())


# ----- the report --------------------------------------------------------------------------------
@dataclass
class FlowReport(JsonArtifact):
    """Per-layer attention statistics of a model over calibration samples, and eqs. 1–4 (see module doc)."""

    FORMAT = "adatoken.flow/v1"
    KIND = "flow report"

    params: FlowParams
    model: dict                       # model_type, num_layers, num_heads, num_kv_heads, head_dim
    num_samples: int
    group_tokens: np.ndarray          # [G] mean tokens per sample in each group
    group_attention: np.ndarray       # [L, G, G] NaN where no sample has tokens of the query group
    lambda_stats: dict                # name in LAMBDA_STATS -> [L]
    s_self: np.ndarray                # [L] eq. 1
    f3d: np.ndarray                   # [L] eq. 2
    s_cross: np.ndarray               # [L] eq. 3
    inf: np.ndarray                   # [L] eq. 4
    token_lambda: list | None = None  # per sample: [L, its spatial tokens] λ, when asked for

    @property
    def num_layers(self) -> int:
        return len(self.inf)

    @property
    def redundant_share(self) -> np.ndarray:
        return self.lambda_stats["redundant_share"]

    @property
    def redundancy(self) -> float:
        """Mean over layers of the share of spatial tokens with λ under the threshold × the mean λ."""
        return float(np.mean(self.redundant_share))

    @property
    def redundancy_mass(self) -> float | None:
        """Mean over layers of the largest share of spatial tokens holding under the threshold of the λ mass
        (None for reports written before it was measured)."""
        share = self.lambda_stats.get("low_mass_share")
        return None if share is None else float(np.mean(share))

    def table(self) -> str:
        """A per-layer text table for terminals and logs."""
        lines = [f"{'layer':>5} {'S_self':>8} {'S_cross':>8} {'F_3D':>8} {'INF':>8} {'redundant':>9}"]
        for i in range(self.num_layers):
            lines.append(f"{i:>5} {self.s_self[i]:8.4f} {self.s_cross[i]:8.4f} {self.f3d[i]:8.4f} "
                         f"{self.inf[i]:8.4f} {self.redundant_share[i]:9.1%}")
        threshold = f"{self.params.redundancy_threshold:.0%}"
        lines.append(f"redundancy, per token (mean share of spatial tokens with λ < {threshold} of the mean spatial "
                     f"λ): {self.redundancy:.1%} over {self.num_samples} samples")
        if self.redundancy_mass is not None:
            lines.append(f"redundancy, by mass (mean share of spatial tokens that together get < {threshold} of the "
                         f"spatial λ): {self.redundancy_mass:.1%}")
        lines.append('the paper: "over 60% of spatial tokens contribute minimally (<<<5%) to the final predictions"')
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "groups": list(GROUPS), "num_layers": self.num_layers,
            "num_samples": self.num_samples, "model": self.model,
            "params": {**asdict(self.params), "alpha": _jsonable(self.params.alpha)},
            "redundancy": self.redundancy, "redundancy_mass": self.redundancy_mass,
            "definitions": {
                "group_attention": "[layer][query group][key group]: attention a query-group token pays to the "
                                   "key group, mean over heads, query tokens and samples; null: group absent",
                "lambda": "attention a spatial token receives from the answer tokens (the last instruction "
                          "token when there are none), mean over heads and those tokens",
                "redundant_share": "share of spatial tokens whose lambda is below redundancy_threshold x the "
                                   "mean lambda of the sample's spatial tokens in that layer, mean over samples",
                "top10_share": "share of the spatial tokens' total lambda held by the top 10% of them",
                "low_mass_share": "largest share of spatial tokens that together hold under redundancy_threshold of "
                                  "the sample's spatial lambda mass in that layer, mean over samples",
            },
            "group_tokens": _jsonable(self.group_tokens),
            "group_attention": _jsonable(self.group_attention),
            "lambda_stats": {name: _jsonable(v) for name, v in self.lambda_stats.items()},
            "s_self": _jsonable(self.s_self), "f3d": _jsonable(self.f3d),
            "s_cross": _jsonable(self.s_cross), "inf": _jsonable(self.inf),
            "token_lambda": None if self.token_lambda is None else [_jsonable(t) for t in self.token_lambda],
        }

    @classmethod
    def from_dict(cls, data: dict) -> "FlowReport":
        array = lambda v: np.asarray(v, dtype=np.float64)  # noqa: E731  (null -> NaN)
        params = dict(data["params"])
        if isinstance(params["alpha"], list):
            params["alpha"] = tuple(params["alpha"])
        return cls(
            params=FlowParams(**params), model=dict(data["model"]), num_samples=int(data["num_samples"]),
            group_tokens=array(data["group_tokens"]), group_attention=array(data["group_attention"]),
            lambda_stats={name: array(v) for name, v in data["lambda_stats"].items()},
            s_self=array(data["s_self"]), f3d=array(data["f3d"]), s_cross=array(data["s_cross"]),
            inf=array(data["inf"]),
            token_lambda=None if data.get("token_lambda") is None else [array(t) for t in data["token_lambda"]],
        )

    def save(self, path: str | Path, indent: int = 1) -> Path:
        return super().save(path, indent)


def _jsonable(value):
    """numpy -> nested lists of floats, NaN -> None (JSON has no NaN)."""
    if isinstance(value, (tuple, list, np.ndarray)):
        return [_jsonable(v) for v in value]
    value = float(value)
    return None if math.isnan(value) else value


# ----- analysis ----------------------------------------------------------------------------------
def analyze(model: nn.Module, samples: Iterable[FlowSample], params: FlowParams = FlowParams(),
            chunk_size: int = 256, keep_token_lambda: bool = False, progress: bool = True) -> FlowReport:
    """Measure the information flow of `model` over calibration `samples` (one forward each).

    chunk_size: query rows whose attention is held at once (memory ∝ heads · chunk_size · tokens).
    keep_token_lambda: also keep every spatial token's λ per layer in the report (large for big inputs).
    The model must not be pruned (`adatoken.unprune` it first). Runs under torch.no_grad().
    """
    if is_pruned(model):
        raise ValueError("analyze needs the unpruned model: call adatoken.unprune(model) first")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    adapter = adapters.resolve(model)
    rows = _SampleRows(params.redundancy_threshold, keep_token_lambda)
    hooks = _FlowHooks(adapter, chunk_size)
    try:
        total = len(samples) if hasattr(samples, "__len__") else None
        for sample in tqdm(samples, total=total, desc="flow analysis", unit="sample", disable=not progress):
            sample = _prepared(model, sample)
            layout = _sample_layout(adapter, sample)
            groups = layout.group_ids()
            has_answer = (groups == ANSWER).any(1, keepdim=True)
            positions = torch.arange(groups.shape[1], device=groups.device)
            at_query = positions == layout.prompt_end[:, None]
            hooks.current = _Current(groups, torch.where(has_answer, groups == ANSWER, at_query))
            with torch.no_grad():
                model(**call_kwargs(model, sample.inputs))
            rows.add(hooks.current, layout)
            hooks.current = None
    finally:
        hooks.remove()
    if not rows.num_samples:
        raise ValueError("analyze needs at least one calibration sample")
    return rows.report(adapter, params)


def _prepared(model: nn.Module, sample: FlowSample) -> FlowSample:
    """A sample for a model of LLaVA's codebase (LLaVA-3D) given as its own inputs (input_ids with the image
    placeholder, images, depths, poses, intrinsics, ...) and no spatial mask: run the model's input preparation
    once, as its forward would, and analyse the prepared inputs_embeds with the spatial tokens where it put
    them. query_index, if given, counts positions of input_ids; it is moved to the prepared sequence."""
    if not isinstance(sample, FlowSample):
        return sample  # _sample_layout says what is wrong with it
    inputs = sample.inputs
    ids = inputs.get("input_ids")
    prepare = getattr(type(model), "prepare_inputs_labels_for_multimodal", None)
    if sample.spatial_mask is not None or prepare is None or ids is None \
            or not bool((ids == adapters.LLAVA_IMAGE_TOKEN_INDEX).any()):
        return sample
    parameters = list(inspect.signature(prepare).parameters)[1:]  # after self
    with torch.no_grad():
        out = prepare(model, **{name: inputs.get(name) for name in parameters if name in inputs or name in (
            "position_ids", "attention_mask", "past_key_values", "labels", "images", "depths", "poses", "intrinsics",
            "lengths")})
    embeds, new_mask = out[4], out[2]
    side = getattr(model.config, "tokenizer_padding_side", "right")
    spans = adapters.prepared_spans(ids, inputs.get("attention_mask"), new_mask, embeds.shape[1], side)
    spatial = adapters.prepared_spatial_mask(ids, inputs.get("attention_mask"), new_mask, embeds.shape[1], side)
    query = sample.query_index
    if query is not None:
        query = check_query_index(query, len(ids), ids.shape[1], ids.device).tolist()
        real = inputs.get("attention_mask", torch.ones_like(ids)).bool()
        moved = []
        for b, (q, span) in enumerate(zip(query, spans)):
            index = int(real[b, :q].sum())  # the query's index among the sample's real tokens
            offset, place, count = span or (0, index, 1)
            moved.append(offset + index + (count - 1 if place < index else 0))
        query = moved
    prepared = {"inputs_embeds": embeds, **({} if new_mask is None else {"attention_mask": new_mask})}
    return FlowSample(prepared, spatial, query)


def _sample_layout(adapter: adapters.Adapter, sample: FlowSample) -> TokenLayout:
    """The sample's TokenLayout (groups, padding, last instruction token), validated."""
    if not isinstance(sample, FlowSample):
        raise ValueError("calibration samples must be adatoken.calibration.flow.FlowSample objects, "
                         f"got {type(sample).__name__}")
    inputs = sample.inputs
    reference = inputs.get("input_ids", inputs.get("inputs_embeds"))
    if reference is None:
        raise ValueError("a FlowSample's inputs need input_ids or inputs_embeds")
    batch, length = reference.shape[:2]
    device = reference.device
    spatial = find_spatial((batch, length), device, sample.spatial_mask, inputs.get("input_ids"),
                           adapter.spatial_token_ids)
    if spatial is None:
        raise ValueError("this FlowSample has no spatial_mask and the model has no image token id to find the "
                         "spatial tokens by: pass spatial_mask, a bool [batch, seq] tensor")
    attention_mask = inputs.get("attention_mask")
    real = torch.ones(batch, length, dtype=torch.bool, device=device) if attention_mask is None \
        else attention_mask.to(device=device, dtype=torch.bool)
    positions = torch.arange(length, device=device)
    if sample.query_index is None:
        query = (positions * real).argmax(1)  # the last real token
    else:
        query = check_query_index(sample.query_index, batch, length, device)
    layout = TokenLayout.build(spatial, attention_mask, query)
    if not bool(layout.spatial.any(1).all()):
        raise ValueError("every calibration row needs at least one spatial token (spatial_mask is all False "
                         "at some row, or only marks padding)")
    last_spatial = (positions * layout.spatial).argmax(1)
    if bool((last_spatial >= query).any()):
        raise ValueError("the last instruction token (query_index) must come after every spatial token: the "
                         "layout is system | spatial | prompt | answer")
    check_window(length, adapter.sliding_window, "flow analysis assumes full causal attention")
    return layout


def call_kwargs(model: nn.Module, inputs: dict) -> dict:
    """The model call for one sample: no KV cache, and only the last position's logits when the model
    allows it (full logits of a 4k-token input at a 32k vocabulary would be 0.5 GB, and nothing here
    needs them)."""
    kwargs = {"use_cache": False, **inputs}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs.setdefault("logits_to_keep", 1)
    return kwargs


class _SampleRows:
    """Per-row results of the analysed samples (each batch row is one sample), and their aggregate."""

    def __init__(self, threshold: float, keep_token_lambda: bool):
        self.threshold = threshold
        self.keep_token_lambda = keep_token_lambda
        self.group_means: list[np.ndarray] = []     # per row [L, G, G]
        self.group_tokens: list[np.ndarray] = []    # per row [G]
        self.lambda_stats: list[dict] = []          # per row: name -> [L]
        self.token_lambda: list[np.ndarray] = []    # per row [L, n_spatial], only if kept

    @property
    def num_samples(self) -> int:
        return len(self.lambda_stats)

    def add(self, current: _Current, layout: TokenLayout) -> None:
        # the hooks left their sums on the CPU; bring the layout there too
        groups, lambda_rows, spatial = current.groups.cpu(), current.lambda_rows.cpu(), layout.spatial.cpu()
        counts = _one_hot(groups, torch.float64).sum(1)                                       # [B, G]
        means = torch.stack(current.group_sums, 1) / counts[:, None, :, None]                 # [B, L, G, G]
        lam = torch.stack(current.lambda_sums, 1) / lambda_rows.sum(1).float()[:, None, None]  # [B, L, S]
        for b in range(lam.shape[0]):
            row_lambda = lam[b][:, spatial[b]].double().numpy()
            self.group_means.append(means[b].numpy())
            self.group_tokens.append(counts[b].numpy())
            self.lambda_stats.append(_lambda_stats(row_lambda, self.threshold))
            if self.keep_token_lambda:
                self.token_lambda.append(row_lambda)

    def report(self, adapter: adapters.Adapter, params: FlowParams) -> FlowReport:
        # mean over the rows that have tokens of the query group; NaN (0/0) where none has (absent group)
        stacked = np.stack(self.group_means)
        present = ~np.isnan(stacked)
        with np.errstate(invalid="ignore"):
            group_attention = np.where(present, stacked, 0.0).sum(0) / present.sum(0)
        stats = {name: np.mean([row[name] for row in self.lambda_stats], 0) for name in LAMBDA_STATS}
        s_self = np.mean([row["lambda_sum"] for row in self.lambda_stats], 0)
        terms = information_contribution(s_self, group_attention[:, PROMPT, SPATIAL],
                                         group_attention[:, SPATIAL, SYSTEM], params)
        model = {"model_type": adapter.model_type, "num_layers": adapter.num_layers, "num_heads": adapter.num_heads,
                 "num_kv_heads": adapter.num_kv_heads, "head_dim": adapter.head_dim}
        return FlowReport(params=params, model=model, num_samples=self.num_samples,
                          group_tokens=np.mean(self.group_tokens, 0), group_attention=group_attention,
                          lambda_stats=stats, s_self=s_self, **terms,
                          token_lambda=self.token_lambda if self.keep_token_lambda else None)


def _lambda_stats(lam: np.ndarray, threshold: float) -> dict:
    """Per-layer statistics of one sample's λ, lam [L, n_spatial]."""
    mean = lam.mean(1)
    top = max(1, math.ceil(0.1 * lam.shape[1]))
    top_mass = np.sort(lam, axis=1)[:, -top:].sum(1)
    return {"lambda_sum": lam.sum(1), "lambda_mean": mean, "lambda_median": np.median(lam, 1), "lambda_max": lam.max(1),
            "top10_share": top_mass / np.maximum(lam.sum(1), 1e-30),
            "redundant_share": (lam < threshold * mean[:, None]).mean(1),
            "low_mass_share": _low_mass_share(lam, threshold)}


def _low_mass_share(lam: np.ndarray, threshold: float) -> np.ndarray:
    """Per layer, the largest share of tokens whose λ sums to under `threshold` of the total (fewest first)."""
    cumulative = np.cumsum(np.sort(lam, axis=1), axis=1)
    total = np.maximum(cumulative[:, -1:], 1e-30)
    return (cumulative < threshold * total).sum(1) / lam.shape[1]
