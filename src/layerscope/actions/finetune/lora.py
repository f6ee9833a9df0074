"""Layer-selected LoRA through PEFT: adapters only on chosen blocks, ranks shaped by layer scores.

Hu et al. 2021 (LoRA); PEFT's ``LoraConfig(layers_to_transform=..., layers_pattern=..., rank_pattern=...,
alpha_pattern=...)``. Every linear layer inside the chosen blocks gets an adapter (PEFT matches
`layers_to_transform` against each target module, so the targets are the blocks' own linear names); with
per-layer `weights` the rank of block i is round(rank * w_i / mean(w)) (at least 1) and alpha keeps alpha/r fixed.
The fine-tuned model is saved merged (`merge_and_unload`) so plain `from_pretrained` loads it, plus the adapter.
"""
from __future__ import annotations

from typing import Sequence

from torch import nn

from layerscope.errors import LayerscopeError


def _peft():
    try:
        import peft
    except ImportError:
        raise LayerscopeError("LoRA plans need PEFT: pip install 'layerscope[peft]'") from None
    return peft


def lora_targets(model: nn.Module) -> tuple[list[str], str]:
    """(leaf names of the blocks' linear layers, the name of the block list) for PEFT."""
    from layerscope.model.adapter import find_parts

    parts = find_parts(model)
    names = sorted({n.rpartition(".")[2] for n in parts.block_linears(0)})
    if not names:
        raise LayerscopeError(f"no linear layers found in the blocks of {type(model).__name__}; LoRA has nothing to adapt")
    return names, parts.blocks_path.rpartition(".")[2]


def lora_config(model: nn.Module, layers: Sequence[int] | None = None, rank: int = 8, alpha: float = 16.0,
                weights: Sequence[float] | None = None, dropout: float = 0.0):
    """A PEFT LoraConfig for `layers` (None: every block), ranks scaled by `weights` when given."""
    LoraConfig = _peft().LoraConfig
    targets, pattern = lora_targets(model)
    rank_pattern, alpha_pattern = {}, {}
    if weights is not None:
        chosen = list(layers) if layers is not None else list(range(len(weights)))
        w = [float(weights[i]) for i in chosen]
        mean = sum(w) / len(w)
        if mean <= 0:
            raise LayerscopeError("LoRA rank weights must have a positive mean")
        for i, wi in zip(chosen, w):
            r = max(1, round(rank * wi / mean))
            rank_pattern[rf"{pattern}\.{i}\..*"] = r
            alpha_pattern[rf"{pattern}\.{i}\..*"] = alpha * r / rank
    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                      layers_to_transform=sorted(int(i) for i in layers) if layers is not None else None,
                      layers_pattern=pattern if layers is not None else None, rank_pattern=rank_pattern,
                      alpha_pattern=alpha_pattern, bias="none", task_type="CAUSAL_LM")


def wrap_lora(model: nn.Module, config) -> nn.Module:
    return _peft().get_peft_model(model, config)


def adapted_layers(peft_model: nn.Module) -> list[int]:
    """Block indices that carry a LoRA adapter (read back from the module names)."""
    _, pattern = lora_targets(peft_model.get_base_model())
    out = set()
    for name, _ in peft_model.named_modules():
        if name.endswith("lora_A"):
            bits = name.split(".")
            for j, b in enumerate(bits[:-1]):
                if b == pattern and bits[j + 1].isdigit():
                    out.add(int(bits[j + 1]))
    return sorted(out)
