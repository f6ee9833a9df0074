"""SteerPlan: where to add the sentiment direction, how strongly, and what to compare it against.

`layer: null` means "the sentiment probe's concept depth" (resolved when the plan runs and recorded
in steer.json); every other field is used as written. `layerscope steer --dry-run` prints the plan.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from layerscope.plans.base import Plan


class SteerPlan(Plan):
    kind = "steer"

    layer: int | None = Field(None, ge=0, description="residual layer 0..L (0 = embeddings); null = concept depth")
    alpha: float = Field(0.25, description="added vector norm as a multiple of the mean residual norm there")
    data: str | None = Field(None, description="labelled .csv/.jsonl for the direction; null = VADER sentences")
    text_field: str = "text"
    label_field: str = "label"
    positive: str = "positive"
    negative: str = "negative"
    n: int = Field(2000, ge=2, description="sentences for the class means (balanced)")
    seeds: int = Field(5, ge=0, description="random vectors of equal norm to compare against")
    compare: str = Field("all", description="other layers: all, every:N or a comma list")
    generate_tokens: int = Field(0, ge=0)
    seed: int = 0
    precision: Literal["auto", "float32", "bfloat16"] = "auto"

    def describe(self) -> str:
        where = f"layer {self.layer}" if self.layer is not None else "the sentiment concept depth"
        return f"steer at {where} with alpha {self.alpha}, compared with {self.compare} layers and {self.seeds} random vectors"
