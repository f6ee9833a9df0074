"""Block-level helpers shared by sparsify and lowrank: calibration windows, and two measures of what
changing one block in place (pruning, factorizing) costs.

- `BlockTap.error(i)`: the block's own relative output error on a few tapped batches,
  Σ‖B̂(h) − B(h)‖² / Σ‖B(h)‖², with h the block's inputs as the engine passed them and B(h) the
  outputs the unchanged block gave. Cheap, but blind to how much the rest of the model amplifies or
  absorbs the error: equal relative errors in different blocks cost the model very different amounts.
- `OutputTap.kl(i)`: the model's own loss, KL(dense model ‖ model with block i changed) in nats per
  token on a few calibration windows, by prefix reuse (the dense model runs once keeping every
  block's input; block i then runs from its kept input through the unchanged later blocks and the
  head, scored vocabulary-bounded as ablation is). This is what an allocation over blocks should sum.
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


class OutputTap:
    """KL(dense ‖ changed) per token on calibration windows `ids` [N, T] (see the module docstring).

    Build it before any block changes; `kl(i)` assumes blocks i+1.. are still dense. Needs every block's
    weights in memory (not out-of-core): each measurement runs the rest of the model. Runs blocks with
    ablation's prefix-reuse helpers (one caching pass, then blocks i.. from the kept input).
    """

    def __init__(self, parts, ids: torch.Tensor, batch_size: int = 4):
        from layerscope.engine.runner import BlockRunner, make_batches
        from layerscope.evaluation.scoring import OutputHead
        from layerscope.metrics.ground_truth.ablation import Reference, _cache_inputs

        self.runner = BlockRunner(parts, make_batches(ids, batch_size)[0])
        self.runner.capture()
        head = OutputHead.of(parts)
        self.inputs: list[dict[int, torch.Tensor]] = []  # [batch] {block: the dense model's input of it}
        self.refs = []
        with torch.no_grad():
            for batch in self.runner.batches:
                kept, h_final = _cache_inputs(self.runner, batch)
                self.inputs.append(kept)
                self.refs.append(Reference(self.runner, batch.inputs["input_ids"], h_final, head=head))

    def _mean_kl(self, finals) -> float:
        total = n = 0.0
        for ref, h in zip(self.refs, finals):
            score = ref.score_hidden(h)
            total, n = total + score.kl, n + score.n
        return total / n

    @torch.no_grad()
    def kl(self, i: int) -> float:
        """Mean KL(dense ‖ now) per position with blocks i.. as they are now, run from block i's dense input."""
        from layerscope.metrics.ground_truth.ablation import _run

        return self._mean_kl(_run(self.runner, b, kept[i], i) for b, kept in zip(self.runner.batches, self.inputs))

    @torch.no_grad()
    def kl_of(self, parts) -> float:
        """Mean KL(dense ‖ another model) per position on the same windows (e.g. the fully pruned copy)."""
        from layerscope.engine.runner import BlockRunner
        from layerscope.metrics.ground_truth.ablation import _run

        runner = BlockRunner(parts, [b.inputs for b in self.runner.batches])
        runner.capture()
        return self._mean_kl(_run(runner, b, b.first_hidden, 0) for b in runner.batches)


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
