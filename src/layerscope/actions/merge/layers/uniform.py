"""Uniform: one coefficient λ_t per task at every layer (task arithmetic's baseline, Ilharco et al. 2023)."""
from __future__ import annotations

from typing import Any

from layerscope.actions.merge.groups import constant_coefficients


def coefficients(ctx) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    lams = ctx.lambdas()
    return [constant_coefficients(lam, ctx.num_layers) for lam in lams], {"lambdas": lams}
