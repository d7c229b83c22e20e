"""The pruning runtime: hooks on the decoder layers and the one `PruneState` they share.

How a pruned prefill runs (every decoder layer has a forward pre-hook, and a forward hook):
- Layer 0's pre-hook starts a new prefill: it builds the token layout (which positions are spatial,
  which are padding) and asks the method for the number of spatial tokens entering every layer.
- At a layer where that number steps down, the pre-hook ranks the alive spatial tokens (the method's
  `score`, from this layer's own normed input) and keeps the best. The current sequence is described
  by `index` [B, L]: for each slot, the original position of the token in it. Every per-token tensor
  the layer receives — hidden states, position ids, rotary cos/sin, the 4-D mask — is gathered with it.
  Kept tokens keep their original positions, so RoPE and causality are unchanged. (Where attention
  computes RoPE itself from `position_ids`, as in transformers 4.37, a hook on its rotary module keeps
  the cos/sin cache it slices long enough for those positions.)
- Samples of a batch keep different numbers of tokens; shorter rows are padded with *filler* slots
  (copies of the sample's last token) that no key ever attends to (`slot_ok` is False there).
- Each layer's KV cache therefore holds only the tokens that entered it. Decoding steps slice the
  key dimension of the decode mask with that layer's `index`; positions come from outside unchanged.
  Layer 0 never prunes, because transformers sizes decode masks and positions from its cache.
- The last layer's forward hook scatters the output back to full length; a dropped token keeps the
  hidden state it had when dropped, so logits, loss and hidden-state outputs have unpruned shapes.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from adatoken.core import adapters
from adatoken.core.config import PruneConfig
from adatoken.core.layout import TokenLayout, check_query_index, check_window, find_spatial
from adatoken.core.methods import RankContext
from adatoken.core.schedule import Schedule

STATE_ATTR = "_adatoken_state"


@dataclass
class PruneStats:
    """Per layer and per sample: spatial tokens and all real tokens that entered the layer (last prefill)."""

    spatial_in: list[list[int]]
    tokens_in: list[list[int]]
    text_config: object = None  # the decoder's config, for FLOPs

    @property
    def num_samples(self) -> int:
        return len(self.spatial_in[0]) if self.spatial_in else 0

    def prefill_flops(self, sample: int = 0, lm_head_positions: int = 1) -> float:
        """Analytic prefill FLOPs of one sample at the token counts that actually entered each layer."""
        from adatoken.core import flops
        tokens = [layer[sample] for layer in self.tokens_in]
        shape = flops.ModelShape.from_config(self.text_config)
        return flops.prefill_flops(shape, tokens, lm_head_positions=lm_head_positions).total

    def to_dict(self) -> dict:
        return {"spatial_in": self.spatial_in, "tokens_in": self.tokens_in,
                "prefill_flops": [self.prefill_flops(b) for b in range(self.num_samples)]}


@dataclass
class SelectionTimer:
    """Wall seconds pruned prefills spent choosing tokens: ranking, top-k and building the keep index."""

    seconds: float = 0.0

    @contextlib.contextmanager
    def measure(self, device: torch.device):
        _synchronize(device)
        start = time.perf_counter()
        yield
        _synchronize(device)
        self.seconds += time.perf_counter() - start


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Prefill:
    """What the last prefill decided, kept for the decoding steps that continue it."""

    length: int
    key_index: list[torch.Tensor | None]  # per layer: [B, L_l] original positions cached, None = all
    key_ok: list[torch.Tensor | None]     # per layer: [B, L_l] False at filler slots, None = no filler
    extra: int = 0                        # tokens appended after the prefill so far


@dataclass
class Pass:
    """Scratch state of one prefill forward, discarded when it ends."""

    layout: TokenLayout
    counts: list[list[int]]        # spatial tokens entering each layer, per sample
    real_tokens: list[int]         # non-padding tokens per sample at the input
    spatial_ordinal: torch.Tensor  # [B, S] index among the sample's spatial tokens
    index: torch.Tensor | None = None    # [B, L] original position per slot; None = identity
    slot_ok: torch.Tensor | None = None  # [B, L] False at filler slots
    alive: torch.Tensor | None = None    # [B, L] spatial tokens still in the sequence
    slots: list[int] = field(default_factory=list)  # real (non-filler) slots per sample
    buffer: torch.Tensor | None = None   # [B, S+1, D] last hidden state of every token (row S: scratch)
    restored: bool = False               # the previous layer handed on a full-length sequence
    sliced_for: torch.Tensor | None = None  # the index `sliced` was gathered with
    sliced: dict = field(default_factory=dict)


class PruneState:
    """Everything adatoken keeps on a pruned model: config, hooks, and per-forward state."""

    def __init__(self, model: nn.Module, config: PruneConfig):
        self.config = config
        self.adapter = adapters.resolve(model)
        self.method = config.build()
        self.schedule: Schedule = self.method.schedule(self.adapter.num_layers)
        self.handles: list = []
        self.explicit_spatial: torch.Tensor | None = None
        self.explicit_query: torch.Tensor | int | None = None
        self.call_inputs: dict = {}
        self.prefill: Prefill | None = None
        self.current: Pass | None = None
        self.stats: PruneStats | None = None
        self.selection_timer: SelectionTimer | None = None  # set by `selection_timer(model)` only

    # ----- hooks -------------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> None:
        self.handles.append(model.register_forward_pre_hook(self._on_model_call, with_kwargs=True))
        # forget the call's inputs when it ends, so a later direct call of the decoder never sees stale ones
        self.handles.append(model.register_forward_hook(lambda *_: self.call_inputs.clear(), always_call=True))
        last = self.adapter.num_layers - 1
        for idx, layer in enumerate(self.adapter.layers):
            self.handles.append(layer.register_forward_pre_hook(self._pre_hook(idx), with_kwargs=True))
            # prepend: run before transformers' output-capturing hooks, so they see full-length states
            self.handles.append(layer.register_forward_hook(self._post_hook(idx, idx == last), prepend=True))
        for rotary in self.adapter.attention_rotaries:
            self.handles.append(rotary.register_forward_pre_hook(self._widen_rotary, with_kwargs=True))

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _on_model_call(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args and torch.is_tensor(args[0]) else None)
        self.call_inputs = {
            "input_ids": input_ids,
            "attention_mask": kwargs.get("attention_mask"),
            "hidden_states_out": bool(kwargs.get("output_hidden_states", getattr(module.config, "output_hidden_states", False))),
        }

    def _pre_hook(self, idx: int):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            if idx == 0:
                past = kwargs.get("past_key_values", kwargs.get("past_key_value"))  # transformers 5 / 4.37
                if past is not None and past.get_seq_length() > 0:
                    self._begin_continuation(hidden)
                else:
                    self._begin_prefill(hidden)
            if self.current is None:
                return self._continue_layer(idx, hidden, args, kwargs)
            return self._prefill_layer(idx, hidden, args, kwargs)
        return hook

    def _post_hook(self, idx: int, is_last: bool):
        def hook(module, args, output):
            run = self.current
            if run is None or run.index is None:
                if is_last:
                    self.current = None
                return None
            if not (is_last or self.call_inputs.get("hidden_states_out")):
                return None
            hidden = output[0] if isinstance(output, tuple) else output
            full = self._write_back(run, hidden)[:, : run.layout.spatial.shape[1]]
            run.restored = True
            if is_last:
                self.current = None
            return (full, *output[1:]) if isinstance(output, tuple) else full
        return hook

    def _widen_rotary(self, module, args, kwargs):
        # transformers 4.37 attention takes cos/sin[:keys it holds] and indexes them with position ids; a
        # layer holding pruned keys has positions beyond that count, so slice up to the full sequence.
        if self.prefill is None:
            return None
        return args, {**kwargs, "seq_len": max(kwargs["seq_len"], self.prefill.length + self.prefill.extra)}

    # ----- prefill ----------------------------------------------------------------------------
    def _begin_prefill(self, hidden: torch.Tensor) -> None:
        batch, length = hidden.shape[:2]
        check_window(length, self.adapter.sliding_window,
                     "pruning does not support sliding-window attention beyond the window")
        spatial = self._spatial_mask(batch, length, hidden.device)
        attention_mask = self.call_inputs.get("attention_mask")
        if attention_mask is not None and (attention_mask.dim() != 2 or tuple(attention_mask.shape) != (batch, length)):
            attention_mask = None  # a 4-D or cache-length mask: padding is then already in the layer masks
        if attention_mask is not None and not bool(attention_mask[:, -1].all()):
            raise ValueError("adatoken needs left padding (the last position of every sample must be a real token); "
                             "set tokenizer.padding_side = 'left'")
        layout = TokenLayout.build(spatial, attention_mask, self._query_positions(batch, length, hidden.device))
        layout.spatial[torch.arange(batch), layout.prompt_end] = False  # the ranking query is never dropped
        num_spatial = layout.num_spatial
        counts = [list(c) for c in zip(*(self.schedule.counts(n) for n in num_spatial))]
        ordinal = (layout.spatial.cumsum(1) - 1).clamp(min=0)
        self.current = Pass(layout, counts, layout.real.sum(1).tolist(), ordinal, alive=layout.spatial,
                            slots=[length] * batch)
        self.prefill = Prefill(length, [None] * self.adapter.num_layers, [None] * self.adapter.num_layers)
        self.stats = PruneStats([[0] * batch for _ in counts], [[0] * batch for _ in counts], self.adapter.text_config)

    def _spatial_mask(self, batch: int, length: int, device) -> torch.Tensor:
        spatial = find_spatial((batch, length), device, self.explicit_spatial, self.call_inputs.get("input_ids"),
                               self.adapter.spatial_token_ids)
        if spatial is None:  # no spatial tokens: runs unpruned
            return torch.zeros(batch, length, dtype=torch.bool, device=device)
        return spatial

    def _query_positions(self, batch: int, length: int, device) -> torch.Tensor | None:
        """Position of the last instruction token per sample: given, or (None) the prefill's last position."""
        return None if self.explicit_query is None else check_query_index(self.explicit_query, batch, length, device)

    def _prefill_layer(self, idx: int, hidden, args, kwargs):
        run = self.current
        if run.restored:  # the previous layer handed on full length (hidden-state outputs): re-select
            hidden = _gather_tokens(hidden, run.index)
            run.restored = False
        target = run.counts[idx]
        alive_counts = run.counts[idx - 1] if idx > 0 else run.counts[0]
        if any(t < a for t, a in zip(target, alive_counts)):
            with self.selection_timer.measure(hidden.device) if self.selection_timer else contextlib.nullcontext():
                hidden = self._prune(idx, run, hidden, self._sliced(run, kwargs), target, alive_counts)
        self.prefill.key_index[idx] = run.index
        self.prefill.key_ok[idx] = run.slot_ok
        self.stats.spatial_in[idx] = list(target)
        self.stats.tokens_in[idx] = [r - (n - t) for r, n, t in zip(run.real_tokens, run.counts[0], target)]
        if run.index is None:
            return None
        kwargs = self._sliced(run, kwargs)
        return ((hidden, *args[1:]) if args else ()), ({**kwargs} if args else {**kwargs, "hidden_states": hidden})

    def _prune(self, idx: int, run: Pass, hidden, kwargs, target: list[int], alive_counts: list[int]):
        batch, length = hidden.shape[:2]
        device = hidden.device
        index = run.index if run.index is not None else torch.arange(length, device=device).expand(batch, length)
        slot_ok = run.slot_ok if run.slot_ok is not None else torch.ones(batch, length, dtype=torch.bool, device=device)
        if kwargs.get("position_embeddings") is not None:
            cos, sin = (t.expand(batch, -1, -1) for t in kwargs["position_embeddings"])
        else:  # the layer computes RoPE itself (transformers 4.37): from the positions it was given
            cos, sin = self.adapter.rotary(idx, hidden, kwargs["position_ids"].expand(batch, -1), self.prefill.length)
        positions = index
        real = run.layout.real.gather(1, index) & slot_ok
        ctx = RankContext(
            layer_idx=idx, hidden=hidden, input_norm=self.adapter.input_norm(idx),
            rms_norm=self.adapter.rms_norm(idx), candidates=run.alive,
            valid=real, positions=positions, cos=cos, sin=sin,
            query_slot=(index == run.layout.prompt_end[:, None]).to(torch.int8).argmax(1),
            spatial_ordinal=run.spatial_ordinal.gather(1, index), num_spatial=run.counts[0],
            qk_weights=self.adapter.qk_weights(idx), qk_norms=self.adapter.qk_norms(idx),
            num_heads=self.adapter.num_heads,
            num_kv_heads=self.adapter.num_kv_heads, scaling=self.adapter.head_dim ** -0.5,
        )
        with torch.no_grad():
            scores = self.method.score(ctx).float().nan_to_num(nan=-1e30, posinf=1e30, neginf=-1e30)
            scores = scores.masked_fill(~run.alive, float("-inf"))
            k_max = max(target)
            top = scores.topk(k_max, dim=1).indices if k_max > 0 else scores[:, :0].long()
            take = torch.arange(k_max, device=device)[None] < torch.tensor(target, device=device)[:, None]
            keep = slot_ok & ~run.alive
            keep = keep.scatter(1, top, take | keep.gather(1, top))
            slots = [s - (a - t) for s, a, t in zip(run.slots, alive_counts, target)]
            new_length = max(slots)
            # kept slots first, in their original order; the rest of each row is filler
            key = torch.where(keep, 0, length) + torch.arange(length, device=device)
            order = key.argsort(dim=1)
            rel = order[:, :new_length]
            new_slot_ok = None
            if min(slots) < new_length:
                slots_t = torch.tensor(slots, device=device)
                filler = torch.arange(new_length, device=device)[None] >= slots_t[:, None]
                rel = torch.where(filler, rel.gather(1, (slots_t - 1)[:, None]), rel)
                new_slot_ok = ~filler
            # right after each row's kept slots come the tokens dropped here (fillers, if any, sort last)
            dropped = [a - t for a, t in zip(alive_counts, target)]
            columns = torch.tensor(slots, device=device)[:, None] + torch.arange(max(dropped), device=device)[None]
            dropped_rel = order.gather(1, columns.clamp(max=length - 1))
            dropped_ok = torch.arange(max(dropped), device=device)[None] < torch.tensor(dropped, device=device)[:, None]
        self._record(run, index.gather(1, dropped_rel), dropped_ok, _gather_tokens(hidden, dropped_rel))
        run.index = index.gather(1, rel)
        run.slot_ok = new_slot_ok
        run.alive = run.alive.gather(1, rel) if new_slot_ok is None else run.alive.gather(1, rel) & new_slot_ok
        run.slots = slots
        return _gather_tokens(hidden, rel)

    def _write_back(self, run: Pass, hidden: torch.Tensor) -> torch.Tensor:
        """Record the hidden state of every token in the current sequence; return the full-length buffer."""
        return self._record(run, run.index, run.slot_ok, hidden)

    def _record(self, run: Pass, positions: torch.Tensor, ok: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor:
        """Write `rows` [B, n, D] at original `positions` [B, n] of the buffer (where `ok`); return it.

        Every token is written when it is dropped or, if it survives, when the sequence is restored,
        so the buffer starts empty. Row S is scratch: rows that are not `ok` go there.
        """
        length = run.layout.spatial.shape[1]
        if run.buffer is None:
            run.buffer = rows.new_empty(rows.shape[0], length + 1, rows.shape[-1])
        target = (positions if ok is None else positions.masked_fill(~ok, length))[..., None].expand_as(rows)
        if torch.is_grad_enabled() and rows.requires_grad or self.call_inputs.get("hidden_states_out"):
            run.buffer = run.buffer.scatter(1, target, rows)  # out of place: autograd / captured outputs
        else:
            run.buffer.scatter_(1, target, rows)
        return run.buffer

    def _sliced(self, run: Pass, kwargs: dict) -> dict:
        """Gather the per-token kwargs (positions, rotary tables, mask) at the current slots, once per index."""
        if run.index is None:
            return kwargs
        if run.sliced_for is not run.index:
            index, batch = run.index, run.index.shape[0]
            sliced = {}
            if kwargs.get("position_embeddings") is not None:
                sliced["position_embeddings"] = tuple(_gather_tokens(t.expand(batch, -1, -1), index)
                                                      for t in kwargs["position_embeddings"])
            if kwargs.get("position_ids") is not None:
                sliced["position_ids"] = kwargs["position_ids"].expand(batch, -1).gather(1, index)
            sliced["attention_mask"] = _prefill_mask(kwargs.get("attention_mask"), index, run.slot_ok,
                                                     self.adapter.attn_implementation, run.buffer.dtype)
            run.sliced_for, run.sliced = index, sliced
        return {**kwargs, **run.sliced}

    # ----- decoding ---------------------------------------------------------------------------
    def _begin_continuation(self, hidden: torch.Tensor) -> None:
        self.current = None
        if self.prefill is not None:
            self.prefill.extra += hidden.shape[1]

    def _continue_layer(self, idx: int, hidden, args, kwargs):
        record = self.prefill
        if record is None or record.key_index[idx] is None:
            return None
        mask = kwargs.get("attention_mask")
        key_ok = record.key_ok[idx]
        if mask is None and key_ok is None:
            return None  # sdpa without padding: the cache holds exactly the keys to attend
        new_mask = _decode_mask(mask, record, idx, hidden.shape[1], self.adapter.attn_implementation, hidden.dtype)
        return args, {**kwargs, "attention_mask": new_mask}


# ----- tensor helpers ------------------------------------------------------------------------------
def _gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


def _mask_value(allowed: torch.Tensor, impl: str, dtype: torch.dtype) -> torch.Tensor:
    """A boolean 'may attend' tensor in the form the attention implementation expects."""
    if impl == "eager":
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)
    return allowed


