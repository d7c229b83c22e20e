"""The pruning runtime: hooks on the decoder layers and the one `PruneState` they share.

How a pruned prefill runs (every decoder layer has a forward pre-hook, and a forward hook):
- Layer 0's pre-hook starts a new prefill: it builds the token layout (which positions are spatial,
  which are padding) and asks the method for the number of spatial tokens entering every layer.
- At a layer where that number steps down, the pre-hook ranks the alive spatial tokens (the method's
  `score`, from this layer's own normed input, or also from the previous layer's input and the keys its
  attention projected, caught from its k_proj, for a method that ranks by them, as FastV's and DART's code
  do) and keeps the best. The current sequence is described by `index` [B, L]:
  for each slot, the original position of the token in it. Every per-token tensor the layer receives —
  hidden states, position ids, rotary cos/sin, the 4-D mask — is gathered with it. Kept tokens keep
  their original positions, so RoPE and causality are unchanged, unless the method renumbers them as
  its released code does (PyramidDrop): then the kept tokens take the first positions of the input, in
  order, and a decoding step's position is lowered per layer by what that layer no longer holds.
  (Where attention computes RoPE itself from `position_ids`, as in transformers 4.37, a hook on its
  rotary module keeps the cos/sin cache it slices long enough for those positions.)
- Samples of a batch keep different numbers of tokens; shorter rows are padded with *filler* slots
  (copies of the sample's last token) that no key ever attends to (`slot_ok` is False there).
- Each layer's KV cache therefore holds only the tokens that entered it. Decoding steps slice the
  key dimension of the decode mask with that layer's `index`. What a prefill decided is filed under
  its KV cache, so several conversations can continue on one model.
  Layer 0 never prunes, because transformers sizes decode masks and positions from its cache.
- The last layer's forward hook scatters the output back to full length; a dropped token keeps the
  hidden state it had when dropped, so logits, loss and hidden-state outputs have unpruned shapes.
"""
from __future__ import annotations

import contextlib
import time
import warnings
import weakref
from dataclasses import dataclass, field
from functools import partial

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
    spatial: torch.Tensor | None = None   # [B, S] the prefill's spatial tokens
    record: Prefill | None = None         # which original positions each layer held

    @property
    def num_samples(self) -> int:
        return len(self.spatial_in[0]) if self.spatial_in else 0

    @property
    def kept_positions(self) -> list[list[list[int]]]:
        """Per layer, per sample: the original positions of the spatial tokens that entered the layer."""
        spatial = self.spatial.cpu()
        out = []
        for index, ok in zip(self.record.key_index, self.record.key_ok):
            if index is None:
                out.append([row.nonzero().flatten().tolist() for row in spatial])
                continue
            index = index.cpu()
            held = spatial.gather(1, index) & (True if ok is None else ok.cpu())
            out.append([sorted(row[keep].tolist()) for row, keep in zip(index, held)])
        return out

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
    """What a prefill decided, kept with its KV cache for the steps that continue it."""

    length: int
    key_index: list[torch.Tensor | None]  # per layer: [B, L_l] original positions cached, None = all
    key_ok: list[torch.Tensor | None]     # per layer: [B, L_l] False at filler slots, None = no filler
    extra: int = 0                        # tokens appended after the prefill so far
    cache: weakref.ref | None = None      # the KV cache that holds it (None: a forward without a cache)
    shift: list[torch.Tensor | None] = field(default_factory=list)  # per layer: [B] positions renumbered away
    static: int | None = None  # a static cache's slots per layer; each layer writes its tokens at its own next ones
    _static_tables: list | None = field(default=None, repr=False)

    def static_tables(self) -> list[tuple[torch.Tensor | None, torch.Tensor | None]]:
        """Per layer of a static cache of `static` slots: for each slot, the position (column of a decoding step's
        mask) of the token it holds — the layer's prefill tokens, then the tokens decoded after the prompt, in
        order — and whether it may hold one at all. (None, None) for a layer that holds every token."""
        if self._static_tables is None:
            tables = []
            for index, ok in zip(self.key_index, self.key_ok):
                if index is None:
                    tables.append((None, None))
                    continue
                batch, held = index.shape
                later = self.length + torch.arange(self.static - held, device=index.device).expand(batch, -1)
                gather = torch.cat((index, later.clamp(max=self.static - 1)), 1)
                may = torch.cat((torch.ones_like(index, dtype=torch.bool) if ok is None else ok,
                                 later < self.static), 1)
                tables.append((gather, may))
            self._static_tables = tables
        return self._static_tables


