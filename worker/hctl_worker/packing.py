"""Packed prompts: a prefill that computes no padding.

A batch's prompts are left-padded to its longest, and a prefill computes every padding column as
if it were a token: on real prompt sets a quarter of a KL pass or a reply's first pass can be
padding. Packed, the prompts (less the shared prefix) lie end to end, a few to a row, and a 4-D
attention mask lets each attend only to the prefix and to its own earlier tokens, at the
positions it has in the padded batch. Same computation, fewer columns.

What the pass leaves is put back in the padded batch's layout, so the rest of a generation never
knows: the logits of each prompt's last token (gathered before the output head, which then runs
on one column per prompt, not on every column), and the keys and values, moved row by row into
the padded rows (`regrid`). Since only the last tokens reach the head, the last layer's MLP runs
on them alone too (the keys and values of that layer come before it). `Reuse` compares a packed
pass and the next token with the padded ones on the unmodified model before it packs anything (a
model whose attention ignores 4-D masks, or that adds position biases of its own, would not
match).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from hctl_worker.architecture import find_layers, mlp_block
from hctl_worker.encoding import cache_option, forward_options, returned_cache

# A packing is used only if it costs at most this share of the padded pass (estimated).
WORTH_PACKING = 0.95

# A batch's attention mask is kept for the next trials up to this size.
KEPT_MASK_BYTES = 32 * 2**20


@dataclass
class Packing:
    """Where each prompt of a padded batch lies in a packed one."""

    input_ids: torch.Tensor  # [bins, width]: the prompts end to end, padding after them
    position_ids: torch.Tensor  # [bins, width]: each token's position in the padded batch
    prefix: int  # shared-prefix columns in front of every row's keys and values
    bins: list[int]  # per prompt (padded row): its packed row
    starts: list[int]  # per prompt: its first column in that row
    lengths: list[int]  # per prompt: its tokens
    grid_width: int  # the padded batch's columns after the prefix
    _masks: dict = field(default_factory=dict, repr=False)
    _indices: dict = field(default_factory=dict, repr=False)
    _last_mlp: dict = field(default_factory=dict, repr=False)  # id(model) -> module or None
    _ends: dict = field(default_factory=dict, repr=False)  # device -> each prompt's last token

    @property
    def rows(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def width(self) -> int:
        return int(self.input_ids.shape[1])

    def attention_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """[bins, 1, width, prefix + width], additive: 0 where a token may attend (the prefix,
        and its own prompt's tokens up to itself), the dtype's minimum elsewhere."""
        if dtype not in self._masks:
            device = self.input_ids.device
            segment = torch.full((self.rows, self.width), -1, dtype=torch.long)
            for index, (row, start, length) in enumerate(
                zip(self.bins, self.starts, self.lengths, strict=True)
            ):
                segment[row, start : start + length] = index
            columns = torch.arange(self.width)
            causal = columns[None, :] <= columns[:, None]
            same = (segment[:, :, None] == segment[:, None, :]) & causal
            inside = segment >= 0
            # Padding after the last prompt of a row attends to itself only.
            same = (same & inside[:, :, None]) | (
                ~inside[:, :, None] & torch.eye(self.width, dtype=torch.bool)
            )
            prefix = inside[:, :, None].expand(self.rows, self.width, self.prefix)
            allowed = torch.cat([prefix, same], dim=-1)[:, None]
            mask = torch.zeros(allowed.shape, dtype=dtype)
            mask = mask.masked_fill_(~allowed, torch.finfo(dtype).min).to(device)
            if mask.nbytes > KEPT_MASK_BYTES:
                return mask  # made again for each pass rather than held for the whole search
            self._masks[dtype] = mask
        return self._masks[dtype]

    def _index(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Per padded row, its packed row ([prompts, 1]) and, per padded column (prefix
        included), the packed column it takes its keys from ([prompts, prefix + grid width]).
        Padding columns take a token's (finite) keys: they are masked, never read."""
        if device not in self._indices:
            grid = torch.arange(self.grid_width)
            columns = []
            for start, length in zip(self.starts, self.lengths, strict=True):
                own = (grid - (self.grid_width - length)).clamp(min=0) + start + self.prefix
                columns.append(torch.cat([torch.arange(self.prefix), own]))
            rows = torch.tensor(self.bins, dtype=torch.long)[:, None]
            self._indices[device] = (rows.to(device), torch.stack(columns).to(device))
        return self._indices[device]

    def regrid(self, cache) -> None:
        """Move a packed pass's keys and values (prefix included) into the padded layout."""
        for layer in cache.layers:
            rows, columns = self._index(layer.keys.device)
            layer.keys = layer.keys[rows, :, columns, :].transpose(1, 2).contiguous()
            layer.values = layer.values[rows, :, columns, :].transpose(1, 2).contiguous()

    def _last_tokens(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Each prompt's last token, in padded-row order: (packed rows, packed columns)."""
        if device not in self._ends:
            rows = torch.tensor(self.bins, dtype=torch.long)
            ends = torch.tensor(
                [
                    start + length - 1
                    for start, length in zip(self.starts, self.lengths, strict=True)
                ]
            )
            self._ends[device] = (rows.to(device), ends.to(device))
        return self._ends[device]

    @contextmanager
    def last_tokens_only(self, model: torch.nn.Module) -> Iterator[None]:
        """The output head sees only each prompt's last token, in padded-row order: the logits
        come out as [prompts, 1, vocabulary]."""
        head = model.get_output_embeddings()
        if head is None:
            raise ValueError("the model has no output head to gather before")

        def gather(module, args):
            hidden = args[0]
            if tuple(hidden.shape[:2]) != (self.rows, self.width):
                raise ValueError("the output head was not given every packed column")
            rows, ends = self._last_tokens(hidden.device)
            return (hidden[rows, ends][:, None, :], *args[1:])

        handle = head.register_forward_pre_hook(gather)
        try:
            yield
        finally:
            handle.remove()

    @contextmanager
    def last_mlp_on_last_tokens(self, model: torch.nn.Module) -> Iterator[None]:
        """The last layer's MLP computes each prompt's last token only: at every other column
        its output reaches nothing but the output head, which reads the last tokens alone. The
        other columns get zeros. (A layer whose MLP is not one block of its own runs whole.)"""
        if id(model) not in self._last_mlp:
            self._last_mlp[id(model)] = mlp_block(find_layers(model)[-1])
        block = self._last_mlp[id(model)]
        if block is None:
            yield
            return
        trimmed: list[bool] = []

        def pick(module, args):
            hidden = args[0] if args else None
            if not torch.is_tensor(hidden) or tuple(hidden.shape[:2]) != (self.rows, self.width):
                return None
            trimmed.append(True)
            rows, ends = self._last_tokens(hidden.device)
            return (hidden[rows, ends][:, None, :], *args[1:])

        def spread(module, args, output):
            if not trimmed:
                return None
            trimmed.clear()
            picked = output[0] if isinstance(output, tuple) else output
            full = picked.new_zeros((self.rows, self.width, picked.shape[-1]))
            rows, ends = self._last_tokens(picked.device)
            full[rows, ends] = picked[:, 0]
            return (full, *output[1:]) if isinstance(output, tuple) else full

        handles = [block.register_forward_pre_hook(pick), block.register_forward_hook(spread)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def run(self, model: torch.nn.Module, cache, dtype: torch.dtype, regrid: bool = True):
        """The packed forward pass into `cache` (which holds `bins` rows of the prefix); the
        cache is left in the padded layout (with `regrid`), the logits are each prompt's
        last."""
        with self.last_tokens_only(model), self.last_mlp_on_last_tokens(model):
            outputs = model(
                input_ids=self.input_ids,
                attention_mask=self.attention_mask(dtype),
                position_ids=self.position_ids,
                use_cache=True,
                **cache_option(model, cache),
                **forward_options(model, 0),
            )
        if regrid:
            self.regrid(returned_cache(outputs, cache))
        return outputs


def plan_packing(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prefix: int,
    pad_id: int,
    attention_weight: float,
) -> Packing | None:
    """Pack a left-padded batch (without the prefix's columns: `attention_mask` covers the
    same columns as `input_ids`) if that costs less than the padded pass, else None.

    The cost of a pass is taken as its cells, each weighed up by the attention it does
    (`1 + keys / attention_weight`: how many key columns cost as much as one token's matrix
    work): long packed rows are cheap in matrix work but dear in attention."""
    lengths = [int(n) for n in attention_mask.sum(dim=1).tolist()]
    grid_width = int(input_ids.shape[1])
    if len(lengths) < 2 or min(lengths) < 1:
        return None

    def cost(rows: int, width: int) -> float:
        return rows * width * (1.0 + (prefix + width) / attention_weight)

    best, best_cost = None, cost(len(lengths), grid_width) * WORTH_PACKING
    longest, total = max(lengths), sum(lengths)
    for rows in range(max(1, total // (2 * longest)), len(lengths)):
        if cost(rows, max(longest, math.ceil(total / rows))) >= best_cost:
            if rows * longest >= total:
                break  # more rows only cost more from here
            continue
        assignment, width = _longest_first(lengths, rows)
        if cost(rows, width) < best_cost:
            best, best_cost = (rows, width, assignment), cost(rows, width)
    if best is None:
        return None
    rows, width, (bins, starts) = best
    packed = torch.full((rows, width), pad_id, dtype=torch.long)
    positions = torch.full((rows, width), prefix, dtype=torch.long)
    for index, (row, start, length) in enumerate(zip(bins, starts, lengths, strict=True)):
        packed[row, start : start + length] = input_ids[index, grid_width - length :].cpu()
        positions[row, start : start + length] = prefix + torch.arange(length)
    device = input_ids.device
    return Packing(
        packed.to(device), positions.to(device), prefix, bins, starts, lengths, grid_width
    )


def _longest_first(lengths: list[int], rows: int) -> tuple[tuple[list[int], list[int]], int]:
    """Each prompt, longest first, to the row that is shortest so far: (rows, starts), width."""
    heap = [(0, row) for row in range(rows)]
    bins, starts = [0] * len(lengths), [0] * len(lengths)
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        load, row = heapq.heappop(heap)
        bins[index], starts[index] = row, load
        heapq.heappush(heap, (load + lengths[index], row))
    return (bins, starts), max(load for load, _ in heap)


def attention_weight(model: torch.nn.Module, layers) -> float:
    """How many key columns of attention cost as much as one token's matrix work in a layer:
    a layer's weights over (hidden size x 8) (4 flops per key and hidden unit, against 2 per
    weight, and attention with a mask runs at a fraction of the matrix products' speed)."""
    embeddings = model.get_input_embeddings()
    hidden = getattr(embeddings, "embedding_dim", None) or embeddings.weight.shape[-1]
    weights = sum(p.numel() for p in layers[len(layers) // 2].parameters())
    return max(1.0, weights / (8.0 * hidden))


def attention_window(config) -> int | None:
    """The narrowest span of keys any layer attends over (a sliding window, attention in
    chunks), or None: packed, a prompt sees its keys as if the batch were no wider than that."""
    configs = [config]
    text = getattr(config, "get_text_config", None)
    if callable(text):
        configs.append(text())
    spans = [
        value
        for each in configs
        for name in ("sliding_window", "attention_chunk_size", "sliding_window_size")
        if isinstance(value := getattr(each, name, None), int) and value > 0
    ]
    return min(spans) if spans else None


__all__ = ["Packing", "attention_weight", "attention_window", "plan_packing"]