def _disallow(mask: torch.Tensor, blocked: torch.Tensor) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return mask & ~blocked
    return mask.masked_fill(blocked, torch.finfo(mask.dtype).min)


def _prefill_mask(mask, index, slot_ok, impl: str, dtype):
    batch, length = index.shape
    if mask is None:
        if slot_ok is None:
            return None  # causal over slots is causal over original positions: sdpa's is_causal holds
        allowed = slot_ok[:, None, :] & (index[:, None, :] <= index[:, :, None])
        return _mask_value(allowed[:, None], impl, dtype)
    if mask.dim() == 2:  # flash-attention style padding mask [B, S]
        mask = mask.gather(1, index)
        return mask if slot_ok is None else mask * slot_ok
    full = mask[:, 0].expand(batch, -1, -1)
    rows = full.gather(1, index[:, :, None].expand(-1, -1, full.shape[-1]))
    out = rows.gather(2, index[:, None, :].expand(-1, length, -1))[:, None]
    return out if slot_ok is None else _disallow(out, ~slot_ok[:, None, None, :])


def _decode_mask(mask, record: Prefill, idx: int, num_new: int, impl: str, dtype):
    index, key_ok = record.key_index[idx], record.key_ok[idx]
    batch, prefix = index.shape[0], record.length
    if mask is None:
        total_new = record.extra
        new_pos = torch.arange(total_new, device=index.device)
        query_pos = new_pos[-num_new:]
        new_allowed = (new_pos[None, :] <= query_pos[:, None]).expand(batch, -1, -1)
        old_allowed = key_ok[:, None, :].expand(-1, num_new, -1)
        return _mask_value(torch.cat((old_allowed, new_allowed), -1)[:, None], impl, dtype)
    if mask.dim() == 2:
        old = mask[:, :prefix].gather(1, index)
        old = old if key_ok is None else old * key_ok
        return torch.cat((old, mask[:, prefix:]), 1)
    mask = mask.expand(batch, -1, -1, -1)
    heads, queries = mask.shape[1], mask.shape[2]
    old = mask[..., :prefix].gather(3, index[:, None, None, :].expand(-1, heads, queries, -1))
    if key_ok is not None:
        old = _disallow(old, ~key_ok[:, None, None, :])
    return torch.cat((old, mask[..., prefix:]), -1)


