"""Which layer and sublayer each parameter belongs to, and the per-tensor merge coefficient.

Every parameter of the model falls in one group: ``attention`` / ``mlp`` (the block's attention and MLP
modules, as the architecture adapter finds them), ``block`` (the rest of a block: its norms), ``embed``
(the input embedding, and the output head when it is tied to it) or ``head`` (everything after the
blocks and any other non-block parameter: final norm, untied ``lm_head``). Coefficients are stored per
task as ``{"attention": [L], "mlp": [L], "block": [L], "embed": x, "head": y}``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

LAYER_GROUPS = ("attention", "mlp", "block")
SCALAR_GROUPS = ("embed", "head")


@dataclass(frozen=True)
class ParamInfo:
    name: str
    group: str
    layer: int | None  # block index; None for embed / head


def param_infos(model: nn.Module) -> dict[str, ParamInfo]:
    """Group and layer of every (deduplicated, so tied weights appear once) named parameter."""
    from layerscope.model.adapter import find_parts

    parts = find_parts(model)
    owner: dict[int, tuple[str, int]] = {}
    for i, block in enumerate(parts.blocks):
        for p in block.parameters():
            owner[id(p)] = ("block", i)
        for group, mods in (("attention", parts.attention), ("mlp", parts.mlp)):
            if mods[i] is not None:
                for p in mods[i].parameters():
                    owner[id(p)] = (group, i)
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    emb_ids = {id(p) for p in emb.parameters()} if emb is not None else set()
    out: dict[str, ParamInfo] = {}
    for name, p in model.named_parameters():
        if id(p) in owner:
            g, i = owner[id(p)]
            out[name] = ParamInfo(name, g, i)
        else:
            out[name] = ParamInfo(name, "embed" if id(p) in emb_ids else "head", None)
    return out


def coefficient(coefs: dict[str, Any], info: ParamInfo) -> float:
    """The coefficient of one task for the tensor described by `info`."""
    if info.layer is None:
        return float(coefs[info.group])
    return float(coefs[info.group][info.layer])


def constant_coefficients(value: float, num_layers: int) -> dict[str, Any]:
    return {**{g: [float(value)] * num_layers for g in LAYER_GROUPS}, **{g: float(value) for g in SCALAR_GROUPS}}


def per_layer(values: list[float], embed: float | None = None, head: float | None = None) -> dict[str, Any]:
    """One value per layer for every sublayer; embed/head default to the first layer's value."""
    vals = [float(v) for v in values]
    return {**{g: list(vals) for g in LAYER_GROUPS}, "embed": float(vals[0] if embed is None else embed),
            "head": float(vals[0] if head is None else head)}


def check_coefficients(coefs: list[dict[str, Any]], num_tasks: int, num_layers: int) -> None:
    from layerscope.errors import LayerscopeError

    if len(coefs) != num_tasks:
        raise LayerscopeError(f"the plan has coefficients for {len(coefs)} models, but {num_tasks} are merged")
    for t, c in enumerate(coefs):
        for g in LAYER_GROUPS:
            if len(c.get(g) or []) != num_layers:
                raise LayerscopeError(f"coefficients of model {t}: '{g}' needs {num_layers} values (one per block)")
        for g in SCALAR_GROUPS:
            if not isinstance(c.get(g), (int, float)):
                raise LayerscopeError(f"coefficients of model {t}: '{g}' must be a number")


def task_vectors(base: dict[str, torch.Tensor], finetuned: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """τ_t = θ_t − θ_0 for every parameter (fp32)."""
    return [{k: ft[k].float() - base[k].float() for k in base} for ft in finetuned]