@dataclass
class StaticStep:
    """A decoding step on a static cache: the prefill it continues and that prefill's static tables."""

    record: Prefill
    tables: list


class _RecordsByIdentity:
    """Prefill records keyed by the identity of an object (a cache, a key tensor: tensors compare by value, so
    no dict can key them), each dropped when its object is freed."""

    def __init__(self):
        self._records: dict[int, tuple[weakref.ref, Prefill]] = {}

    def put(self, key, record: Prefill) -> None:
        if id(key) not in self._records:
            weakref.finalize(key, self._records.pop, id(key), None)
        self._records[id(key)] = (weakref.ref(key), record)

    def get(self, key) -> Prefill | None:
        entry = self._records.get(id(key))
        return entry[1] if entry is not None and entry[0]() is key else None


@dataclass
class Generation:
    """The `generate` call under way. Its prompt's length is the sequence the decoder first receives (not
    the caller's input_ids: a model such as LLaVA-3D expands them into spatial tokens before its LLM)."""

    prompt_length: int | None = None
    attention_mask: torch.Tensor | None = None  # the caller's [B, S] padding mask (generate may hand the
    # decoder 4-D masks instead, as it does for a static cache)


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
    pending: torch.Tensor | None = None  # scores a layer computed for the next layer's drop
    previous: tuple | None = None        # (layer, its input, its kwargs, {"keys": its k_proj output}) for a method
    #                                      that reads it (Method.uses_previous_input)
    points: torch.Tensor | None = None   # [B, S, c] the spatial tokens' positions in space, where given
    memo: dict = field(default_factory=dict)  # what a method keeps from one of its drops to the next (RankContext)

    def slot_tables(self, batch: int, length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(index, slot_ok) spelled out, also before the first drop (identity, no filler)."""
        index = self.index if self.index is not None else torch.arange(length, device=device).expand(batch, length)
        ok = self.slot_ok if self.slot_ok is not None else torch.ones(batch, length, dtype=torch.bool, device=device)
        return index, ok


class PruneState:
    """Everything adatoken keeps on a pruned model: config, hooks, and per-forward state."""

    def __init__(self, model: nn.Module, config: PruneConfig):
        self.config = config
        self.adapter = adapters.resolve(model)
        self.method = config.build()
        self.schedule: Schedule = self.method.schedule(self.adapter.num_layers)
        if self.method.renumbers_positions and self.adapter.multimodal_rope and min(self.schedule.keep) < 1:
            raise ValueError(f"{config.method} renumbers positions after each drop, which is defined for 1-D RoPE; "
                             f"{self.adapter.model_type!r} uses multimodal RoPE: keep original positions "
                             "(positions='original')")
        self.model = model
        self.handles: list = []
        self.stats: PruneStats | None = None
        self.selection_timer: SelectionTimer | None = None  # set by `selection_timer(model)` only
        self.warned: set[str] = set()  # warnings given once per model
        self._reset_calls()

    def _reset_calls(self) -> None:
        """Per-call state: nothing of it outlives its call, or travels with a copy of the model."""
        self.explicit_spatial: torch.Tensor | None = None
        self.explicit_query: torch.Tensor | int | None = None
        self.explicit_points: torch.Tensor | None = None
        self.prepared_spatial: torch.Tensor | None = None  # where LLaVA's input preparation put them (this call)
        self.generation: Generation | None = None    # the `generate` call under way, if any
        self.call_inputs: dict = {}
        self.record: Prefill | None = None           # what the cache of the forward under way holds
        self.current: Pass | None = None             # the prefill under way
        self.static_step: StaticStep | None = None   # a decoding step on a static cache (set before the forward)
        # What each prefill decided, found again through its KV cache: by the cache object (transformers
        # 5 keeps one through a conversation), or by its first layer's key tensor (4.37's generate hands
        # back legacy tuples, a new cache object each step). Weak: a dropped conversation frees its record.
        self.records = _RecordsByIdentity()

    # A copy (copy.deepcopy, pickle) of a pruned model is pruned on its own: configuration and hooks travel,
    # what calls left behind (and the last prefill's statistics) do not.
    COPIED = ("config", "adapter", "method", "schedule", "model", "handles", "warned")

    def __getstate__(self) -> dict:
        return {name: self.__dict__[name] for name in self.COPIED}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, stats=None, selection_timer=None)
        self._reset_calls()

    # ----- hooks -------------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> None:
        # Every hook is a bound method (or a partial of one): copy.deepcopy and pickle copy it with the
        # state it is bound to, so a copy of a pruned model runs its own hooks on its own state.
        self.handles.append(model.register_forward_pre_hook(self._on_model_call, with_kwargs=True))
        self.handles.append(model.register_forward_hook(self._on_model_return, always_call=True))
        last = self.adapter.num_layers - 1
        for idx, layer in enumerate(self.adapter.layers):
            self.handles.append(layer.register_forward_pre_hook(partial(self._layer_pre_hook, idx), with_kwargs=True))
            # prepend: run before transformers' output-capturing hooks, so they see full-length states
            self.handles.append(layer.register_forward_hook(partial(self._layer_post_hook, idx, idx == last),
                                                            prepend=True))
            self.handles.append(layer.self_attn.register_forward_hook(partial(self._attention_maps, idx),
                                                                      prepend=True))
        for rotary in self.adapter.attention_rotaries:
            self.handles.append(rotary.register_forward_pre_hook(self._widen_rotary, with_kwargs=True))
        model.generate = self.generate  # an instance attribute: unprune deletes it, the class's stays
        if callable(getattr(model, "prepare_inputs_labels_for_multimodal", None)):  # LLaVA's codebase (LLaVA-3D)
            model.prepare_inputs_labels_for_multimodal = self._prepare_inputs_labels_for_multimodal

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        if self.model.__dict__.get("generate") == self.generate:
            del self.model.generate
        prepare = "prepare_inputs_labels_for_multimodal"
        if self.model.__dict__.get(prepare) == self._prepare_inputs_labels_for_multimodal:
            delattr(self.model, prepare)

    def _prepare_inputs_labels_for_multimodal(self, input_ids, position_ids, attention_mask, *args, **kwargs):
        """The model's own input preparation (LLaVA's codebase, LLaVA-3D's included: the image placeholder in
        input_ids becomes the scene's spatial tokens), which also tells the runtime where they went, so its
        own `generate(input_ids, images=..., depths=..., poses=..., intrinsics=...)` and forward prune as
        they are."""
        out = type(self.model).prepare_inputs_labels_for_multimodal(self.model, input_ids, position_ids, attention_mask,
                                                                  *args, **kwargs)
        embeds = out[4]
        if embeds is not None and torch.is_tensor(input_ids):
            side = getattr(self.model.config, "tokenizer_padding_side", "right")
            self.prepared_spatial = adapters.prepared_spatial_mask(input_ids, attention_mask, out[2],
                                                                   embeds.shape[1], side)
        return out

    def generate(self, *args, **kwargs):
        """The model's own `generate`, told which prompt it answers: every step of this call ranks by the
        prompt's last token (with or without a KV cache), and an explicit spatial mask of the prompt
        follows the batch as generate expands it (beams, num_return_sequences)."""
        if (kwargs.get("cache_implementation") == "static" or _is_static(kwargs.get("past_key_values"))) \
                and kwargs.get("output_attentions"):
            raise ValueError("output_attentions with a static KV cache is not supported on a pruned model (its maps "
                             "would index the cache's slots, not positions): use the default dynamic cache")
        previous = self.generation
        mask = kwargs.get("attention_mask")
        self.generation = Generation(attention_mask=mask if torch.is_tensor(mask) and mask.dim() == 2 else None)
        try:
            return type(self.model).generate(self.model, *args, **kwargs)
        finally:
            self.generation, self.prepared_spatial = previous, None

    def _on_model_call(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args and torch.is_tensor(args[0]) else None)
        self.call_inputs = {
            "input_ids": input_ids,
            "labels": kwargs.get("labels") is not None,
            "attention_mask": kwargs.get("attention_mask"),
            "hidden_states_out": bool(kwargs.get("output_hidden_states",
                                                 getattr(module.config, "output_hidden_states", False))),
        }
        self.static_step = self._static_step(kwargs, input_ids)

    def _static_step(self, kwargs, input_ids) -> StaticStep | None:
        """A decoding step that continues a pruned prefill in a static cache, worked out here, before the
        forward: what the layers then do depends on no Python number that changes from step to step, so a
        compiled forward (`model.forward = torch.compile(model.forward)`) captures the decoding step once."""
        cache = kwargs.get("past_key_values")
        record = self._record_of(cache) if _is_static(cache) else None
        new = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
        if record is None or new is None or int(cache.get_seq_length()) == 0:
            return None
        record.extra += new.shape[1]
        return StaticStep(record, record.static_tables())

    def _on_model_return(self, module, args, output):
        # forget the call's inputs when it ends, so a later direct call of the decoder never sees stale ones
        self.call_inputs, self.record, self.current, self.static_step = {}, None, None, None
        if self.generation is None:  # inside generate, its prompt's preparation holds for every step
            self.prepared_spatial = None

    def _layer_pre_hook(self, idx: int, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if self.static_step is not None:
            return self._continue_static(idx, hidden, args, kwargs)
        if idx == 0:
            cache = kwargs.get("past_key_values", kwargs.get("past_key_value"))  # transformers 5 / 4.37
            past = 0 if cache is None else cache.get_seq_length()
            if self.generation is not None and self.generation.prompt_length is None:
                self.generation.prompt_length = past + hidden.shape[1]  # the call's first forward: its prompt
            if past > 0:
                self._begin_continuation(hidden, cache)
            else:
                self._begin_prefill(hidden, cache)
        if self.current is None:
            return self._continue_layer(idx, hidden, args, kwargs)
        return self._prefill_layer(idx, hidden, args, kwargs)

    def _layer_post_hook(self, idx: int, is_last: bool, module, args, output):
        if self.static_step is not None:  # its record is filed already
            return None
        if is_last:
            self._remember(self.record)
        run = self.current
        if run is None:
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        if is_last:
            self.current = None
            if self._last_position_only():  # the final norm and LM head then run on one row per sample
                last = hidden[:, -1:] if run.index is None else _gather_tokens(hidden, _slot_of(run, -1))
                return (last, *output[1:]) if isinstance(output, tuple) else last
        if run.index is None or not (is_last or self.call_inputs.get("hidden_states_out")):
            return None
        full = self._write_back(run, hidden)[:, : run.layout.spatial.shape[1]]
        run.restored = True
        return (full, *output[1:]) if isinstance(output, tuple) else full

    def _last_position_only(self) -> bool:
        """A prefill inside `generate` that nobody reads but for the next token: generate takes the logits of
        the last position, so the decoder hands on that position alone. Anything that reads more (labels
        and a loss, hidden-state outputs, a direct forward) gets the full length."""
        calls = self.call_inputs
        return self.generation is not None and not calls.get("hidden_states_out") and not calls.get("labels")

    def _attention_maps(self, idx: int, module, args, output):
        """Attention weights (output_attentions=True) at full size: zeros where the layer held no token."""
        record = self.record
        weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if weights is None or record is None:
            return None
        run = self.current
        if run is not None:  # prefill: queries and keys are the layer's slots
            index, ok = run.index, run.slot_ok
            if index is None:
                return None
            full = _scatter_maps(weights, index, ok, index, ok, record.length)
        else:  # decoding: the new tokens against the cached slots, then the new tokens
            index, ok = record.key_index[idx], record.key_ok[idx]
            if index is None:
                return None
            total, new = record.length + record.extra, weights.shape[-2]
            batch = weights.shape[0]
            added = torch.arange(record.length, total, device=index.device).expand(batch, -1)
            keys = torch.cat((index, added), 1)
            keys_ok = None if ok is None else torch.cat((ok, torch.ones_like(added, dtype=torch.bool)), 1)
            queries = added[:, added.shape[1] - new:]
            full = _scatter_maps(weights, queries - (total - new), None, keys, keys_ok, total, rows=new)
        return (output[0], full, *output[2:])

    def _widen_rotary(self, module, args, kwargs):
        # transformers 4.37 attention takes cos/sin[:keys it holds] and indexes them with position ids; a
        # layer holding pruned keys has positions beyond that count, so slice up to the full sequence.
        if self.record is None:
            return None
        return args, {**kwargs, "seq_len": max(kwargs["seq_len"], self.record.length + self.record.extra)}

    # ----- which prefill a cache continues ----------------------------------------------------------
    def _remember(self, record: Prefill | None) -> None:
        """After a forward: file its record under its cache, to be found when the cache is continued."""
        if record is None or record.cache is None:
            return
        cache = record.cache()
        if cache is None:
            return
        self.records.put(cache, record)
        keys = adapters.cache_keys(cache, 0)
        if keys is not None:
            self.records.put(keys, record)

    def _record_of(self, cache) -> Prefill | None:
        record = self.records.get(cache)
        if record is None:
            keys = adapters.cache_keys(cache, 0)
            record = None if keys is None else self.records.get(keys)
        return record

    # ----- prefill ----------------------------------------------------------------------------
    def _begin_prefill(self, hidden: torch.Tensor, cache) -> None:
        batch, length = hidden.shape[:2]
        check_window(length, self.adapter.sliding_window,
                     "pruning does not support sliding-window attention beyond the window")
        spatial = self._spatial_mask(batch, length, hidden.device)
        attention_mask = self.call_inputs.get("attention_mask")
        if not (torch.is_tensor(attention_mask) and attention_mask.dim() == 2) and self.generation is not None:
            attention_mask = self.generation.attention_mask  # generate built 4-D masks: the caller's padding
        if attention_mask is not None and (attention_mask.dim() != 2 or tuple(attention_mask.shape) != (batch, length)):
            attention_mask = None  # a 4-D or cache-length mask: padding is then already in the layer masks
        if attention_mask is not None and not bool(attention_mask[:, -1].all()):
            raise ValueError("adatoken needs left padding (the last position of every sample must be a real token); "
                             "set tokenizer.padding_side = 'left'")
        layout = TokenLayout.build(spatial, attention_mask, self._query_positions(batch, length, hidden.device))
        layout.spatial[torch.arange(batch), layout.prompt_end] = False  # the ranking query is never dropped
        num_spatial = layout.num_spatial
        counts = [list(c) for c in zip(*(self.method.counts(self.schedule, n) for n in num_spatial))]
        ordinal = (layout.spatial.cumsum(1) - 1).clamp(min=0)
        self.current = Pass(layout, counts, layout.real.sum(1).tolist(), ordinal, alive=layout.spatial,
                            slots=[length] * batch, points=self._explicit_points(batch, length))
        per_layer = [None] * self.adapter.num_layers
        self.record = Prefill(length, list(per_layer), list(per_layer), shift=list(per_layer),
                              cache=None if cache is None else weakref.ref(cache),
                              static=cache.layers[0].max_cache_len if _is_static(cache) else None)
        self.stats = PruneStats([[0] * batch for _ in counts], [[0] * batch for _ in counts], self.adapter.text_config,
                                layout.spatial, self.record)

    def _spatial_mask(self, batch: int, length: int, device) -> torch.Tensor:
        spatial = find_spatial((batch, length), device, self._explicit_mask(batch, length),
                               self.call_inputs.get("input_ids"), self.adapter.spatial_token_ids)
        if spatial is None:  # nothing says where spatial tokens are: runs unpruned, and says so once
            self._warn_no_spatial()
            return torch.zeros(batch, length, dtype=torch.bool, device=device)
        return spatial

    def _explicit_mask(self, batch: int, length: int) -> torch.Tensor | None:
        """The mask given with `spatial_tokens`, fitted to this forward inside `generate`: repeated as generate
        repeats the prompt (beams, num_return_sequences), and False over tokens generated after the prompt."""
        mask = self.explicit_spatial if self.explicit_spatial is not None else self.prepared_spatial
        call = self.generation
        if mask is None or call is None or not torch.is_tensor(mask) or mask.dim() != 2:
            return mask
        if mask.shape[0] < batch and batch % mask.shape[0] == 0:  # generate repeats each prompt in place
            mask = mask.repeat_interleave(batch // mask.shape[0], dim=0)
        if mask.shape[1] == call.prompt_length < length:  # use_cache=False: the prompt and what followed it
            mask = torch.cat((mask, mask.new_zeros(mask.shape[0], length - mask.shape[1])), 1)
        return mask

    def _explicit_points(self, batch: int, length: int) -> torch.Tensor | None:
        """The spatial tokens' positions given with `spatial_tokens(..., points=)`, fitted to this forward as the
        mask is (repeated for beams, zero over tokens generated after the prompt)."""
        points = self.explicit_points
        if points is None:
            return None
        if points.shape[0] < batch and batch % points.shape[0] == 0:
            points = points.repeat_interleave(batch // points.shape[0], dim=0)
        if points.shape[1] < length:
            later = points.new_zeros(points.shape[0], length - points.shape[1], points.shape[2])
            points = torch.cat((points, later), 1)
        if points.shape[:2] != (batch, length):
            raise ValueError(f"the spatial points have shape {tuple(points.shape)} but the input is [batch, seq] = "
                             f"{(batch, length)}: give one [x, y, z] per input position")
        return points

    def _query_positions(self, batch: int, length: int, device) -> torch.Tensor | None:
        """Position of the last instruction token per sample: given; inside `generate`, the prompt's last
        token (without a cache every step is a new prefill of the prompt and what followed); else None,
        the prefill's last position."""
        if self.explicit_query is not None:
            return check_query_index(self.explicit_query, batch, length, device)
        call = self.generation
        if call is not None and call.prompt_length < length:
            return torch.full((batch,), call.prompt_length - 1, dtype=torch.long, device=device)
        return None

    def _warn_no_spatial(self) -> None:
        if self.call_inputs.get("input_ids") is not None and self.adapter.spatial_token_ids:
            return  # a multimodal model's text-only input: nothing to prune, nothing wrong
        self._warn_once("no_spatial", (
            f"adatoken: this pruned {self.adapter.model_type!r} model found no spatial tokens in its input, so "
            "it ran unpruned. Likely causes: a text decoder (or LLaVA-3D's LLM) called without marking them "
            "(wrap the call in `with adatoken.spatial_tokens(model, mask):`); a multimodal model called with "
            "inputs_embeds (pass input_ids, or mark them the same way); or the inner decoder (e.g. "
            "model.model.language_model) pruned instead of the model whose config has image_token_id "
            "(prune the full model)."))

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self.warned:
            self.warned.add(key)
            warnings.warn(message, stacklevel=4)

    def _prefill_layer(self, idx: int, hidden, args, kwargs):
        run = self.current
        if run.restored:  # the previous layer handed on full length (hidden-state outputs): re-select
            hidden = _gather_tokens(hidden, run.index)
            run.restored = False
        target = run.counts[idx]
        alive_counts = run.counts[idx - 1] if idx > 0 else run.counts[0]
        following = run.counts[idx + 1] if idx + 1 < len(run.counts) else target
        drops = any(t < a for t, a in zip(target, alive_counts))
        # a method that ranks a drop by the layer before it (DivPrune, from layer 0's input) scores it here
        ranks_next = self.method.rank_layer_offset and any(f < t for f, t in zip(following, target))
        if drops or ranks_next:
            with self.selection_timer.measure(hidden.device) if self.selection_timer else contextlib.nullcontext():
                if drops:
                    scores, run.pending = run.pending, None
                    if scores is None:
                        ctx = self._rank_context(idx, run, hidden, self._sliced(run, kwargs), target)
                        scores = self._scores(ctx, run)
                    hidden = self._prune(run, hidden, scores, target, alive_counts)
                if ranks_next:
                    ctx = self._rank_context(idx, run, hidden, self._sliced(run, kwargs), following)
                    run.pending = self._scores(ctx, run)
        # a method that also reads the previous layer (DART, FastV) finds its input, and the keys its attention
        # projects (caught as k_proj returns them: no second projection), here at the next layer
        run.previous = None
        if self.method.uses_previous_input and following != target:
            run.previous = (idx, hidden, kwargs, {})
            _catch_output(self.adapter.key_projection(idx), run.previous[3], "keys")
        self.record.key_index[idx] = run.index
        self.record.key_ok[idx] = run.slot_ok
        if self.method.renumbers_positions and run.index is not None:
            self.record.shift[idx] = torch.tensor([n - t for n, t in zip(run.counts[0], target)], device=hidden.device)
        self.stats.spatial_in[idx] = list(target)
        self.stats.tokens_in[idx] = [r - (n - t) for r, n, t in zip(run.real_tokens, run.counts[0], target)]
        if run.index is None:
            return None
        kwargs = self._sliced(run, kwargs)
        return ((hidden, *args[1:]) if args else ()), ({**kwargs} if args else {**kwargs, "hidden_states": hidden})

    def _rank_context(self, idx: int, run: Pass, hidden, kwargs, target: list[int]) -> RankContext:
        """What a method may look at to rank the alive spatial tokens from layer `idx`'s input, keeping `target`."""
        batch, length = hidden.shape[:2]
        device = hidden.device
        index, slot_ok = run.slot_tables(batch, length, device)
        cos, sin = self.adapter.layer_rope(idx, hidden, kwargs, self.record.length)
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
            target=list(target), points=None if run.points is None else _gather_tokens(run.points, index),
            final_norm=self.adapter.decoder.norm, memo=run.memo,
            rope_at=None if self.adapter.multimodal_rope else partial(self.adapter.rope_at, idx, hidden),
        )
        if run.previous is not None and run.previous[0] == idx - 1:
            before, previous_hidden, previous_kwargs, caught = run.previous
            ctx.previous = self._rank_context(before, run, previous_hidden, self._sliced(run, previous_kwargs), target)
            ctx.previous.keys = caught.get("keys")
        return ctx

    def _scores(self, ctx: RankContext, run: Pass) -> torch.Tensor:
        with torch.no_grad():
            scores = self.method.score(ctx).float().nan_to_num(nan=-1e30, posinf=1e30, neginf=-1e30)
        return scores.masked_fill(~run.alive, float("-inf"))

    def _prune(self, run: Pass, hidden, scores: torch.Tensor, target: list[int], alive_counts: list[int]):
        batch, length = hidden.shape[:2]
        device = hidden.device
        index, slot_ok = run.slot_tables(batch, length, device)
        with torch.no_grad():
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
            # Kept tokens keep their original positions, or (a method whose released code renumbers them) take
            # the positions of the first tokens of the input, in order: 0..n-1 without padding.
            at = torch.arange(index.shape[1], device=index.device).expand_as(index) \
                if self.method.renumbers_positions else index
            sliced = {}
            if kwargs.get("position_embeddings") is not None:
                sliced["position_embeddings"] = tuple(_gather_tokens(t.expand(batch, -1, -1), at)
                                                      for t in kwargs["position_embeddings"])
            if kwargs.get("position_ids") is not None:
                sliced["position_ids"] = kwargs["position_ids"].expand(batch, -1).gather(1, at)
            sliced["attention_mask"] = _prefill_mask(kwargs.get("attention_mask"), index, run.slot_ok,
                                                     self.adapter.attn_implementation, run.buffer.dtype,
                                                     self.record.static)
            run.sliced_for, run.sliced = index, sliced
        return {**kwargs, **run.sliced}

    # ----- decoding ---------------------------------------------------------------------------
    def _begin_continuation(self, hidden: torch.Tensor, cache) -> None:
        self.current = None
        self.record = self._record_of(cache)
        if self.record is not None:
            self.record.extra += hidden.shape[1]
            self.record.cache = weakref.ref(cache)
        batch, length = hidden.shape[:2]
        explicit = self.explicit_spatial  # a mask of the whole conversation marks the new tokens in its last columns
        past = cache.get_seq_length()
        if torch.is_tensor(explicit) and explicit.dim() == 2 and explicit.shape == (batch, past + length):
            explicit = explicit[:, past:]
        elif explicit is not None:
            explicit = None  # the prompt's mask, still set while generate decodes
        new_spatial = find_spatial((batch, length), hidden.device, explicit, self.call_inputs.get("input_ids"),
                                   self.adapter.spatial_token_ids)
        if new_spatial is not None and bool(new_spatial.any()):
            self._warn_once("later_image", (
                "adatoken: spatial tokens arrived in a later turn of a conversation (after its first prefill); "
                "they are kept, not pruned: only a prefill prunes. To prune them, start a new conversation "
                "(a prefill without past_key_values) that holds them."))

    def _continue_static(self, idx: int, hidden, args, kwargs):
        """One decoding step in layer `idx` of a static cache: its mask is the step's mask gathered at the
        positions the layer's slots hold (StaticStep), and a renumbering method's positions shift."""
        record, gather, ok = self.static_step.record, *self.static_step.tables[idx]
        mask = kwargs.get("attention_mask")
        if gather is None:
            return None
        _check_static_mask(mask)
        if mask is None:
            raise ValueError("a static KV cache decoding step came without an attention mask; adatoken needs the "
                             "4-D mask transformers builds for eager and sdpa attention")
        mask = mask.expand(gather.shape[0], -1, -1, -1)
        index = gather[:, None, None, :].expand(-1, mask.shape[1], mask.shape[2], -1)
        changes = {"attention_mask": _disallow(mask.gather(3, index), ~ok[:, None, None, :])}
        if record.shift[idx] is not None:
            changes.update(self.adapter.shifted_positions(hidden, kwargs, record.shift[idx]))
        return args, {**kwargs, **changes}

    def _continue_layer(self, idx: int, hidden, args, kwargs):
        record = self.record
        if record is None or record.key_index[idx] is None:
            return None
        changes = {}
        if record.shift[idx] is not None:  # renumbered: a new token follows the tokens this layer still holds
            changes.update(self.adapter.shifted_positions(hidden, kwargs, record.shift[idx]))
        mask = kwargs.get("attention_mask")
        key_ok = record.key_ok[idx]
        if mask is not None or key_ok is not None:  # else sdpa without padding: the cache holds exactly the keys
            changes["attention_mask"] = _decode_mask(mask, record, idx, hidden.shape[1],
                                                     self.adapter.attn_implementation, hidden.dtype)
        return (args, {**kwargs, **changes}) if changes else None


