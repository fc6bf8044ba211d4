"""Static decoding: a batch's one-token-per-row passes on preallocated buffers, eagerly or
replayed as a CUDA graph.

On a GPU a decode step of a batch reads every weight once, and launching its hundreds of small
kernels from Python costs more than that. A CUDA graph launches them all at once, but it replays
fixed addresses and shapes, so a static decode keeps everything in place: the key/value cache in
tensors sized for the whole reply (`KeyValueBuffers`, written at a column held in a tensor), a 4D
attention mask (transformers takes a 4D mask as it is), and the inputs and positions in buffers
copied into before each step. Rows are never dropped: a finished row keeps computing and its
tokens are ignored.

A trial's edits are forward hooks, and a graph replays whatever ran when it was captured, so a
graph lives for one batch's generation only (`Decoding`): its first step runs eagerly (the
warm-up), the second is captured, and the rest replay it. Anything that fails there turns
graphs off for the model (said once), never the generation.

Whether a model qualifies is decided once (`StaticDecoder.for_model`): a plain key/value cache,
an attention that takes a 4D mask, no experts (their routing may depend on the batch), and a few
static steps that agree with the dynamic path on a probe.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import torch

from hctl_worker.encoding import (
    cache_option,
    forward_options,
    new_cache,
    position_ids_for,
    returned_cache,
)

if TYPE_CHECKING:
    from hctl_worker.model import LoadedModel

log = logging.getLogger(__name__)

# "auto": graphs on CUDA when the model qualifies, else the dynamic path; "eager": the static
# path without graphs (tests and checks compare it with the dynamic path); "off": never.
DecodeMode = Literal["auto", "eager", "off"]
_ATTENTIONS = ("sdpa", "eager")  # implementations that take a 4D mask as it is
_EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
_PROBE_STEPS = 4


class KeyValueBuffers:
    """A key/value cache of fixed size with the protocol the decoder layers call: `update`
    writes a step's keys and values at column `index` (a tensor, so a graph replays it for any
    column) and hands back every column; the mask hides those not written yet."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], filled: int) -> None:
        self.keys, self.values = keys, values
        self.filled = filled  # columns written so far
        self.index = torch.tensor([filled], dtype=torch.long, device=keys[0].device)

    @classmethod
    def from_cache(cls, cache, columns: int) -> KeyValueBuffers | None:
        """The cache's keys and values copied into buffers of `columns` columns (None when it
        is not a plain cache whose layers hold the same columns)."""
        layers = getattr(cache, "layers", None)
        if not layers or any(type(layer).__name__ != "DynamicLayer" for layer in layers):
            return None
        filled = {int(layer.keys.shape[-2]) for layer in layers if layer.keys is not None}
        if len(filled) != 1 or any(layer.keys is None for layer in layers):
            return None
        (filled_columns,) = filled
        keys, values = [], []
        for layer in layers:
            for source, target in ((layer.keys, keys), (layer.values, values)):
                rows, heads, _, width = source.shape
                buffer = source.new_zeros((rows, heads, columns, width))
                buffer[:, :, :filled_columns] = source
                target.append(buffer)
        return cls(keys, values, filled_columns)

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        self.keys[layer_idx].index_copy_(2, self.index, key_states)
        self.values[layer_idx].index_copy_(2, self.index, value_states)
        return self.keys[layer_idx], self.values[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.filled

    def advance(self) -> None:
        self.filled += 1
        self.index.fill_(self.filled)


class StaticDecoder:
    """Whether (and how) a model's width-1 passes run statically: decided once per model."""

    def __init__(self, static: bool, graphs: bool, reason: str) -> None:
        self.static = static
        self.graphs = graphs
        self.reason = reason

    @classmethod
    def off(cls, reason: str = "decode_graphs = off") -> StaticDecoder:
        return cls(False, False, reason)

    @classmethod
    def for_model(
        cls, loaded: LoadedModel, mode: DecodeMode, plain_cache: bool = True
    ) -> StaticDecoder:
        on_cuda = loaded.input_device.type == "cuda"
        if mode == "off" or (mode == "auto" and not on_cuda):
            reason = "decode_graphs = off" if mode == "off" else "not on a CUDA device"
            return cls.off(reason)
        unfit = _unfit(loaded, plain_cache)
        if unfit is None:
            try:
                unfit = _probe(loaded)
            except Exception as error:  # a model the static path cannot run: the dynamic one
                unfit = f"a static decode step failed ({type(error).__name__}: {error})"
        if unfit is not None:
            decoder = cls.off(f"the dynamic path: {unfit}")
        else:
            graphs = mode == "auto"
            how = "CUDA graphs" if graphs else "static buffers, eagerly"
            decoder = cls(True, graphs, f"decode steps on {how}")
        log.info("decode steps: %s", decoder.reason)
        return decoder

    def describe(self) -> str:
        return self.reason

    def fall_back(self, error: BaseException) -> None:
        """Graph capture failed: eager static steps from now on for this model (said once)."""
        self.graphs = False
        self.reason = f"decode steps eagerly: CUDA graphs failed ({type(error).__name__})"
        log.warning("%s: %s", self.reason, error)


def _unfit(loaded: LoadedModel, plain_cache: bool) -> str | None:
    """Why the model cannot decode statically, from what it declares (None: it may)."""
    config = loaded.model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if not plain_cache:
        return "its cache is not a plain key/value cache"
    attention = getattr(config, "_attn_implementation", None) or "eager"
    if attention not in _ATTENTIONS:
        return f"its attention ({attention}) does not take a 4D mask"
    if any(int(getattr(text, key, 0) or 0) > 1 for key in _EXPERT_KEYS):
        return "its experts' routing may depend on the batch"
    return None


def _probe(loaded: LoadedModel) -> str | None:
    """A few greedy steps of two rows (one left-padded) both ways, the static one fed the dynamic
    one's tokens; None when their logits agree (to rounding: in 16 bits a longer cache may round
    differently) and, in float32, so do their choices."""
    device = loaded.input_device
    vocab = int(loaded.model.get_input_embeddings().weight.shape[0])
    tokens = torch.arange(5, dtype=torch.long) * 7919 % max(vocab - 1, 1) + 1
    input_ids = torch.stack([tokens, tokens.roll(1)]).to(device)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :2] = 0
    with torch.inference_mode():
        plain = _probe_logits(loaded, input_ids, attention_mask)
        static = _probe_logits(loaded, input_ids, attention_mask, fed=plain.argmax(-1))
    if static is None:
        return "its cache cannot be copied into buffers"
    exact = loaded.dtype == torch.float32
    if exact and not torch.equal(plain.argmax(-1), static.argmax(-1)):
        return "static steps chose other tokens than dynamic ones on a probe"
    scale = float(plain.abs().max()) or 1.0
    tolerance = 1e-4 if exact else 5e-2
    if float((plain - static).abs().max()) > tolerance * scale:
        return "static steps' logits differ from dynamic ones on a probe"
    return None


