"""Which parameters train: per-block parameter sets, switching them on and off, and the optimizer state they hold.

The rule every layer-selective method here follows (LISA, IST, static freezing): a block that is not active holds
**no gradient and no optimizer state**. Switching a block off sets ``requires_grad = False``, drops its ``.grad`` and
deletes its entries from ``optimizer.state``; switching it on again starts a fresh optimizer state (Adam moments
from zero, bias correction from step 1). The optimizer keeps every switchable parameter in its parameter groups
(references only, no memory): PyTorch's AdamW skips parameters whose ``.grad`` is None and creates no state for
them, and the checkpoint's optimizer state dict keeps a fixed layout, so resuming works. Parameters outside the
blocks (embeddings, final norm, output head) always train.

``optimizer_state_bytes`` measures what the optimizer really holds (every tensor in ``optimizer.state``).
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn
from transformers import TrainerCallback

from layerscope.errors import LayerscopeError


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer | None:
    """The torch optimizer inside an accelerate/Trainer wrapper (or the optimizer itself)."""
    inner = getattr(optimizer, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else optimizer


def optimizer_state_bytes(optimizer: Any) -> int:
    """Bytes of every tensor the optimizer keeps per parameter (Adam: exp_avg, exp_avg_sq, step)."""
    opt = unwrap_optimizer(optimizer)
    if opt is None:
        return 0
    return int(sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
                   if torch.is_tensor(t)))


def base_of(model: nn.Module) -> nn.Module:
    """The transformers model under a PEFT wrapper (or the model itself)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def block_list(model: nn.Module) -> nn.ModuleList:
    from layerscope.model.adapter import find_parts

    return find_parts(base_of(model)).blocks


class LayerGate:
    """Turns the trainable parameters of whole blocks on and off, and trims the optimizer state with them.

    Only parameters that were trainable when the gate was made are switched (so on a PEFT model only the
    adapters of a block switch); everything outside the blocks is left as it is (trainable).
    """

    def __init__(self, model: nn.Module, trim_state: bool = True):
        self.model = model
        self.blocks = block_list(model)
        self.params: list[list[nn.Parameter]] = [[p for p in b.parameters() if p.requires_grad] for b in self.blocks]
        if not any(self.params):
            raise LayerscopeError("no block of this model has trainable parameters to select from")
        self.trim_state = trim_state
        self.active: list[int] = list(range(len(self.blocks)))

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    def set_active(self, layers: Iterable[int], optimizer: Any = None) -> None:
        layers = sorted({int(i) for i in layers})
        bad = [i for i in layers if not 0 <= i < self.num_layers]
        if bad:
            raise LayerscopeError(f"layer {bad[0]} is out of range (the model has blocks 0..{self.num_layers - 1})")
        opt = unwrap_optimizer(optimizer)
        keep = set(layers)
        for i, ps in enumerate(self.params):
            on = i in keep
            for p in ps:
                p.requires_grad_(on)
                if not on:
                    p.grad = None
                    if self.trim_state and opt is not None:
                        opt.state.pop(p, None)
        self.active = layers

    def block_state_bytes(self, optimizer: Any) -> list[int]:
        """Optimizer-state bytes held for each block's parameters."""
        opt = unwrap_optimizer(optimizer)
        out = []
        for ps in self.params:
            n = 0
            for p in ps:
                st = opt.state.get(p, {}) if opt is not None else {}
                n += sum(t.numel() * t.element_size() for t in st.values() if torch.is_tensor(t))
            out.append(int(n))
        return out


def freeze_blocks(model: nn.Module, train: Iterable[int]) -> list[int]:
    """Static freezing: only the blocks in `train` (and everything outside the blocks) keep requires_grad."""
    gate = LayerGate(model)
    gate.set_active(train)
    return gate.active


def trainable_bytes(model: nn.Module) -> int:
    return int(sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad))


class SwitchingCallback(TrainerCallback):
    """What LISA and IST share: re-draw the active blocks every `interval` steps (subclasses define `switch`,
    which appends {"step": ...} to `history`) and record the peak optimizer-state bytes."""

    interval: int
    history: list
    peak_state_bytes: int

    def switch(self, step: int, optimizer: Any) -> None:
        raise NotImplementedError

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        if state.global_step % self.interval == 0 and (not self.history or self.history[-1]["step"] != state.global_step):
            self.switch(state.global_step, optimizer)

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        self.peak_state_bytes = max(self.peak_state_bytes, optimizer_state_bytes(optimizer))