# ----- tensor helpers ------------------------------------------------------------------------------
def _slot_of(run: Pass, position: int) -> torch.Tensor:
    """[B, 1] the slot holding an original position (negative: from the end) in every sample of a prefill."""
    position %= run.layout.spatial.shape[1]
    return (run.index == position).to(torch.int8).argmax(1, keepdim=True)


def _is_static(cache) -> bool:
    return cache is not None and type(cache).__name__ == "StaticCache"


def _scatter_maps(weights: torch.Tensor, queries: torch.Tensor, queries_ok, keys: torch.Tensor, keys_ok,
                  length: int, rows: int | None = None) -> torch.Tensor:
    """weights [B, H, Q, K] of slots -> [B, H, rows or length, length] at original positions, zero elsewhere."""
    batch, heads = weights.shape[:2]
    full = weights.new_zeros(batch, heads, (rows or length) + 1, length + 1)  # last row and column: scratch
    q = queries if queries_ok is None else queries.masked_fill(~queries_ok, rows or length)
    k = keys if keys_ok is None else keys.masked_fill(~keys_ok, length)
    index = (q[:, :, None] * (length + 1) + k[:, None, :]).reshape(batch, 1, -1).expand(-1, heads, -1)
    full.view(batch, heads, -1).scatter_(2, index, weights.reshape(batch, heads, -1))
    return full[:, :, :-1, :-1]


