"""`merge`: apply a MergePlan -- base + per-layer-weighted task vectors -- and write a loadable model.

Writes a standard Hugging Face directory (safetensors, the base's config, tokenizer and generation
config; tied embeddings stay tied, so plain ``from_pretrained`` loads it), ``merge.json`` (kind
layerscope.merge: the plan, the coefficients per task, block and sublayer, how they were obtained),
``layerscope_plan.yaml``, ``mergekit.yaml`` (the same merge for ``mergekit-yaml``, with whether it is
exact) and ``report.html`` (the coefficients over depth). With a λ grid (`grid.py`) the written merge is
the grid's best point, and merge.json's ``lambda_grid`` holds every point's held-out NLL per task.
"""
from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from layerscope.actions.merge.context import MergeContext, load_context
from layerscope.actions.merge.groups import coefficient
from layerscope.errors import LayerscopeError
from layerscope.plans.merge import MergePlan
from layerscope.results import Result

MERGE_JSON = "merge.json"
MERGEKIT_YAML = "mergekit.yaml"
PLAN_YAML = "layerscope_plan.yaml"


@dataclass
class MergeResult(Result):
    """What `merge` wrote (merge.json, kind layerscope.merge)."""

    kind = "layerscope.merge"
    out: Path | None
    record: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **self.record}

    @property
    def coefficients(self) -> list[dict[str, Any]]:
        return self.record["plan"]["coefficients"]

    @classmethod
    def summary_of(cls, d: dict[str, Any]) -> str:
        p = d["plan"]
        mk = d.get("mergekit") or {}
        grid = d.get("lambda_grid")
        chose = (f"; λ grid {grid['grid']}: chose ×{grid['chosen']:g} (mean held-out NLL "
                 f"{next(q['mean_nll'] for q in grid['points'] if q['lambda'] == grid['chosen']):.4f})" if grid else "")
        return (f"merged {len(p['models'])} model(s) into {p['base']} by {p['method']} with {p['layers']} coefficients"
                f"{chose}; mergekit recipe "
                f"{'exact' if mk.get('exact') else 'approximate: ' + '; '.join(mk.get('reasons', []))}")

    @classmethod
    def table_of(cls, d: dict[str, Any]):
        from layerscope.report.extras import extras_table

        src = d["base"]
        prov = {"model_id": f"{src.get('model_id')} (merged)", "model_family": "", "weights_sha256": None,
                "num_layers": src.get("num_layers", 0), "created": d.get("created", "")}
        return extras_table({"merge": d}, prov)


def merged_state(ctx: MergeContext, coefs: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Every parameter of the merged model (fp32), computed tensor by tensor by the plan's method."""
    from layerscope.actions.merge.methods import method

    combine = method(ctx.plan.method)
    out = {}
    for name, base in ctx.base.items():
        info = ctx.infos[name]
        out[name] = combine(base, [d[name] for d in ctx.deltas], [coefficient(c, info) for c in coefs],
                            ctx.plan.density, ctx.generator(name))
    return out


def _filters(ctx: MergeContext) -> dict[str, str]:
    """Substrings naming the attention and MLP sublayers in tensor names (e.g. '.self_attn.', '.mlp.')."""
    from layerscope.model.adapter import find_parts

    parts = find_parts(ctx.model)
    out = {}
    for g, mods in (("attention", parts.attention), ("mlp", parts.mlp)):
        for child, mod in parts.blocks[0].named_modules():
            if child and mods[0] is mod:
                out[g] = f".{child}."
    return out


def apply_merge(ctx: MergeContext, out: str | Path, *, force: bool = False,
                grid: dict[str, Any] | None = None) -> MergeResult:
    from layerscope import __version__
    from layerscope.actions.export.mergekit_merge import merge_recipe
    from layerscope.actions.prune import _copy_side_files
    from layerscope.outputs import output_dir, write_json_atomic, write_text_atomic

    plan = ctx.resolve()
    state = merged_state(ctx, plan.coefficients)
    with torch.no_grad():
        for name, p in ctx.model.named_parameters():
            p.copy_(state[name].to(p.dtype))
    base_path = ctx.base_info["path"] or ctx.base_info["model_id"]
    paths = [s["path"] or s["model_id"] for s in ctx.sources]
    recipe, exact = merge_recipe(plan, plan.coefficients, ctx.infos, ctx.num_layers, base_path, paths, _filters(ctx))
    record = {
        "layerscope_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "base": ctx.base_info, "models": ctx.sources, "num_layers": ctx.num_layers,
        "groups": {n: [i.group, i.layer] for n, i in ctx.infos.items()},
        "mergekit": {"file": MERGEKIT_YAML, **exact},
        "load": "transformers.AutoModelForCausalLM.from_pretrained(DIR) (a standard model)",
        "plan": plan.to_dict(),
    }
    if grid is not None:
        record["lambda_grid"] = grid
    src_dir = Path(ctx.base_info["path"]) if ctx.base_info["path"] else None
    with output_dir(out, verb="merge", force=force, sources=tuple(Path(p) for p in [base_path, *paths]
                                                                  if Path(p).exists())) as tmp:
        ctx.model.save_pretrained(str(tmp), safe_serialization=True)
        record["side_files"] = _copy_side_files(src_dir, ctx.tokenizer, tmp)
        (tmp / MERGEKIT_YAML).write_text(recipe, encoding="utf-8")
        plan.save(tmp / PLAN_YAML)
        result = MergeResult(out=Path(out), record=record)
        write_json_atomic(tmp / MERGE_JSON, result.to_dict())
        write_text_atomic(tmp / "report.html", result.report_html())
    return result


def merge(base: Any = None, models: list | None = None, plan: MergePlan | str | Path | None = None, *,
          out: str | Path, force: bool = False, trust_remote_code: bool = False, progress=None,
          ray: str | None = None, **request: Any) -> MergeResult:
    """Merge fine-tuned `models` into `base` (or apply `plan`, a MergePlan or plan file) and write `out`.

    With ``lambda_grid=[g, ...]`` every g·λ is merged and measured on held-out task text and the best one is
    written (see `grid.py`); `ray` ("local" or an address) runs those grid points as Ray tasks."""
    from layerscope.outputs import check_output

    check_output(out, force=force)
    if ray:
        from layerscope.engine.ray_pool import require_ray

        require_ray()
    if isinstance(plan, (str, Path)):
        plan = MergePlan.from_file(plan)
    if plan is None:
        if base is None or not models:
            raise LayerscopeError("merge needs a base model and at least one fine-tuned model (or a plan)")
        srcs = [m if isinstance(m, dict) else {"model": str(m)} for m in models]
        plan = MergePlan.from_dict({"base": str(base), "models": srcs, **request}, where="merge request")
    elif request or models:
        raise LayerscopeError(f"give either a plan or a request, not both ({', '.join(request) or 'models'})")
    ctx = load_context(plan, trust_remote_code=trust_remote_code, progress=progress)
    grid = None
    if ctx.plan.lambda_grid:
        from layerscope.actions.merge.grid import run_grid

        ctx, grid = run_grid(ctx, ray=ray)
    return apply_merge(ctx, out, force=force, grid=grid)
