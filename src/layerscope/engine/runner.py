"""Block-sequential execution.

The inputs of every block (hidden states plus the keyword arguments a block needs: masks, position
embeddings, ...) are captured once by running the embedding part of the model with the blocks
replaced by recorders. After that the calibration batches are pushed through one block at a time,
so only one layer's activations are alive and a model could be streamed block by block.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from layerscope.errors import LayerscopeError, NumericalError
from layerscope.model.adapter import ModelParts


class _StopForward(Exception):
    pass


@dataclass
class Batch:
    """One calibration batch: model inputs and, per block, the extra arguments that block receives."""

    inputs: dict[str, torch.Tensor]
    eager: bool = False  # run with eager attention so attention probabilities are observable
    block_args: list[tuple[tuple, dict]] = field(default_factory=list)
    first_hidden: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return next(iter(self.inputs.values())).shape[0]


def _model_configs(parts: ModelParts) -> list[Any]:
    seen: dict[int, Any] = {}
    for m in [parts.model, *parts.blocks.modules()]:
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            seen[id(cfg)] = cfg
    return list(seen.values())


@contextmanager
def attention_implementation(parts: ModelParts, impl: str, configs: list[Any] | None = None) -> Iterator[None]:
    """Temporarily switch the attention kernel (eager returns probabilities, SDPA is faster)."""
    configs = _model_configs(parts) if configs is None else configs
    before = [c._attn_implementation for c in configs]
    try:
        for c in configs:
            c._attn_implementation = impl
        yield
    finally:
        for c, b in zip(configs, before):
            c._attn_implementation = b


def _split_hidden(args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple, dict]:
    if args:
        return args[0], tuple(args[1:]), dict(kwargs)
    kwargs = dict(kwargs)
    if "hidden_states" not in kwargs:
        raise LayerscopeError("could not find the hidden states among a block's inputs")
    return kwargs.pop("hidden_states"), (), kwargs


class BlockRunner:
    """Runs a model's blocks one at a time over captured calibration batches.

    `batches` hold the inputs of the first block and the per-block arguments; `forward_block`
    evaluates one block on one batch. Metrics, ablation and lenses all build on these two.
    """

    def __init__(self, parts: ModelParts, batches: list[dict[str, torch.Tensor]], eager_batches: int = 0):
        self.parts = parts
        self.model = parts.model
        self.batches = [Batch(inputs=b, eager=i < eager_batches) for i, b in enumerate(batches)]
        self._returns_tuple: bool | None = None
        self._configs = _model_configs(parts)  # walked once: forward_block runs thousands of times
        self._default_impl = next((c._attn_implementation for c in self._configs if c._attn_implementation), "eager")
        from layerscope.model.offload import streamer_of

        self.streamer = streamer_of(self.model)
        first = next(self.model.parameters())
        # Inputs go where the embeddings are; outputs (logits) and targets live on the compute device.
        self.input_device = first.device
        self.device = self.streamer.device if self.streamer is not None else first.device
        self.dtype = first.dtype
        if self.streamer is not None and batches:
            width = getattr(getattr(self.model, "config", None), "hidden_size", None) or first.shape[-1]
            n = sum(int(next(iter(b.values())).numel()) for b in batches)
            self.streamer.plan_activations(3 * n * int(width) * first.element_size())

    # ------------------------------------------------------------------ capture
    def _impl(self, batch: Batch) -> str:
        return "eager" if batch.eager else self._default_impl

    def _call_base(self, inputs: dict[str, torch.Tensor]) -> None:
        base = self.parts.base_model()
        kwargs = {k: v.to(self.input_device) for k, v in inputs.items()}
        try:
            base(**kwargs, use_cache=False)
        except TypeError as exc:
            if "use_cache" not in str(exc):
                raise
            base(**kwargs)

    def capture(self, grad: bool = False) -> None:
        """Record every block's inputs for every batch with one cheap embedding-only pass.

        grad=True keeps the embedding output attached to the autograd graph (gradient scorers).
        """
        for batch in self.batches:
            self.capture_batch(batch, grad=grad)

    def capture_batch(self, batch: Batch, grad: bool = False) -> Batch:
        """Record the inputs of every block for one batch (see `capture`)."""
        blocks = self.parts.blocks
        records: dict[int, tuple[torch.Tensor, tuple, dict]] = {}

        def make_recorder(i: int) -> Callable:
            def recorder(*args: Any, **kwargs: Any) -> Any:
                h, rest, kw = _split_hidden(args, kwargs)
                records[i] = (h, rest, kw)
                if self._returns_tuple is None:
                    raise _StopForward
                return (h,) if self._returns_tuple else h

            return recorder

        with torch.set_grad_enabled(grad), attention_implementation(self.parts, self._impl(batch)):
            if self._returns_tuple is None:
                # Learn once whether blocks return a tensor or a tuple (recorders must mimic it).
                with torch.no_grad():
                    self._with_recorders(blocks, make_recorder, batch.inputs)
                    h, rest, kw = records[0]
                    out = blocks[0](h, *rest, **kw)
                self._returns_tuple = isinstance(out, tuple)
                records.clear()
            self._with_recorders(blocks, make_recorder, batch.inputs)
        if len(records) != len(blocks):
            raise LayerscopeError(
                f"only {len(records)} of {len(blocks)} blocks were reached by the model's forward pass"
            )
        batch.first_hidden = records[0][0] if grad else records[0][0].detach()
        batch.block_args = [(records[i][1], records[i][2]) for i in range(len(blocks))]
        return batch

    def _with_recorders(self, blocks: nn.ModuleList, make_recorder: Callable, inputs: dict) -> None:
        for i, b in enumerate(blocks):
            b.forward = make_recorder(i)
        try:
            if self.streamer is not None:
                with self.streamer.paused():  # recording block inputs loads no block weights
                    self._call_base(inputs)
            else:
                self._call_base(inputs)
        except _StopForward:
            pass
        finally:
            for b in blocks:
                del b.forward

    # ------------------------------------------------------------------ execution
    def forward_block(self, i: int, h: torch.Tensor, batch: Batch) -> torch.Tensor:
        args, kwargs = batch.block_args[i]
        with attention_implementation(self.parts, self._impl(batch), self._configs):
            out = self.parts.blocks[i](h, *args, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    def head_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm + output head (+ the family's logit soft-capping), as the model itself applies."""
        if self.parts.head is None:
            raise LayerscopeError("this model has no output head (load it as a causal LM for lens metrics)")
        x = self.parts.head_input(h)
        logits = self.parts.head(x.to(self.parts.head.weight.dtype))
        cap = getattr(getattr(self.model, "config", None), "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits.float()

    def stream(self, fn: Callable[[int, int, torch.Tensor], None] | None = None, *,
               edits: dict[int, Callable[[torch.Tensor], torch.Tensor]] | None = None,
               inputs: Iterable[dict[str, torch.Tensor]] | None = None,
               keep_final: bool = False) -> list[torch.Tensor]:
        """Run batches through every block, one batch at a time (only one batch's activations alive).

        Taps: ``fn(layer, batch_index, h)`` sees the residual stream at layer 0 (input of block 0,
        i.e. the embeddings) .. L (output of the last block). Edits: ``edits[layer](h)`` replaces
        the stream at that layer before the tap and the next block see it (steering). `inputs`:
        model inputs to capture and run one by one instead of the runner's own captured batches.
        Returns the final hidden state of each batch when `keep_final`.
        """
        finals: list[torch.Tensor] = []
        L = self.parts.num_layers
        source = self.batches if inputs is None else (self.capture_batch(Batch(inputs=x)) for x in inputs)
        for b, batch in enumerate(source):
            h = batch.first_hidden
            for layer in range(L + 1):
                if layer:
                    h = self.forward_block(layer - 1, h, batch)
                if edits and layer in edits:
                    h = edits[layer](h)
                if fn is not None:
                    fn(layer, b, h)
            if keep_final:
                finals.append(h)
        return finals

    def blockwise(self, on_block: Callable[[int], bool | None] | None = None, *,
                  observe: Callable[[int], Any] | None = None, recompute: bool = True) -> list[torch.Tensor]:
        """Run all batches block by block (all batches through block i, then block i+1).

        `observe(i)` is a context manager entered while block i runs (hooks on its modules, e.g.
        input statistics). Then `on_block(i)` is called; it may change block i in place and
        returns true when it did. With `recompute` the outputs passed to block i+1 are then
        recomputed from the changed block (GPTQ-style sequential compression), else the outputs of
        the block as it ran are passed on. Captures the batches first if needed. Returns the
        final hidden state of every batch. Memory: one hidden state per batch at a time.
        """
        from contextlib import nullcontext

        if any(b.first_hidden is None for b in self.batches):
            self.capture()
        hs = [b.first_hidden for b in self.batches]
        for i in range(self.parts.num_layers):
            with torch.no_grad(), (observe(i) if observe is not None else nullcontext()):
                outs = [self.forward_block(i, h, batch) for h, batch in zip(hs, self.batches)]
            changed = on_block(i) if on_block is not None else False
            if changed and recompute:
                with torch.no_grad():
                    outs = [self.forward_block(i, h, batch) for h, batch in zip(hs, self.batches)]
            for o in outs:
                self.check_finite(o, f"the output of block {i}")
            hs = outs
        return hs

    @staticmethod
    def check_finite(h: torch.Tensor, where: str) -> None:
        if not torch.isfinite(h.sum(dtype=torch.float32)):  # NaN/Inf anywhere makes the sum non-finite; float32 so
            # fp16 activations cannot overflow at 65504 and raise a false alarm; cheaper than isfinite(h).all()
            raise NumericalError(f"non-finite activations (NaN/Inf) at {where}")


def make_batches(
    inputs: dict[str, torch.Tensor] | torch.Tensor, batch_size: int, eager_seqs: int = 0
) -> tuple[list[dict[str, torch.Tensor]], int]:
    """Split model inputs (token ids [N, T], or a dict of tensors with a leading sequence axis such
    as pixel_values) into batches; the first `eager_seqs` sequences form their own batch.

    Returns (batches, number of leading batches to run with eager attention).
    """
    if isinstance(inputs, torch.Tensor):
        inputs = {"input_ids": inputs, "attention_mask": torch.ones_like(inputs)}
    n = next(iter(inputs.values())).shape[0]
    eager_seqs = max(0, min(eager_seqs, n))
    bounds = ([(0, eager_seqs)] if eager_seqs else []) + [
        (s, min(s + batch_size, n)) for s in range(eager_seqs, n, batch_size)]
    return [{k: v[a:b] for k, v in inputs.items()} for a, b in bounds], (1 if eager_seqs else 0)
