"""IST: importance-aware sparse tuning -- layer importance learned during training from the loss effect of
suppressing layers, then used to choose the layers that are updated.

Yao et al. 2024, "Layer-wise Importance Matters: Less Memory for Better Performance in Parameter-efficient
Fine-tuning of Large Language Models" (IST; reference code antgroup/importance-aware-sparse-tuning-IST-paper).
Every `interval` steps: `trials` times, a set of half the blocks is drawn with probability sigmoid(score)
(less important blocks more likely), their response is suppressed (scaled by `suppression`, 0.25), and the loss
on a held-back training batch is measured; the reward exp(-loss), centred over the trials, raises the score of
the suppressed blocks (a high reward means they were not needed) by reward * p * (1 - p) * `score_lr`. The blocks
to update are then drawn with probability sigmoid(-score) (more important blocks more likely).

Suppression: on a PEFT model the LoRA scaling of the block's adapters is scaled (the paper's scheme); on a plain
model (full-parameter IST) the block's residual update is scaled, output = input + s * (block(input) - input).
The paper re-draws the updated blocks every step; here they are re-drawn every `interval` steps so that Adam
states mean something, and trimmed with the same rule as LISA (`layers.LayerGate`: no gradient or optimizer state
for inactive blocks). Draws depend only on (seed, step) and the scores, which are saved with checkpoints.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Callable

import torch

from layerscope.actions.finetune.layers import LayerGate, SwitchingCallback, base_of
from layerscope.errors import LayerscopeError


def _lora_layers(block: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in block.modules() if isinstance(getattr(m, "scaling", None), dict)]


@contextmanager
def suppressed(blocks: torch.nn.ModuleList, which: list[int], factor: float, mode: str):
    """Scale the response of the blocks in `which` by `factor` inside the context."""
    undo: list[Callable[[], None]] = []
    try:
        for i in which:
            if mode == "adapter":
                for m in _lora_layers(blocks[i]):
                    old = dict(m.scaling)
                    m.scaling.update({k: v * factor for k, v in old.items()})
                    undo.append(lambda m=m, old=old: m.scaling.update(old))
            else:
                def hook(mod, args, kwargs, out):
                    x = args[0] if args else kwargs["hidden_states"]
                    y = out[0] if isinstance(out, tuple) else out
                    y = x + factor * (y - x)
                    return (y, *out[1:]) if isinstance(out, tuple) else y
                undo.append(blocks[i].register_forward_hook(hook, with_kwargs=True).remove)
        yield
    finally:
        for u in reversed(undo):
            u()


class IstCallback(SwitchingCallback):
    """A `transformers.TrainerCallback`: IST's learned layer importance chooses the blocks that train."""

    def __init__(self, dataset: Any, collator: Callable, n_layers: int | None = None, interval: int = 5,
                 trials: int = 3, suppress_share: float = 0.5, suppression: float = 0.25, score_lr: float = 10.0,
                 batch_size: int = 8, seed: int = 0, suppress: str = "auto", trim_state: bool = True):
        if suppress not in ("auto", "block", "adapter"):
            raise LayerscopeError(f"unknown IST suppression '{suppress}' (auto, block or adapter)")
        if interval < 1 or trials < 2:
            raise LayerscopeError("IST needs interval >= 1 and at least 2 trials (rewards are centred over trials)")
        self.dataset, self.collator = dataset, collator
        self.n_layers, self.interval, self.trials = n_layers, int(interval), int(trials)
        self.suppress_share, self.suppression, self.score_lr = suppress_share, suppression, score_lr
        self.batch_size, self.seed, self.suppress, self.trim_state = batch_size, int(seed), suppress, trim_state
        self.gate: LayerGate | None = None
        self.model = None
        self.scores: torch.Tensor | None = None
        self.history: list[dict] = []
        self.estimates: list[dict] = []
        self.peak_state_bytes = 0

    # ------------------------------------------------------------------ state (saved with checkpoints)
    def state_dict(self) -> dict:
        return {"scores": self.scores.tolist() if self.scores is not None else None, "estimates": self.estimates}

    def load_state_dict(self, d: dict) -> None:
        if d.get("scores") is not None:
            self.scores = torch.tensor(d["scores"], dtype=torch.float64)
        self.estimates = list(d.get("estimates", []))

    def setup(self, model) -> None:
        self.model = model
        self.gate = LayerGate(model, trim_state=self.trim_state)
        L = self.gate.num_layers
        self.n_layers = self.n_layers or max(1, int(L * 0.25))
        if not 1 <= self.n_layers <= L:
            raise LayerscopeError(f"IST asks for {self.n_layers} active blocks but the model has {L}")
        if self.scores is None:
            self.scores = torch.zeros(L, dtype=torch.float64)
        if self.suppress == "auto":
            self.suppress = "adapter" if base_of(model) is not model and _lora_layers(self.gate.blocks[0]) else "block"

    def _gen(self, *key: int) -> torch.Generator:
        return torch.Generator().manual_seed(hash((self.seed, *key)) % (2**62))

    @torch.no_grad()
    def estimate(self, step: int) -> None:
        L = self.gate.num_layers
        g = self._gen(step, 1)
        idx = torch.randperm(len(self.dataset), generator=g)[: self.batch_size].tolist()
        batch = self.collator([self.dataset[i] for i in idx])
        device = next(self.model.parameters()).device
        batch = {k: v.to(device) for k, v in batch.items()}
        k_sup = max(1, int(L * self.suppress_share))
        prob = torch.sigmoid(self.scores)
        selects: list[list[int]] = []
        losses = []
        was = self.model.training
        self.model.eval()
        try:
            for t in range(self.trials):
                for _ in range(20):  # distinct sets, as the paper
                    sel = sorted(torch.multinomial(prob, k_sup, generator=g).tolist())
                    if sel not in selects:
                        break
                selects.append(sel)
                with suppressed(self.gate.blocks, sel, self.suppression, self.suppress):
                    losses.append(float(self.model(**batch).loss))
        finally:
            self.model.train(was)
        rewards = [math.exp(-x) for x in losses]
        mean = sum(rewards) / len(rewards)
        for sel, r in zip(selects, rewards):
            for i in sel:
                self.scores[i] += (r - mean) * prob[i] * (1 - prob[i]) * self.score_lr
        self.estimates.append({"step": int(step), "losses": [round(x, 5) for x in losses]})

    def draw(self, step: int) -> list[int]:
        prob = torch.sigmoid(-self.scores)
        return sorted(torch.multinomial(prob, self.n_layers, generator=self._gen(step, 2)).tolist())

    def switch(self, step: int, optimizer: Any) -> None:
        if step > 0:
            self.estimate(step)
        layers = self.draw(step)
        self.gate.set_active(layers, optimizer)
        self.history.append({"step": int(step), "layers": layers})

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.gate is None:
            self.setup(model)
        if state.global_step % self.interval == 0 and self.estimates and self.estimates[-1]["step"] == state.global_step:
            self.gate.set_active(self.draw(state.global_step), optimizer)  # resumed right after an estimate
            return
        step0 = state.global_step - state.global_step % self.interval
        if state.global_step % self.interval:  # resumed inside an interval: the draw made at its start
            self.gate.set_active(self.draw(step0), optimizer)
            return
        self.switch(state.global_step, optimizer)

    def describe(self) -> dict:
        return {"method": "ist", "n_layers": self.n_layers, "interval": self.interval, "trials": self.trials,
                "suppression": self.suppression, "suppress": self.suppress, "score_lr": self.score_lr,
                "scores": [round(float(s), 5) for s in self.scores] if self.scores is not None else None,
                "history": self.history, "estimates": self.estimates}
