"""`layerscope.load`: load a pruned directory so that skipped sublayers are really not computed.

A directory written by ``layerscope prune --unit attention|mlp`` holds the full architecture with
the pruned sublayers' output projections set to zero, so plain transformers computes the pruned
network but still spends the time on it. `load` reads ``layerscope_pruned.json`` and replaces each
skipped attention module by `SkippedAttention` and each skipped MLP by `SkippedMLP`: both return
zeros of the right shape (and the attention keeps the KV cache's length bookkeeping with a 1x1
placeholder so generation positions stay right) without touching their weights.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from layerscope.errors import LayerscopeError

_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


class SkippedAttention(nn.Module):
    """Stands in for an attention module: returns (zeros, None) and computes nothing."""

    def __init__(self, layer_idx: int | None, out_features: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.out_features = out_features

    def forward(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        h = args[0] if args else kwargs.get("hidden_states")
        if h is None:
            raise LayerscopeError("skipped attention received no hidden states")
        self._keep_cache_length(h, kwargs)
        return h.new_zeros(*h.shape[:-1], self.out_features), None

    def _keep_cache_length(self, h: torch.Tensor, kwargs: Mapping[str, Any]) -> None:
        """Give the KV cache a [B, 1, T, 1] placeholder so its sequence length stays right."""
        if self.layer_idx is None:
            return
        for key in _CACHE_KWARGS:
            cache = kwargs.get(key)
            if cache is None:
                continue
            cache = getattr(cache, "self_attention_cache", cache)
            update = getattr(cache, "update", None)
            if callable(update):
                z = h.new_zeros(h.shape[0], 1, h.shape[1], 1)
                update(z, z, self.layer_idx)
            return

    def extra_repr(self) -> str:
        return f"layer_idx={self.layer_idx}, out_features={self.out_features} (skipped)"


class SkippedMLP(nn.Module):
    """Stands in for an MLP (or its down projection): returns zeros [..., out_features]."""

    def __init__(self, out_features: int):
        super().__init__()
        self.out_features = out_features

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"out_features={self.out_features} (skipped)"


class _ZeroWidth(nn.Module):
    """A post-LN encoder's MLP input side: a zero-cost broadcast view of shape [..., width]."""

    def __init__(self, width: int):
        super().__init__()
        self.width = width

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return x.new_zeros(()).expand(*x.shape[:-1], self.width)


def _replace(root: nn.Module, target: nn.Module, new: nn.Module) -> None:
    for name, mod in root.named_modules():
        for child_name, child in mod.named_children():
            if child is target:
                setattr(mod, child_name, new)
                return
    raise LayerscopeError("could not find a sublayer to replace")


def _out_features(proj: nn.Module | None, fallback: int) -> int:
    if proj is None or getattr(proj, "weight", None) is None:
        return fallback
    from layerscope.model.adapter import linear_weight

    return int(linear_weight(proj).shape[0])


def _hidden_size(model: nn.Module) -> int:
    cfg = model.config
    cfg = getattr(cfg, "text_config", None) or cfg
    for k in ("hidden_size", "n_embd", "d_model"):
        v = getattr(cfg, k, None)
        if isinstance(v, int):
            return v
    raise LayerscopeError("cannot tell the model's hidden size")


def skip_sublayers(model: nn.Module, skipped: Mapping[str, Sequence[int]]) -> nn.Module:
    """Replace the listed attention/MLP sublayers of `model` (in place) by modules that return zeros."""
    from layerscope.model.adapter import find_parts

    parts = find_parts(model)
    hidden = _hidden_size(model)
    post_ln = parts.spec is not None and parts.spec.mid is not None and parts.spec.mid[0] == "output"
    for unit, indices in skipped.items():
        for i in indices:
            if not 0 <= int(i) < parts.num_layers:
                raise LayerscopeError(f"skipped {unit} sublayer {i} is out of range (model has {parts.num_layers} blocks)")
            block = parts.blocks[int(i)]
            if unit == "attention":
                attn = parts.attention[i]
                target = getattr(attn, "self", None) if post_ln else attn  # BERT: keep output dense+LayerNorm
                if target is None:
                    raise LayerscopeError(f"{parts.family}: cannot skip the attention of block {i}")
                idx = next((getattr(m, "layer_idx") for m in attn.modules()
                            if isinstance(getattr(m, "layer_idx", None), int)), i)
                _replace(block, target, SkippedAttention(idx, _out_features(parts.attn_out_proj[i], hidden)))
            elif unit == "mlp":
                down = parts.mlp_down_proj[i]
                if post_ln or parts.mlp[i] is None:
                    inter = getattr(block, "intermediate", None)
                    if inter is not None and down is not None:
                        width = int(getattr(down, "in_features", 0) or _out_features(inter.dense, hidden))
                        _replace(block, inter, _ZeroWidth(width))
                    if down is None:
                        raise LayerscopeError(f"{parts.family}: cannot skip the MLP of block {i}")
                    _replace(block, down, SkippedMLP(_out_features(down, hidden)))
                else:
                    _replace(block, parts.mlp[i], SkippedMLP(_out_features(down, hidden)))
            else:
                raise LayerscopeError(f"unknown sublayer kind '{unit}' in {PRUNED_JSON_NAME}")
    model.layerscope_skipped = {k: sorted(int(i) for i in v) for k, v in skipped.items()}
    return model


PRUNED_JSON_NAME = "layerscope_pruned.json"


def read_pruned_json(path: str | os.PathLike) -> dict[str, Any] | None:
    f = Path(path) / PRUNED_JSON_NAME
    if not f.is_file():
        return None
    try:
        obj = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise LayerscopeError(f"{f} is not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise LayerscopeError(f"{f} is not a layerscope pruning record")
    return obj


def load(path: str | os.PathLike, *, dtype: torch.dtype | str | None = None, device: str | None = None,
         trust_remote_code: bool = False, attn_implementation: str = "sdpa") -> nn.Module:
    """Load a (pruned) model directory; sublayers listed in layerscope_pruned.json are not computed.

    Works for any model directory: without a pruning record it is a plain load.
    The tokenizer is the directory's own: ``transformers.AutoTokenizer.from_pretrained(path)``.
    """
    from layerscope.model.factorized import load_factorized, read_lowrank_json
    from layerscope.model.loading import load_model

    lowrank = read_lowrank_json(path) if Path(path).is_dir() else None
    if lowrank is not None:  # a `layerscope lowrank` factorized directory: Linear(in, r) -> Linear(r, out) pairs
        return load_factorized(path, lowrank, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    loaded = load_model(path, trust_remote_code=trust_remote_code, dtype=dtype, device=device,
                        attn_implementation=attn_implementation, tokenizer=False)
    record = read_pruned_json(loaded.path) if loaded.path is not None else None
    skipped = (record or {}).get("skipped_sublayers") or {}
    if skipped:
        skip_sublayers(loaded.model, skipped)
    loaded.model.layerscope_pruned = record
    return loaded.model
