"""The output head's greedy choice at a fraction of the head's cost (float32 models on a CPU).

A decode step needs each row's greedy token, not its logits, and a small model's output head is
a large part of the step: on SmolLM2-135M (49,152 tokens) a fifth of a step's matrix products.
`ArgmaxHead` computes every logit in bfloat16, which a CPU with bfloat16 dot-product
instructions does about twice as fast as float32 through oneDNN (`cpu_linear.py`) and four times
as fast as through MKL, bounds each one's error, and computes in float32 only the few tokens whose
bound reaches the leader's. (SmolLM2's head at 64 rows: 13.2 ms screened, 20.0 through oneDNN,
46.0 through MKL.) What the model gets back: the plain
head's float32 logit at those tokens and the lowest float elsewhere, so the greedy choice (and
any order-keeping transform a model applies after its head, such as logit soft-capping) is the
plain head's.

The bound. Rounding the hidden state h and the weight row w_j to bfloat16 (unit roundoff
u = 2^-8), summing in float32 and rounding the sum to bfloat16 moves the logit by at most
(3u + 4u^2 + 2 K 2^-24) * |h| * |w_j|, K being the width; float32's own sum is within the last
term of the exact one. So if k leads in bfloat16, the plain head's greedy token j satisfies
approx_j >= approx_k - c |h| (|w_k| + |w_j|); every token that does is computed in float32.
Candidates are found a block of `BLOCK` tokens at a time (a block's largest approximate logit
against its largest row norm), then token by token within the blocks that pass.

Whether a job uses it is measured once on the unmodified model (`ArgmaxHead.measured`): the
screen must pick the plain head's tokens on real hidden states and take clearly less time. A
step whose hidden states leave too many candidates (a flat distribution) runs the plain head.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch

from hctl_worker.cpu_linear import best_time, linear_of

# Tokens per block of the screen's first cut.
BLOCK = 64
# The screen is kept only if it takes at most this fraction of the plain head's time.
KEEP_BELOW = 0.75
# A step whose candidate blocks hold more than this fraction of the logits runs the plain head.
MOST_SCREENED = 0.25
_FLOOR = torch.finfo(torch.float32).min
_UNIT = 2.0**-8  # bfloat16's unit roundoff


class ArgmaxHead:
    """A float32 linear output head's greedy choice, screened in bfloat16 (module docstring)."""

    def __init__(self, head: torch.nn.Linear) -> None:
        weight = head.weight.detach()
        vocabulary, width = weight.shape
        self.head = head
        self._linear = linear_of(head)  # the head's own product (`cpu_linear.py`)
        self.vocabulary = vocabulary
        blocks = -(-vocabulary // BLOCK)
        padded = torch.zeros(blocks * BLOCK, width, dtype=torch.bfloat16)
        padded[:vocabulary] = weight.to(torch.bfloat16)
        self._weight = padded
        norms = torch.zeros(blocks * BLOCK)
        norms[:vocabulary] = weight.norm(dim=1)
        self._norms = norms
        self._block_norms = norms.view(blocks, BLOCK).amax(dim=1)
        self._error = 3 * _UNIT + 4 * _UNIT**2 + 2 * width * 2.0**-24
        # Reused between steps: a fresh buffer of this size costs page faults every step.
        self._approximate = torch.empty(0, blocks * BLOCK, dtype=torch.bfloat16)
        self._logits = torch.empty(0, vocabulary)
        self.screened_rows = 0
        self.plain_rows = 0
        # The weight the copy was made of, as it was: an edit in place makes the copy stale.
        self._made_of = (weight.data_ptr(), weight._version)

    @classmethod
    def build(cls, model: torch.nn.Module) -> ArgmaxHead | None:
        """The screen for `model`'s output head, or None where it does not apply: a head that
        is not a plain float32 linear layer on the CPU (a GPU runs bfloat16 models already)."""
        head = model.get_output_embeddings()
        if not isinstance(head, torch.nn.Linear) or head.bias is not None:
            return None
        weight = head.weight
        if weight.dtype != torch.float32 or weight.device.type != "cpu" or weight.dim() != 2:
            return None
        if weight.shape[0] < 2 * BLOCK:
            return None
        return cls(head)

    @classmethod
    def probed(cls, model: torch.nn.Module, run: Callable[[], Any]) -> ArgmaxHead | None:
        """The screen `measured` on the head's inputs in the passes `run` runs (None where
        the head cannot be screened: nothing is run then)."""
        if cls.build(model) is None:
            return None
        collected: list[torch.Tensor] = []

        def keep(module, args, output):
            if args and torch.is_tensor(args[0]):
                collected.append(args[0].detach().reshape(-1, args[0].shape[-1]).clone())

        handle = model.get_output_embeddings().register_forward_hook(keep)
        try:
            with torch.inference_mode():
                run()
        finally:
            handle.remove()
        return cls.measured(model, torch.cat(collected)) if collected else None

    @classmethod
    def measured(cls, model: torch.nn.Module, hidden: torch.Tensor) -> ArgmaxHead | None:
        """The screen, if on `hidden` (the head's inputs from a real pass, [rows, width]) it
        picks the plain head's tokens and takes at most KEEP_BELOW of its time; else None."""
        screen = cls.build(model)
        if screen is None or hidden.dim() != 2 or hidden.shape[0] == 0:
            return None
        with torch.inference_mode():
            hidden = hidden.to(torch.float32)
            plain = screen.plain(hidden)
            chosen = screen.choose(hidden)
            if screen.plain_rows or not torch.equal(plain.argmax(-1), chosen.argmax(-1)):
                return None
            plain_seconds = best_time(lambda: screen.plain(hidden))
            screen_seconds = best_time(lambda: screen.choose(hidden))
        if screen_seconds > KEEP_BELOW * plain_seconds:
            return None
        screen.screened_rows = screen.plain_rows = 0
        return screen

    def choose(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits whose greedy choice is the plain head's, for `hidden` [..., width]."""
        shape = hidden.shape
        rows = hidden.reshape(-1, shape[-1])
        count = rows.shape[0]
        weight = self.head.weight
        if (weight.data_ptr(), weight._version) != self._made_of:  # edited since: no screen
            self.plain_rows += count
            return self.plain(hidden)
        approximate = self._buffer("_approximate", count)
        torch.mm(rows.to(torch.bfloat16), self._weight.t(), out=approximate)
        approximate[:, self.vocabulary :].fill_(-torch.inf)  # the padding rows never lead
        blocked = approximate.view(count, -1, BLOCK)
        block_tops = blocked.amax(dim=-1).float()  # [rows, blocks]
        leader, leading_block = block_tops.max(dim=1, keepdim=True)
        reach = self._error * rows.norm(dim=1, keepdim=True)  # per unit of row norm
        slack = leader.abs() * 2.0**-20  # the threshold's own float32 rounding
        floor = leader - reach * self._block_norms[leading_block] - slack
        row_of, block_of = (block_tops >= floor - reach * self._block_norms).nonzero(as_tuple=True)
        if len(row_of) * BLOCK > MOST_SCREENED * self.vocabulary * count:
            self.plain_rows += count
            return self.plain(hidden)
        values = blocked[row_of, block_of].float()  # [pairs, BLOCK]
        tokens = block_of[:, None] * BLOCK + torch.arange(BLOCK)
        passes = values >= floor[row_of] - reach[row_of] * self._norms[tokens]
        pair, offset = passes.nonzero(as_tuple=True)
        row_index, token_index = row_of[pair], tokens[pair, offset]
        candidates, position = torch.unique(token_index, return_inverse=True)
        exact = self._linear(rows, self.head.weight[candidates], None)
        logits = self._buffer("_logits", count)
        logits.fill_(_FLOOR)
        logits[row_index, token_index] = exact[row_index, position]
        self.screened_rows += count
        return logits.view(*shape[:-1], self.vocabulary)

    def plain(self, hidden: torch.Tensor) -> torch.Tensor:
        """The head's own logits (its forward may be the screen's while `choosing`)."""
        return self._linear(hidden, self.head.weight, None)

    def _buffer(self, name: str, rows: int) -> torch.Tensor:
        buffer = getattr(self, name)
        if buffer.shape[0] < rows:
            buffer = torch.empty(rows, buffer.shape[1], dtype=buffer.dtype)
            setattr(self, name, buffer)
        return buffer[:rows]

    @contextmanager
    def choosing(self) -> Iterator[None]:
        """The head returns the screen's logits for the passes run inside. A head with forward
        hooks of its own (one that edits its output) runs plain: the screen's floor would
        reach them."""
        head = self.head
        if head._forward_hooks:
            yield
            return
        own = head.__dict__.get("forward")  # a forward put in by `cpu_linear`, if any
        head.forward = self.choose
        try:
            yield
        finally:
            if own is None:
                del head.forward
            else:
                head.forward = own


def choosing(screen: ArgmaxHead | None) -> AbstractContextManager[None]:
    """`screen.choosing()`, or nothing to do without a screen."""
    return screen.choosing() if screen is not None else nullcontext()


__all__ = ["ArgmaxHead", "choosing"]
