"""In-memory removal: the one primitive every verb uses to take blocks or sublayers out.

* Blocks: `blocks_removed` (temporary) and `apply_block_removal` (permanent) drop blocks from the
  ModuleList, renumber every `layer_idx` (the KV cache indexes layers by it) and subset the
  config's per-layer settings (`layer_types`, sliding-window lists, ...), so the model computes
  exactly what loading a pruned directory computes.
* Sublayers: `sublayers_zeroed` (a forward hook, temporary) or `zero_sublayers` (output
  projections zeroed in the weights, what a written directory holds).

Ablation, prune, sweep and the naive bench reference all call these.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from layerscope.errors import LayerscopeError
from layerscope.model.adapter import ModelParts, find_parts

UNITS = ("block", "attention", "mlp")


def check_unit(unit: str) -> str:
    if unit not in UNITS:
        raise LayerscopeError(f"unknown unit '{unit}' (use one of: {', '.join(UNITS)})")
    return unit


def check_removal(indices: Sequence[int], n_units: int, unit: str) -> list[int]:
    """Validate indices of units to remove; return them sorted."""
    idx = list(indices)
    noun = "blocks" if unit == "block" else f"{unit} sublayers"
    bad = [i for i in idx if not 0 <= i < n_units]
    if bad:
        raise LayerscopeError(f"unit index {bad[0]} is out of range: the model has {n_units} {noun} (0..{n_units - 1})")
    if len(set(idx)) != len(idx):
        raise LayerscopeError("the same unit is listed twice")
    if not idx:
        raise LayerscopeError("nothing to remove (use --remove K with K >= 1, or --units)")
    if len(idx) >= n_units:
        what = "all blocks" if unit == "block" else f"all {noun}"
        raise LayerscopeError(f"cannot remove {len(idx)} of {n_units} {noun}: that removes {what} (K must be < {n_units})")
    return sorted(idx)


def check_count(k: int, n_units: int, unit: str) -> None:
    noun = "blocks" if unit == "block" else f"{unit} sublayers"
    if k < 1:
        raise LayerscopeError("--remove must be at least 1")
    if k >= n_units:
        raise LayerscopeError(f"cannot remove {k} of {n_units} {noun}: K must be smaller than the number of units")


# ============================================================================ config surgery

# Per-layer config lists other than those detected by name/length; index lists that are remapped;
# counts of leading layers that are recounted.
_PER_LAYER_KEYS = {"layer_types", "no_rope_layers", "attention_layers", "sliding_window_layers",
                   "swa_layers", "moe_layers", "layers_block_type", "block_types"}


_INDEX_LIST_KEYS = {"mlp_only_layers", "full_attn_idxs", "global_attn_layers"}


_LEADING_COUNT_KEYS = {"max_window_layers", "first_k_dense_replace"}


_NOT_PER_LAYER = {"architectures", "bad_words_ids", "suppress_tokens", "begin_suppress_tokens",
                  "id2label", "label2id", "eos_token_id", "forced_decoder_ids"}


def layer_config(model: nn.Module, n_layers: int | None = None) -> Any:
    """The config object that holds the number of blocks (the text config of multimodal models)."""
    cfg = model.config
    text = getattr(cfg, "text_config", None)
    if text is not None and getattr(text, "num_hidden_layers", None) == n_layers and \
            getattr(cfg, "num_hidden_layers", None) != n_layers:
        return text
    return cfg


def _is_per_layer_list(key: str, value: Any, n: int) -> bool:
    if key in _NOT_PER_LAYER or not isinstance(value, list) or len(value) != n:
        return False
    return key in _PER_LAYER_KEYS or "layer" in key.lower()


def plan_config(cfg_dict: dict[str, Any], keep: Sequence[int], n: int) -> dict[str, Any]:
    """New values of every per-layer setting of a config dict for keeping blocks `keep` of `n`."""
    keep = list(keep)
    kept = set(keep)
    changes: dict[str, Any] = {}
    for key, value in cfg_dict.items():
        if key in ("num_hidden_layers", "n_layer", "num_layers", "n_layers") and value == n:
            changes[key] = len(keep)
        elif _is_per_layer_list(key, value, n):
            changes[key] = [value[i] for i in keep]
        elif key in _INDEX_LIST_KEYS and isinstance(value, list) and all(isinstance(v, int) for v in value):
            changes[key] = [keep.index(v) for v in value if v in kept]
        elif key in _LEADING_COUNT_KEYS and isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= n:
            changes[key] = sum(1 for i in keep if i < value)
    return changes


def _apply_config(cfg: Any, changes: dict[str, Any]) -> dict[str, Any]:
    old = {}
    for key, value in changes.items():
        old[key] = getattr(cfg, key)
        setattr(cfg, key, value)
    return old


def _renumber(block: nn.Module, new_idx: int) -> list[tuple[nn.Module, str, int]]:
    """Set every `layer_idx` inside a block to new_idx; return what to restore."""
    before = []
    for m in block.modules():
        for attr in ("layer_idx", "layer_index"):
            v = getattr(m, attr, None)
            if isinstance(v, int) and not isinstance(v, bool):
                before.append((m, attr, v))
                setattr(m, attr, new_idx)
    return before


def _owner(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    owner_path, _, attr = path.rpartition(".")
    return (model.get_submodule(owner_path) if owner_path else model), attr


def apply_block_removal(model: nn.Module, remove: Sequence[int]) -> dict[str, Any]:
    """Remove blocks in place (permanently): ModuleList, layer_idx and config. Returns config changes."""
    parts = find_parts(model)
    n = parts.num_layers
    remove = check_removal(remove, n, "block")
    keep = [i for i in range(n) if i not in set(remove)]
    cfg = layer_config(model, n)
    changes = plan_config(cfg.to_dict(), keep, n)
    changes.setdefault("num_hidden_layers", len(keep))
    owner, attr = _owner(model, parts.blocks_path)
    new = nn.ModuleList([parts.blocks[i] for i in keep])
    setattr(owner, attr, new)
    for j, b in enumerate(new):
        _renumber(b, j)
    _apply_config(cfg, changes)
    if cfg is not model.config and hasattr(model.config, "num_hidden_layers") \
            and getattr(model.config, "num_hidden_layers") == n:
        model.config.num_hidden_layers = len(keep)
    return changes


@contextmanager
def blocks_removed(model: nn.Module, remove: Sequence[int]) -> Iterator[nn.Module]:
    """Temporarily run `model` without the blocks `remove` (renumbered, config subset); restored after.

    Computes exactly what loading a directory written by `prune --unit block` computes.
    """
    parts = find_parts(model)
    n = parts.num_layers
    owner, attr = _owner(model, parts.blocks_path)
    original = getattr(owner, attr)
    cfg = layer_config(model, n)
    restore_idx: list[tuple[nn.Module, str, int]] = []
    if not remove:
        yield model
        return
    remove = check_removal(remove, n, "block")
    keep = [i for i in range(n) if i not in set(remove)]
    changes = plan_config(cfg.to_dict(), keep, n)
    changes.setdefault("num_hidden_layers", len(keep))
    old_cfg: dict[str, Any] = {}
    try:
        new = nn.ModuleList([original[i] for i in keep])
        setattr(owner, attr, new)
        for j, b in enumerate(new):
            restore_idx.extend(_renumber(b, j))
        old_cfg = _apply_config(cfg, changes)
        yield model
    finally:
        setattr(owner, attr, original)
        for m, a, v in restore_idx:
            setattr(m, a, v)
        _apply_config(cfg, old_cfg)


# ============================================================================ sublayers

def ablation_module(parts, i: int, unit: str) -> nn.Module:
    """The module whose output is zeroed to take `unit` ('attention' or 'mlp') of block i out."""
    post_ln = parts.mid[i] is not None and parts.mid[i][0] == "output"
    if unit == "attention":
        mod = parts.attn_out_proj[i] if post_ln else parts.attention[i]
    elif unit == "mlp":
        mod = parts.mlp_down_proj[i] if (post_ln or parts.mlp[i] is None) else parts.mlp[i]
    else:
        raise LayerscopeError(f"cannot zero a '{unit}' sublayer (use 'attention' or 'mlp')")
    if mod is None:
        raise LayerscopeError(f"block {i} of this {parts.family} model has no {unit} module to ablate")
    return mod


def _zero_output(module, args, output):
    if isinstance(output, tuple):
        return (torch.zeros_like(output[0]),) + tuple(output[1:])
    return torch.zeros_like(output)


@contextmanager
def sublayers_zeroed(model: nn.Module | ModelParts, unit: str, indices: Sequence[int]) -> Iterator[None]:
    """While open, the attention / MLP sublayers `indices` add nothing to the residual stream.

    A forward hook replaces the output of `ablation_module` by zeros (see its docstring for why
    that removes the sublayer's contribution exactly in every family).
    """
    parts = model if isinstance(model, ModelParts) else find_parts(model)
    if unit == "block":
        raise LayerscopeError("blocks are removed with blocks_removed, not zeroed")
    handles = [ablation_module(parts, i, unit).register_forward_hook(_zero_output) for i in indices]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _sublayer_out_proj(parts, unit: str, i: int) -> nn.Module:
    proj = parts.attn_out_proj[i] if unit == "attention" else parts.mlp_down_proj[i]
    if proj is None or getattr(proj, "weight", None) is None:
        raise LayerscopeError(f"{parts.family}: block {i} has no {unit} output projection to zero")
    return proj


def zero_sublayers(model: nn.Module, unit: str, indices: Sequence[int]) -> list[str]:
    """Zero the output projection (weight and bias) of the given attention or MLP sublayers in place.

    Returns the names of the zeroed parameters. The sublayer then adds exactly zero to the
    residual stream (post-sublayer RMS norms map zero to zero).
    """
    parts = find_parts(model)
    names = {id(p): n for n, p in model.named_parameters()}
    zeroed = []
    with torch.no_grad():
        for i in indices:
            proj = _sublayer_out_proj(parts, unit, i)
            for p in (proj.weight, getattr(proj, "bias", None)):
                if isinstance(p, torch.Tensor):
                    p.zero_()
                    zeroed.append(names.get(id(p), "?"))
    return zeroed


@contextmanager
def removed(model: nn.Module, unit: str, indices: Sequence[int]) -> Iterator[nn.Module]:
    """In-memory removal of any unit kind (blocks dropped; sublayers ablated to zero)."""
    if unit == "block":
        with blocks_removed(model, indices) as m:
            yield m
    else:
        with sublayers_zeroed(model, unit, indices):
            yield model


def num_units(model: nn.Module, unit: str) -> int:
    return find_parts(model).num_layers


@contextmanager
def removed_in_memory(model: nn.Module, unit: str, indices: Sequence[int]) -> Iterator[nn.Module]:
    """Like `removed`, but sublayers are zeroed in their weights (what a written directory holds)."""
    if unit == "block" or not indices:
        with removed(model, unit, indices) as m:
            yield m
        return
    parts = find_parts(model)
    saved = []
    for i in indices:
        proj = _sublayer_out_proj(parts, unit, i)
        for p in (proj.weight, getattr(proj, "bias", None)):
            if isinstance(p, torch.Tensor):
                saved.append((p, p.detach().clone()))
    try:
        zero_sublayers(model, unit, indices)
        yield model
    finally:
        with torch.no_grad():
            for p, v in saved:
                p.copy_(v)