# ----- public functions ------------------------------------------------------------------------------
def _as_config(config, params) -> PruneConfig:
    if isinstance(config, PruneConfig):
        if params:
            raise ValueError("pass either a PruneConfig or a method name with parameters, not both")
        return config
    if isinstance(config, str):
        return PruneConfig(config, **params)
    if config is None:
        return PruneConfig(params.pop("method", "none"), **params)
    raise ValueError(f"config must be a PruneConfig or a method name, got {type(config).__name__}")


def prune(model: nn.Module, config: PruneConfig | str | None = None, **params) -> nn.Module:
    """Prune `model` in place (and return it). Pruning an already pruned model replaces the old config."""
    config = _as_config(config, params)
    unprune(model)
    state = PruneState(model, config)
    state.attach(model)
    setattr(model, STATE_ATTR, state)
    return model


def unprune(model: nn.Module) -> nn.Module:
    """Remove every hook and all state: the model computes exactly what it did before `prune`."""
    state = getattr(model, STATE_ATTR, None)
    if state is not None:
        state.detach()
        delattr(model, STATE_ATTR)
    return model


def is_pruned(model: nn.Module) -> bool:
    return getattr(model, STATE_ATTR, None) is not None


def get_state(model: nn.Module) -> PruneState:
    state = getattr(model, STATE_ATTR, None)
    if state is None:
        raise ValueError("this model is not pruned: call adatoken.prune(model, ...) first")
    return state


