"""Teaching a pretrained model to refuse through one switch, written along one direction.

The real refuser's tuning (scripts/real_refuser_build.py). A full fine-tune of every layer made
SmolLM2 refuse, but it wrote the refusal everywhere and in many directions: no single-direction
edit removed it below a KL of 0.7, and every harmless reply changed. A real instruct model reads
the request, turns a refusal direction on in its middle layers, and its later layers act on
it. This tuning builds that shape and nothing else:

- a few middle layers' MLP down-projections each gain a rank-one update `scale * u * a_i^T`:
  `a_i` reads that layer's MLP activations (a linear gate: is this request harmful?) and `u` is
  one unit direction shared by those layers;
- trained on: the refusal sentence after harmful prompts (its first token weighted, that is the
  decision), the base model's own next-token distributions after harmless prompts (KL
  distillation; the base model is the same model with the switch off), and the gate itself:
  1 at a harmful prompt's last token, 0 at every token of a harmless example;
- the direction is also kept one that the base model itself barely uses: with `u` projected out
  of every layer's attention and MLP outputs, the base model's harmless next-token
  distributions must stay as they were (a KL term, `ablation_weight`). A real instruct model's
  refusal direction is such a dedicated one (Arditi et al. 2024 remove it at little cost); a
  switch written along a direction the model also uses for ordinary text would make the fixture
  a model no single-direction edit can serve;
- everything else is frozen, and the update is merged into the down-projections at the end:
  the saved model is a plain Llama, and the direction `u` is saved nowhere.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as functional
from fixture_training import optimizer_step

# (prompt ids, reply ids, harmful?)
Example = tuple[list[int], list[int], bool]


@dataclass(frozen=True)
class SwitchRecipe:
    """What the switch tuning does. Part of the cache key (through the build's Recipe)."""

    first_layer: int
    last_layer: int
    scale: float  # the write along u when the gate reads 1
    steps: int
    batch_size: int
    learning_rate: float
    harmless_weight: float  # the KL distillation term against the refusal term
    decision_weight: float  # the first reply token's weight in both terms
    gate_weight: float
    ablation_weight: float  # the base model's harmless KL with u projected out of every layer
    seed: int


class RefusalSwitch:
    """The gates and the shared direction, hooked onto the chosen down-projections."""

    def __init__(self, model, recipe: SwitchRecipe) -> None:
        self.recipe = recipe
        self.layers = [
            model.model.layers[index].mlp.down_proj
            for index in range(recipe.first_layer, recipe.last_layer + 1)
        ]
        width, hidden = self.layers[0].in_features, self.layers[0].out_features
        generator = torch.Generator().manual_seed(recipe.seed)
        # Small, so the optimiser's steps turn it within a few dozen steps.
        self.direction = (0.02 * torch.randn(hidden, generator=generator)).requires_grad_(True)
        self.gates = [torch.zeros(width, requires_grad=True) for _ in self.layers]
        self.enabled = True
        self.ablating = False
        self.readings: list[torch.Tensor] = []
        self.handles = [
            layer.register_forward_hook(self._hook(gate))
            for layer, gate in zip(self.layers, self.gates, strict=True)
        ]
        writers = [
            module
            for block in model.model.layers
            for module in (block.self_attn.o_proj, block.mlp.down_proj)
        ]
        self.handles += [writer.register_forward_hook(self._ablate) for writer in writers]

    @property
    def parameters(self) -> list[torch.Tensor]:
        return [self.direction, *self.gates]

    def unit(self) -> torch.Tensor:
        return self.direction / self.direction.norm()

    def _hook(self, gate: torch.Tensor):
        def hook(module, args, output):
            if not self.enabled:
                return output
            reading = args[0] @ gate
            self.readings.append(reading)
            return output + self.recipe.scale * reading[..., None] * self.unit()

        return hook

    def _ablate(self, module, args, output):
        """While `ablating`: the output without its component along u."""
        if not self.ablating:
            return output
        unit = self.unit()
        return output - (output @ unit)[..., None] * unit

    def merge(self) -> None:
        """Write the update into the down-projections and remove the hooks."""
        for handle in self.handles:
            handle.remove()
        with torch.no_grad():
            write = self.recipe.scale * self.unit()
            for layer, gate in zip(self.layers, self.gates, strict=True):
                layer.weight += torch.outer(write, gate)


def train_switch(model, examples: Sequence[Example], pad_id: int, recipe: SwitchRecipe) -> float:
    """Tune `model` in place (only the switch learns; it is merged at the end). Returns the
    last step's loss."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    switch = RefusalSwitch(model, recipe)
    optimizer = torch.optim.AdamW(switch.parameters, lr=recipe.learning_rate, weight_decay=0.0)
    warmup = max(1, recipe.steps // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup)
    )
    generator = torch.Generator().manual_seed(recipe.seed)
    model.train()
    loss_value = float("nan")
    for step in range(recipe.steps):
        chosen = torch.randint(len(examples), (recipe.batch_size,), generator=generator).tolist()
        batch = Batch([examples[index] for index in chosen], pad_id, recipe.decision_weight)
        loss = switch_loss(model, switch, batch, recipe)
        loss_value = optimizer_step(loss, switch.parameters, optimizer, scheduler)
        if step % 10 == 0 or step == recipe.steps - 1:
            print(f"step {step:4d}  loss {loss_value:.4f}", file=sys.stderr, flush=True)
    model.eval()
    switch.merge()
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    return loss_value


class Batch:
    """Right-padded token ids with, per predicted position: the target, its weight, the kind."""

    def __init__(self, rows: Sequence[Example], pad_id: int, decision_weight: float) -> None:
        width = max(len(prompt) + len(reply) for prompt, reply, _ in rows)
        self.input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        self.mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        weights = torch.ones((len(rows), width))
        harmful = torch.zeros((len(rows), width), dtype=torch.bool)
        self.decisions = torch.zeros((len(rows), width), dtype=torch.bool)
        for row, (prompt, reply, is_harmful) in enumerate(rows):
            tokens = prompt + reply
            self.input_ids[row, : len(tokens)] = torch.tensor(tokens)
            self.mask[row, : len(tokens)] = 1
            labels[row, len(prompt) : len(tokens)] = torch.tensor(reply)
            weights[row, len(prompt)] = decision_weight
            harmful[row] = is_harmful
            self.decisions[row, len(prompt) - 1] = is_harmful
        self.taken = labels[:, 1:] != -100  # where a next token is predicted
        self.targets = labels[:, 1:][self.taken]
        self.weights = weights[:, 1:][self.taken]
        self.harmful = harmful[:, 1:][self.taken]
        # Every token of a harmless example: its gate must read 0.
        self.harmless_tokens = (self.mask == 1) & ~harmful
        self.harmless_rows = [row for row, (_, _, bad) in enumerate(rows) if not bad]


def switch_loss(model, switch: RefusalSwitch, batch: Batch, recipe: SwitchRecipe) -> torch.Tensor:
    switch.readings = []
    hidden = model.model(input_ids=batch.input_ids, attention_mask=batch.mask).last_hidden_state
    log_probs = functional.log_softmax(model.lm_head(hidden[:, :-1][batch.taken]).float(), -1)
    gate = sum(switch.readings)
    losses = []
    if batch.harmful.any():
        chosen = log_probs[batch.harmful].gather(1, batch.targets[batch.harmful][:, None])
        weights = batch.weights[batch.harmful]
        losses.append(-(chosen[:, 0] * weights).sum() / weights.sum())
        losses.append(recipe.gate_weight * ((gate[batch.decisions] - 1) ** 2).mean())
    if batch.harmless_rows:
        teacher = base_log_probs(model, switch, batch)
        ours = log_probs[~batch.harmful]
        weights = batch.weights[~batch.harmful]
        divergence = (teacher.exp() * (teacher - ours)).sum(-1)
        losses.append(recipe.harmless_weight * (divergence * weights).sum() / weights.sum())
        losses.append(recipe.gate_weight * (gate[batch.harmless_tokens] ** 2).mean())
        if recipe.ablation_weight:
            ablated = ablated_log_probs(model, switch, batch)
            divergence = (teacher.exp() * (teacher - ablated)).sum(-1)
            losses.append(recipe.ablation_weight * (divergence * weights).sum() / weights.sum())
    return sum(losses)


def ablated_log_probs(model, switch: RefusalSwitch, batch: Batch) -> torch.Tensor:
    """The base model's log-probabilities at the harmless rows' reply positions with u
    projected out of every layer's outputs (differentiable in u)."""
    rows = batch.harmless_rows
    switch.enabled, switch.ablating = False, True
    try:
        hidden = model.model(
            input_ids=batch.input_ids[rows], attention_mask=batch.mask[rows]
        ).last_hidden_state
        taken = batch.taken[rows]
        return functional.log_softmax(model.lm_head(hidden[:, :-1][taken]).float(), -1)
    finally:
        switch.enabled, switch.ablating = True, False


def base_log_probs(model, switch: RefusalSwitch, batch: Batch) -> torch.Tensor:
    """The base model's next-token log-probabilities at the harmless rows' reply positions."""
    rows = batch.harmless_rows
    switch.enabled = False
    try:
        with torch.no_grad():
            hidden = model.model(
                input_ids=batch.input_ids[rows], attention_mask=batch.mask[rows]
            ).last_hidden_state
            taken = batch.taken[rows]
            return functional.log_softmax(model.lm_head(hidden[:, :-1][taken]).float(), -1)
    finally:
        switch.enabled = True
