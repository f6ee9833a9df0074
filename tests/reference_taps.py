"""Independent reference for tests: read the residual stream with forward hooks during a plain transformers forward
(layerscope itself reads it through the block-sequential engine, `BlockRunner.stream`)."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import torch

from layerscope.errors import LayerscopeError
from layerscope.model.adapter import ModelParts


def _block_hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    if args:
        return args[0]
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    raise LayerscopeError("could not find the hidden states among a block's inputs")


def _block_output(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


@contextmanager
def tap_layers(parts: ModelParts, fn: Callable[[int, torch.Tensor], None],
               layers: Sequence[int] | None = None) -> Iterator[None]:
    """Call ``fn(layer, hidden)`` for each residual-stream layer during forward passes.

    Layer 0 is the input of block 0 (embeddings), layer ``l`` the output of block ``l - 1``.
    """
    L = parts.num_layers
    wanted = set(range(L + 1)) if layers is None else {int(x) for x in layers}
    handles = []
    try:
        if 0 in wanted:
            def pre(module, args, kwargs):
                fn(0, _block_hidden(args, kwargs))

            handles.append(parts.blocks[0].register_forward_pre_hook(pre, with_kwargs=True))
        for i in range(L):
            if i + 1 in wanted:
                def post(module, args, output, _l=i + 1):
                    fn(_l, _block_output(output))

                handles.append(parts.blocks[i].register_forward_hook(post))
        yield
    finally:
        for h in handles:
            h.remove()


def run_base(parts: ModelParts, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> None:
    """One forward pass of the body (embeddings + blocks, no output head)."""
    base = parts.base_model()
    dev = next(parts.model.parameters()).device
    kwargs: dict[str, Any] = {"input_ids": input_ids.to(dev)}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask.to(dev)
    try:
        base(**kwargs, use_cache=False)
    except TypeError as exc:
        if "use_cache" not in str(exc):
            raise
        base(**kwargs)
