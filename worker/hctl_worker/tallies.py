"""What a generation counts: the work it did (for benchmarks) and the verdicts on its replies
(for stopping a trial that can no longer matter, `pruning.py`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class GenerationStats:
    """Counters for benchmarks: tokens generated, forward passes run, work done."""

    tokens: int = 0
    forward_passes: int = 0
    rows: int = 0
    input_tokens: int = 0  # tokens fed to the model (prompts, drafts, generated)
    layer_tokens: int = 0  # input tokens times the layers that computed them (not replayed)
    drafted: int = 0  # draft tokens fed
    accepted: int = 0  # draft tokens that were the model's own choice
    static_passes: int = 0  # passes run on static buffers (or replayed as a CUDA graph)

    def count_pass(self, fed: int, layer_tokens: float, static: bool = False) -> None:
        """One forward pass: `fed` tokens, through `layer_tokens` token-layers (not replayed)."""
        self.forward_passes += 1
        self.static_passes += int(static)
        self.input_tokens += fed
        self.layer_tokens += round(layer_tokens)


@dataclass
class Verdicts:
    """Replies decided so far; `stop()` once `limit` of them are refusals (None: never)."""

    limit: int | None = None
    refusals: int = 0
    decided: int = 0
    stopped: bool = False

    def decide(self, refused: bool) -> None:
        self.decided += 1
        self.refusals += int(refused)

    def stop(self) -> bool:
        return self.limit is not None and self.refusals >= self.limit


__all__ = ["GenerationStats", "Verdicts"]
