"""A model ready for analysis: the module, its parts, tokenizer and provenance."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from layerscope.errors import LayerscopeError
from layerscope.model.adapter import ModelParts, find_parts


@dataclass
class Subject:
    """A model ready for analysis: the module, its parts, tokenizer and provenance."""

    model: nn.Module
    parts: ModelParts
    tokenizer: Any
    model_id: str
    weights_sha256: str | None
    model_dir: Path | None

    @property
    def num_layers(self) -> int:
        return self.parts.num_layers

    def check_layer(self, layer: int, what: str = "layer") -> int:
        """Validate a residual-stream layer index (0 = embeddings .. L = output of the last block)."""
        L = self.num_layers
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
            raise LayerscopeError(f"{what} must be an integer, got {layer!r}")
        if not 0 <= int(layer) <= L:
            raise LayerscopeError(
                f"{what} {layer} is out of range: {self.model_id} has layers 0..{L} "
                f"(0 = embeddings, {L} = output of the last block)"
            )
        return int(layer)

    def require_lm_head(self, what: str) -> None:
        if not self.parts.has_lm_head:
            kind = "an encoder" if not self.parts.causal else "a model without an output head"
            raise LayerscopeError(
                f"{what} needs a causal language model with an output head; {self.model_id} is {kind} "
                f"({self.parts.family}) - probes and layer similarity work for it, {what} does not"
            )


def load_subject(model: Any = None, tokenizer: Any = None, trust_remote_code: bool = False,
                 need_tokenizer: bool = True, device: str | None = None, dtype: Any = None) -> Subject:
    """Resolve a model spec (path, hub id, alias, None) or a loaded module into a Subject."""
    model_id, sha, model_dir = "in-memory", None, None
    if model is None or isinstance(model, str) or hasattr(model, "__fspath__"):
        from layerscope.model.loading import load_model

        loaded = load_model(model, trust_remote_code=trust_remote_code, device=device, dtype=dtype)
        model, model_id, sha, model_dir = loaded.model, loaded.model_id, loaded.weights_sha256, loaded.path
        tokenizer = tokenizer or loaded.tokenizer
    elif isinstance(model, nn.Module):
        model_id = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
    else:
        raise LayerscopeError(f"model must be a path, hub id, alias or a torch module, got {type(model).__name__}")
    if need_tokenizer and tokenizer is None:
        raise LayerscopeError(f"{model_id} has no tokenizer: pass one (tokenizer=...) to analyse text")
    model.eval()
    return Subject(model=model, parts=find_parts(model), tokenizer=tokenizer, model_id=str(model_id),
                   weights_sha256=sha, model_dir=model_dir)


def max_context(model: nn.Module) -> int | None:
    from layerscope.metrics.scan import max_positions

    return max_positions(model)


def layer_names(num_layers: int) -> list[str]:
    return ["embeddings"] + [f"block {i}" for i in range(num_layers)]