def _catch_output(module: nn.Module, into: dict, key: str) -> None:
    """Store what `module` returns the next time it runs in into[key]; the hook then removes itself."""
    def hook(_module, _args, output):
        into[key] = output
        handle.remove()

    handle = module.register_forward_hook(hook)


def _gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


def _mask_value(allowed: torch.Tensor, impl: str, dtype: torch.dtype) -> torch.Tensor:
    """A boolean 'may attend' tensor in the form the attention implementation expects."""
    if impl == "eager":
        return torch.zeros(allowed.shape, dtype=dtype,
                           device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)
    return allowed


def _disallow(mask: torch.Tensor, blocked: torch.Tensor) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return mask & ~blocked
    return mask.masked_fill(blocked, torch.finfo(mask.dtype).min)


def _check_static_mask(mask) -> None:
    if mask is not None and mask.dim() != 4:
        raise ValueError("a static KV cache with pruning needs eager or sdpa attention (their 4-D masks); "
                         f"this model's attention hands its layers a {mask.dim()}-D mask")


def _with_empty_slots(held: torch.Tensor, width: int) -> torch.Tensor:
    """A 4-D mask over the slots a layer holds, widened to a static cache's `width` slots, the rest never attended."""
    empty = (*held.shape[:3], width - held.shape[-1])
    blocked = torch.zeros(empty, dtype=torch.bool, device=held.device) if held.dtype == torch.bool else \
        torch.full(empty, torch.finfo(held.dtype).min, dtype=held.dtype, device=held.device)
    return torch.cat((held, blocked), -1)


