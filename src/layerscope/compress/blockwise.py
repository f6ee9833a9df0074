"""Block-level helpers shared by sparsify and lowrank: calibration windows, a tap that keeps a few
batches of one block's inputs and outputs, and the relative output error of a changed block.

The error of a block changed in place (pruned, factorized) is measured on the tapped batches:
Σ‖B̂(h) − B(h)‖² / Σ‖B(h)‖², with h the block's inputs as the engine passed them and B(h) the
outputs the unchanged block gave.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


def calibration_windows(tokenizer, tokens: int, seq_len: int, source: str = "wikipedia") -> torch.Tensor:
    """Token windows [N, seq_len] from the calibration split (disjoint from perplexity's evaluation split)."""
    from layerscope.data.sources import load_texts
    from layerscope.data.windows import tokenize_windows

    return tokenize_windows(tokenizer, load_texts(source, split="calibration"), n_tokens=tokens, seq_len=seq_len)


class BlockTap:
    """Keeps (args, kwargs, output) of the first `batches` calls of each armed block."""

    def __init__(self, blocks: nn.ModuleList, batches: int):
        self.blocks, self.batches = blocks, batches
        self.armed: set[int] = set(range(len(blocks)))
        self.seen: dict[int, list[tuple[tuple, dict, torch.Tensor]]] = {}

    def _hook(self, i: int):
        def hook(_m, args, kwargs, output):
            if i in self.armed and len(self.seen.setdefault(i, [])) < self.batches:
                out = output[0] if isinstance(output, tuple) else output
                self.seen[i].append((args, kwargs, out.detach()))
        return hook

    @contextmanager
    def attached(self) -> Iterator["BlockTap"]:
        handles = [b.register_forward_hook(self._hook(i), with_kwargs=True) for i, b in enumerate(self.blocks)]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def release(self, i: int) -> None:
        """Stop tapping block i and drop what was kept."""
        self.armed.discard(i)
        self.seen.pop(i, None)

    @torch.no_grad()
    def error(self, i: int) -> float:
        """Relative squared output error of block i (as it is now) on the tapped batches."""
        num = den = 0.0
        for args, kwargs, ref in self.seen.get(i, []):
            out = self.blocks[i](*args, **kwargs)
            out = out[0] if isinstance(out, tuple) else out
            num += float((out.double() - ref.double()).pow(2).sum())
            den += float(ref.double().pow(2).sum())
        return num / den if den > 0 else float("nan")


@contextmanager
def swapped_weights(modules: dict[str, nn.Module], weights: dict[str, torch.Tensor]) -> Iterator[None]:
    """Temporarily replace the weights of some linears (restored on exit)."""
    saved = {n: modules[n].weight.data for n in weights}
    try:
        for n, w in weights.items():
            modules[n].weight.data = w.to(saved[n].dtype)
        yield
    finally:
        for n, w in saved.items():
            modules[n].weight.data = w