def _probe_logits(loaded, input_ids, attention_mask, fed=None) -> torch.Tensor | None:
    """[rows, 1 + steps, vocab] float logits of greedy steps: dynamic, or static when `fed`
    gives the token fed at each step (None: the cache cannot be copied)."""
    model = loaded.model
    cache = new_cache(model)

    def dynamic_step(ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor):
        nonlocal cache
        outputs = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **cache_option(model, cache),
            **forward_options(model),
        )
        cache = returned_cache(outputs, cache)
        return outputs.logits[:, -1, :].float()

    positions = position_ids_for(attention_mask)
    logits = [dynamic_step(input_ids, attention_mask, positions)]
    position = positions[:, -1:] + 1
    decoding = None
    if fed is not None:
        decoding = Decoding.start(loaded, cache, attention_mask, _PROBE_STEPS)
        if decoding is None:
            return None
    for step in range(_PROBE_STEPS):
        token = logits[-1].argmax(-1, keepdim=True) if fed is None else fed[:, step : step + 1]
        if decoding is not None:
            step_logits = decoding.step_logits(token, position, [1, 1])
        else:
            attention_mask = torch.cat([attention_mask, torch.ones_like(token)], 1)
            step_logits = dynamic_step(token, attention_mask, position)
        logits.append(step_logits)
        position = position + 1
    return torch.stack(logits, 1)