def _prefill_mask(mask, index, slot_ok, impl: str, dtype, static: int | None = None):
    """The layer's mask over its current slots. With a static cache of `static` slots the keys are all of them: the
    layer's tokens fill its first `length` slots (it writes them there), and the slots after them are empty."""
    batch, length = index.shape
    if static:
        _check_static_mask(mask)
        held = _prefill_mask(None if mask is None else mask[..., : mask.shape[2]], index, slot_ok, impl, dtype)
        # None: sdpa's is_causal aligns queries to the first keys, so it also never reaches the empty slots
        return held if held is None else _with_empty_slots(held, static)
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
def spatial_tokens(model: nn.Module, mask: torch.Tensor, query_index: torch.Tensor | int | None = None,
                   points: torch.Tensor | None = None):
    """Mark which input positions are spatial tokens (bool [batch, seq]) for forwards inside the block.

    How LLaVA-3D-style models that call their LLM with `inputs_embeds` tell the runtime where the
    spatial tokens are. `query_index` is the position of the last instruction token (the ranking
    query); it defaults to the last position, which is right for generation but not for a forward
    that already contains answer tokens (training, or recomputing a generation without a cache).
    `points` [batch, seq, c] places each spatial token in space (its 3D point; read where the mask is
    True), for methods that select by geometry (`coverage`).
    On a model that is not pruned it only checks the mask.
    """
    if not torch.is_tensor(mask) or mask.dim() != 2:
        raise ValueError("the spatial mask must be a [batch, seq] tensor, "
                         f"got {getattr(mask, 'shape', type(mask).__name__)}")
    if points is not None and (not torch.is_tensor(points) or points.dim() != 3 or points.shape[:2] != mask.shape):
        raise ValueError(f"spatial points must be a [batch, seq, c] tensor matching the mask {tuple(mask.shape)}, "
                         f"got {getattr(points, 'shape', type(points).__name__)}")
    state = getattr(model, STATE_ATTR, None)
    if state is None:
        yield
        return
    previous = state.explicit_spatial, state.explicit_query, state.explicit_points
    state.explicit_spatial, state.explicit_query, state.explicit_points = mask, query_index, points
    try:
        yield
    finally:
        state.explicit_spatial, state.explicit_query, state.explicit_points = previous


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
