"""One statistics pass: the input second moment XᵀX of every linear layer, block by block.

Every compressor of issue 12 needs the same thing from calibration data: each linear layer's
input second moment XᵀX = Σ_tokens x xᵀ. GPTQ and SparseGPT use H = 2XᵀX/n (+ damping) as the
Hessian of the layer-wise reconstruction loss ‖WX − ŴX‖² (Frantar et al. 2022, 2023); Wanda's
score |W_ij|·‖X_j‖₂ uses its diagonal (Sun et al. 2023); SVD-LLM whitens with its Cholesky factor
(Wang et al. 2024).

`linear_moments` runs the calibration batches through the engine's block-sequential executor
(`BlockRunner.blockwise`). While block i runs, forward pre-hooks on its linear layers accumulate
XᵀX; then `on_block(i, block, stats)` is called and may compress the block in place. With
`sequential=True` the inputs of block i+1 are recomputed from the changed block (so block i+1's
statistics see the already-compressed prefix, as GPTQ does); with `sequential=False` they come from
the block as it was. Only one block's statistics are alive at a time.

Precision: each batch's XᵀX is a float32 product (≤ one batch of tokens), accumulated across
batches in float64. Layers fed the very same input tensor (q/k/v, gate/up) share one product.
Padding tokens are not masked (calibration windows have none).

Token weights (optional): `token_weights[name]` holds one weight per token of each batch, in batch
order; the pass then also accumulates Σ_t a_t x_t x_tᵀ (`LinearStats.wxtx`). quant_stats uses it
with a_t = ‖∂loss/∂y_t‖², so tokens whose outputs the loss barely depends on (attention-sink
tokens with massive activations) do not dominate the quantization-loss estimate.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from layerscope.errors import LayerscopeError

_CHUNK = 4096  # rows per float32 product


@dataclass
class LinearStats:
    """Input statistics of one linear layer over the calibration tokens."""

    name: str  # module path inside the block, e.g. "self_attn.q_proj"
    module: nn.Module  # nn.Linear (or GPT-2's Conv1D)
    xtx: torch.Tensor  # float64 [in, in]: Σ_tokens x xᵀ (undamped)
    tokens: int
    wxtx: torch.Tensor | None = None  # float64 [in, in]: Σ_tokens a_t x xᵀ when token weights were given
    calls: int = 0  # batches seen (indexes the token weights)

    def hessian(self, damp: float = 0.01) -> torch.Tensor:
        """float32 [in, in]: 2·XᵀX/tokens + damp·mean(diag)·I (GPTQ's damped Hessian)."""
        if self.tokens < 1:
            raise LayerscopeError(f"no calibration tokens reached {self.name}")
        h = self.xtx * (2.0 / self.tokens)
        d = torch.diagonal(h)
        lam = float(damp) * float(d.mean())
        if lam <= 0:  # all-zero inputs: any positive damping keeps H invertible
            lam = float(damp) or 1e-8
        h = h.clone()
        h.diagonal().add_(lam)
        return h.float()

    def col_norms(self) -> torch.Tensor:
        """float32 [in]: ‖X_j‖₂ = sqrt(diag(XᵀX)) (Wanda's input norm per input feature)."""
        return torch.sqrt(torch.diagonal(self.xtx).clamp_min(0)).float()

    @property
    def in_features(self) -> int:
        return int(self.xtx.shape[0])


def _in_features(m: nn.Module) -> int:
    if isinstance(m, nn.Linear):
        return m.in_features
    return int(m.weight.shape[0])  # Conv1D: weight [in, out]


class _Collector:
    """Forward pre-hooks accumulating XᵀX for the selected linears of one block."""

    def __init__(self, linears: dict[str, nn.Module], token_weights: dict[str, list[torch.Tensor]] | None = None):
        self.stats = {n: LinearStats(n, m, torch.zeros(_in_features(m), _in_features(m), dtype=torch.float64), 0)
                      for n, m in linears.items()}
        self.token_weights = token_weights
        self._last: tuple[torch.Tensor, torch.Tensor, int] | None = None  # (input, product, tokens)

    def product(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        if self._last is not None and self._last[0] is x:
            return self._last[1], self._last[2]
        x2 = x.detach().reshape(-1, x.shape[-1]).float()
        acc = torch.zeros(x2.shape[1], x2.shape[1], dtype=torch.float64)
        for s in range(0, x2.shape[0], _CHUNK):
            c = x2[s:s + _CHUNK]
            acc += (c.t() @ c).double()
        self._last = (x, acc, int(x2.shape[0]))
        return acc, int(x2.shape[0])

    def hook(self, name: str) -> Callable:
        def pre(_module: nn.Module, args: tuple) -> None:
            if not args:
                raise LayerscopeError(f"linear layer {name} was called without a positional input")
            p, n = self.product(args[0])
            st = self.stats[name]
            st.xtx += p
            st.tokens += n
            if self.token_weights is not None:
                self._weighted(st, args[0], self.token_weights[name])
            st.calls += 1

        return pre

    @staticmethod
    def _weighted(st: LinearStats, x: torch.Tensor, weights: list[torch.Tensor]) -> None:
        if st.calls >= len(weights):
            raise LayerscopeError(f"{st.name}: more batches than token weights ({len(weights)})")
        x2 = x.detach().reshape(-1, x.shape[-1]).float()
        a = weights[st.calls].reshape(-1).float()
        if a.numel() != x2.shape[0]:
            raise LayerscopeError(f"{st.name}: {a.numel()} token weights for {x2.shape[0]} tokens")
        acc = torch.zeros(x2.shape[1], x2.shape[1], dtype=torch.float64)
        for s in range(0, x2.shape[0], _CHUNK):
            c = x2[s:s + _CHUNK]
            acc += ((c * a[s:s + _CHUNK, None]).t() @ c).double()
        st.wxtx = acc if st.wxtx is None else st.wxtx + acc

    @contextmanager
    def attached(self) -> Iterator[None]:
        handles = [st.module.register_forward_pre_hook(self.hook(n)) for n, st in self.stats.items()]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            self._last = None


def linear_moments(parts, batches: Sequence[dict[str, torch.Tensor]] | torch.Tensor, *,
                   on_block: Callable[[int, nn.Module, dict[str, LinearStats]], None],
                   sequential: bool = True, select: Callable[[str, nn.Module], bool] | None = None,
                   batch_size: int = 8, token_weights: dict[str, list[torch.Tensor]] | None = None) -> None:
    """Collect XᵀX of every linear of every block and hand each block's stats to `on_block`.

    parts: ModelParts (model/adapter.py). batches: model-input dicts (engine.runner.make_batches) or
    token ids [N, T] (split into batches of `batch_size`). on_block(i, block, stats) may change the
    block's weights in place. sequential: block i+1's inputs recomputed from the changed block i
    (True) or taken from block i as it ran (False). select(name, module): which linears to watch.
    token_weights: {full linear name: [weights of each batch's tokens]} (see the module docstring).
    """
    from layerscope.engine.runner import BlockRunner, make_batches

    if isinstance(batches, torch.Tensor):
        batches, _ = make_batches(batches, batch_size)
    batches = list(batches)
    if not batches:
        raise LayerscopeError("no calibration batches for the statistics pass")
    runner = BlockRunner(parts, batches)
    state: dict[str, _Collector] = {}

    @contextmanager
    def observe(i: int) -> Iterator[None]:
        linears = {n: m for n, m in parts.block_linears(i).items() if select is None or select(n, m)}
        tw = None
        if token_weights is not None:
            tw = {n: token_weights[f"{parts.blocks_path}.{i}.{n}"] for n in linears}
        col = _Collector(linears, tw)
        state["col"] = col
        with col.attached():
            yield

    def done(i: int) -> bool:
        col = state.pop("col")
        missing = [n for n, st in col.stats.items() if st.tokens == 0]
        if missing:
            raise LayerscopeError(f"block {i}: linear layers never called during the forward pass: {missing}")
        on_block(i, parts.blocks[i], col.stats)
        return sequential

    runner.blockwise(done, observe=observe, recompute=sequential)