class Decoding:
    """One batch's static decode: the buffers, and (on CUDA) its graph once captured."""

    def __init__(
        self,
        loaded: LoadedModel,
        cache: KeyValueBuffers,
        mask: torch.Tensor,
        decoder: StaticDecoder | None = None,
    ) -> None:
        self.loaded, self.cache, self.decoder = loaded, cache, decoder
        rows, device = mask.shape[0], mask.device
        self.boolean = mask.dtype == torch.bool  # sdpa's mask (`start`); else additive
        self.mask = mask  # [rows, 1, 1, columns]: True (or 0.0) where a column is attended
        self.input_ids = torch.zeros((rows, 1), dtype=torch.long, device=device)
        self.position_ids = torch.zeros((rows, 1), dtype=torch.long, device=device)
        self.logits: torch.Tensor | None = None
        self.choices: torch.Tensor | None = None
        self.use_graphs = decoder is not None and decoder.graphs
        self.stream = None  # the side stream of the warm-up and the capture
        self.graph = None
        self.steps = 0

    @classmethod
    def start(
        cls,
        loaded: LoadedModel,
        cache,
        attention_mask: torch.Tensor,
        steps: int,
        decoder: StaticDecoder | None = None,
    ) -> Decoding | None:
        """Buffers for `steps` more columns after a dynamic cache and its 2D mask (None when the
        cache cannot be copied)."""
        columns = attention_mask.shape[1] + steps
        buffers = KeyValueBuffers.from_cache(cache, columns)
        if buffers is None or buffers.filled != attention_mask.shape[1]:
            return None
        attention = getattr(loaded.model.config, "_attn_implementation", None) or "eager"
        rows = attention_mask.shape[0]
        seen = torch.zeros((rows, columns), dtype=torch.bool, device=attention_mask.device)
        seen[:, : attention_mask.shape[1]] = attention_mask.bool()
        if attention == "sdpa":
            mask = seen[:, None, None, :]
        else:
            low = torch.finfo(loaded.dtype).min
            mask = torch.zeros(seen.shape, dtype=loaded.dtype, device=seen.device)
            mask = mask.masked_fill_(~seen, low)[:, None, None, :]
        return cls(loaded, buffers, mask.contiguous(), decoder)

    def step(self, tokens: Sequence[int], positions: Sequence[int], live: Sequence[int]) -> list:
        """One pass of one token per row; the greedy choice per row (as [[token], ...])."""
        device = self.input_ids.device
        self._load(
            torch.tensor(tokens, dtype=torch.long)[:, None].to(device),
            torch.tensor(positions, dtype=torch.long)[:, None].to(device),
            live,
        )
        if self.graph is not None:
            self.graph.replay()
        elif self.use_graphs:
            self._on_graphs()
        else:
            self._forward()
        self.cache.advance()
        return self.choices[:, None].tolist()

    def step_replies(self, replies: Sequence, pad: int) -> list:
        """One pass after each reply's newest token (a reply has `tokens`, `position` of the
        next token, advanced here, and `done`); the greedy choice per row."""
        tokens = [reply.tokens[-1] if reply.tokens else pad for reply in replies]
        positions = [reply.position for reply in replies]
        for reply in replies:
            reply.position += 1
        return self.step(tokens, positions, [not reply.done for reply in replies])

    def step_logits(self, tokens: torch.Tensor, positions: torch.Tensor, live) -> torch.Tensor:
        """One eager pass (for the probe): the float logits of each row's token."""
        self._load(tokens, positions, live)
        self._forward()
        self.cache.advance()
        return self.logits[:, -1, :].float()

    def _load(self, tokens: torch.Tensor, positions: torch.Tensor, live) -> None:
        self.steps += 1
        self.input_ids.copy_(tokens)
        self.position_ids.copy_(positions)
        column = torch.tensor(list(live), dtype=torch.bool).to(self.mask.device)
        if self.boolean:
            self.mask[:, 0, 0, self.cache.filled] = column
        else:
            low = torch.finfo(self.mask.dtype).min
            self.mask[:, 0, 0, self.cache.filled] = (~column).to(self.mask.dtype) * low

    def _forward(self) -> None:
        model = self.loaded.model
        outputs = model(
            input_ids=self.input_ids,
            attention_mask=self.mask,
            position_ids=self.position_ids,
            use_cache=True,
            **cache_option(model, self.cache),
            **forward_options(model),
        )
        self.logits = outputs.logits
        self.choices = outputs.logits[:, -1, :].argmax(dim=-1)

    def _on_graphs(self) -> None:
        """The first step eagerly (the warm-up), the second captured as a graph and replayed,
        both on a side stream; any failure runs the step eagerly and turns graphs off for the
        model. (Not `torch.cuda.graph`: it collects garbage and empties the allocator's cache on
        every capture, which here is every batch of every trial.)"""
        device = self.input_ids.device
        try:
            if self.stream is None:
                self.stream = torch.cuda.Stream(device)
            self.stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(self.stream):
                if self.steps == 1:
                    self._forward()
                else:
                    graph = torch.cuda.CUDAGraph()
                    graph.capture_begin(capture_error_mode="thread_local")
                    try:
                        self._forward()
                    finally:
                        graph.capture_end()
                    self.graph = graph
            torch.cuda.current_stream(device).wait_stream(self.stream)
        except Exception as error:
            self.use_graphs, self.graph = False, None
            if self.decoder is not None:
                self.decoder.fall_back(error)
            self._forward()
            return
        if self.graph is not None:
            self.graph.replay()


__all__ = ["DecodeMode", "Decoding", "KeyValueBuffers", "StaticDecoder"]