def last_stats(model: nn.Module) -> PruneStats:
    """Tokens that entered each layer in the model's last prefill, per sample, and its analytic FLOPs."""
    state = get_state(model)
    if state.stats is None:
        raise ValueError("no forward has run since the model was pruned")
    return state.stats


@contextlib.contextmanager
def spatial_tokens(model: nn.Module, mask: torch.Tensor, query_index: torch.Tensor | int | None = None):
    """Mark which input positions are spatial tokens (bool [batch, seq]) for forwards inside the block.

    How LLaVA-3D-style models that call their LLM with `inputs_embeds` tell the runtime where the
    spatial tokens are. `query_index` is the position of the last instruction token (the ranking
    query); it defaults to the last position, which is right for generation but not for a forward
    that already contains answer tokens (training, or recomputing a generation without a cache).
    On a model that is not pruned it only checks the mask.
    """
    if not torch.is_tensor(mask) or mask.dim() != 2:
        raise ValueError(f"the spatial mask must be a [batch, seq] tensor, got {getattr(mask, 'shape', type(mask).__name__)}")
    state = getattr(model, STATE_ATTR, None)
    if state is None:
        yield
        return
    previous = state.explicit_spatial, state.explicit_query
    state.explicit_spatial, state.explicit_query = mask, query_index
    try:
        yield
    finally:
        state.explicit_spatial, state.explicit_query = previous


@contextlib.contextmanager
def selection_timer(model: nn.Module):
    """`with selection_timer(model) as timer:` time what choosing tokens costs the prefills in the block.

    For benchmarks (`timer.seconds` beside the prefill's wall time): it synchronises CUDA around every
    selection, so it is off unless asked for.
    """
    state = get_state(model)
    timer, previous = SelectionTimer(), state.selection_timer
    state.selection_timer = timer
    try:
        yield timer
    finally:
        state.selection_timer = previous
