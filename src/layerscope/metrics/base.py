"""The metric protocol: small registered units that keep streaming statistics per block."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch

from layerscope.errors import LayerscopeError

if TYPE_CHECKING:
    from layerscope.engine.runner import BlockRunner
    from layerscope.model.adapter import ModelParts

Unit = Literal["block", "attention", "mlp", "head"]
Direction = Literal["higher", "lower"] | None  # which values mean "more important"; None: descriptive


@dataclass
class Column:
    """One metric's values over depth for one kind of unit."""

    metric: str
    unit: Unit
    values: list  # [L] floats (None where undefined); [L][H] for heads
    direction: Direction
    definition: str
    reference: str
    details: dict[str, Any] = field(default_factory=dict)
    name: str = ""  # column name, defaults to metric (block unit) or metric@unit

    def __post_init__(self) -> None:
        if not self.name:
            self.name = self.metric if self.unit == "block" else f"{self.metric}@{self.unit}"


@dataclass
class BlockObservation:
    """What one block did to one batch. Tensors are [B, T, ...] and detached."""

    index: int
    batch_index: int
    h_in: torch.Tensor
    h_out: torch.Tensor
    h_mid: torch.Tensor | None = None  # residual stream between attention and MLP (None if parallel)
    attn_out: torch.Tensor | None = None  # attention module's own output
    attn_probs: torch.Tensor | None = None  # [B, H, T, S] (eager batches only)
    head_out: torch.Tensor | None = None  # [B, T, H, head_dim] input of the attention output projection
    mlp_act: torch.Tensor | None = None  # [B, T, F] input of the MLP down projection

    _memo: dict = field(default_factory=dict, repr=False, compare=False)  # shared float64 statistics

    # --- per-token float64 statistics shared by the metrics that read the same streams ----------------
    # Several metrics (block influence, relative contribution, angular distance, norm growth) need norms
    # and inner products of the same residual streams; each used to convert [B, T, d] to float64 itself.
    # Streams: "in" (block input), "attn_out" (stream after attention), "mlp_in" (stream the MLP reads),
    # "mlp_out" (mlp_in plus the MLP's contribution), "out" (block output). Inner products are summed in float64 from the float32 values.
    def stream(self, name: str) -> torch.Tensor:
        key = ("stream", name)
        if key not in self._memo:
            if name == "in":
                t = self.h_in
            elif name == "out":
                t = self.h_out
            elif name == "mlp_in":
                t = self.mlp_in
            elif name == "attn_out":
                t = self.h_mid if self.h_mid is not None else self.h_in + self.delta_attn
            elif name == "mlp_out":
                t = self.h_out if self.h_mid is not None else self.mlp_in + self.delta_mlp
            else:
                raise LayerscopeError(f"unknown stream '{name}'")
            self._memo[key] = t.detach().double()
        return self._memo[key]

    def inherit(self, previous: "BlockObservation | None") -> None:
        """Reuse the previous block's float64 output statistics as this block's input ones (same tensor)."""
        if previous is not None and previous.h_out is self.h_in:
            for kind in ("stream", "norm"):
                if (kind, "out") in previous._memo:
                    self._memo[(kind, "in")] = previous._memo[(kind, "out")]
        if previous is not None:
            previous._memo.clear()  # its other statistics are not needed any more

    def dot(self, a: str, b: str) -> torch.Tensor:
        """Per-token <a, b> in float64 ([B, T])."""
        if a == b:
            return self.norm(a).square()
        key = ("dot",) + tuple(sorted((a, b)))
        if key not in self._memo:
            self._memo[key] = (self.stream(a) * self.stream(b)).sum(-1)
        return self._memo[key]

    def norm(self, name: str) -> torch.Tensor:
        key = ("norm", name)
        if key not in self._memo:
            self._memo[key] = torch.linalg.vector_norm(self.stream(name), dim=-1)
        return self._memo[key]

    def cos(self, a: str, b: str) -> torch.Tensor:
        """Per-token cosine in float64 (eps 1e-12 as F.cosine_similarity)."""
        return self.dot(a, b) / (self.norm(a) * self.norm(b)).clamp_min(1e-12)

    def delta_norm(self, a: str, b: str) -> torch.Tensor:
        """Per-token ||b - a|| from the float64 norms and inner product (no [B, T, d] difference)."""
        return (self.dot(a, a) + self.dot(b, b) - 2 * self.dot(a, b)).clamp_min(0).sqrt()

    @property
    def mlp_in(self) -> torch.Tensor:
        """Residual stream the MLP reads (block input for parallel blocks)."""
        return self.h_in if self.h_mid is None else self.h_mid

    @property
    def delta_attn(self) -> torch.Tensor:
        if self.h_mid is not None:
            return self.h_mid - self.h_in
        if self.attn_out is None:
            raise LayerscopeError("attention output was not observed")
        return self.attn_out

    @property
    def delta_mlp(self) -> torch.Tensor:
        if self.h_mid is not None:
            return self.h_out - self.h_mid
        return self.h_out - self.h_in - self.delta_attn


@dataclass
class ScanContext:
    parts: "ModelParts"
    runner: "BlockRunner | None"
    num_layers: int
    num_heads: int | None
    n_tokens: int
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)


class Metric:
    """Base class. Subclasses set the class attributes and override the hooks they need."""

    name: ClassVar[str]
    direction: ClassVar[Direction] = "higher"
    definition: ClassVar[str] = ""
    reference: ClassVar[str] = ""
    needs_data: ClassVar[bool] = True
    # Which optional observations the engine must collect for this metric.
    needs: ClassVar[frozenset[str]] = frozenset()

    def begin(self, ctx: ScanContext) -> None:
        self.ctx = ctx
        self.L = ctx.num_layers

    def observe(self, obs: BlockObservation) -> None:  # called for every (block, batch)
        pass

    def observe_weights(self, index: int) -> None:  # called once per block, before its data
        pass

    def block_done(self, index: int) -> None:  # called once all batches went through block `index`
        pass

    def finish(self) -> list[Column]:
        raise NotImplementedError

    def column(self, unit: Unit, values: list, *, metric: str | None = None, direction: Direction | str = "same",
               definition: str | None = None, **details: Any) -> Column:
        return Column(
            metric=metric or self.name,
            unit=unit,
            values=[_clean(v) for v in values],
            direction=self.direction if direction == "same" else direction,  # type: ignore[arg-type]
            definition=definition or self.definition,
            reference=self.reference,
            details=details,
        )


def _clean(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if v is None:
        return None
    f = float(v)
    return f if f == f and abs(f) != float("inf") else None


def token_mean(x: torch.Tensor) -> tuple[float, int]:
    """Sum and count over all leading (batch, token) positions of a per-token statistic."""
    return float(x.sum()), x.numel()


class Accumulator:
    """Running mean of per-token values, one slot per layer."""

    def __init__(self, n: int):
        self.sum = [0.0] * n
        self.count = [0] * n

    def add(self, i: int, per_token: torch.Tensor) -> None:
        self.sum[i] += float(per_token.double().sum())
        self.count[i] += per_token.numel()

    def mean(self) -> list[float | None]:
        return [s / c if c else None for s, c in zip(self.sum, self.count)]
