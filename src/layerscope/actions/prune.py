"""Remove blocks, attention or MLP sublayers, chosen by a ScoreTable metric, into a loadable model.

Block removal writes a standard Hugging Face directory: the kept blocks renumbered, the config's
layer count and every per-layer setting (``layer_types``, ...) subset to match, tokenizer and
generation config copied. Plain ``AutoModelForCausalLM.from_pretrained(DIR)`` loads it.

Attention/MLP removal cannot change the architecture that plain transformers builds, so the
written directory computes the pruned network with the sublayers' output projections (weight and
bias) set to zero; ``layerscope_pruned.json`` lists the skipped sublayers and
``layerscope.load(DIR)`` returns a model that does not compute them at all.

Both write ``layerscope_pruned.json`` (provenance: source model and weights hash, what was
removed, by which metric, the scores, the layerscope version); block removal also writes a
mergekit passthrough recipe (``mergekit.yaml``) that rebuilds the same model from the source.
"""
from __future__ import annotations

import datetime as _dt
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from layerscope.actions.export.mergekit import mergekit_yaml
from layerscope.engine.removal import (
    apply_block_removal,
    check_removal,
    check_unit,
    zero_sublayers,
)
from layerscope.errors import LayerscopeError
from layerscope.model.offload_write import save_streamed, streams_from_disk
from layerscope.plans.prune import PrunePlan, resolve_plan
from layerscope.results import Result

PRUNED_JSON = "layerscope_pruned.json"
MERGEKIT_YAML = "mergekit.yaml"
PLAN_YAML = "layerscope_plan.yaml"

# Files of a model directory that describe the tokenizer / sentence-transformers pipeline.
_SIDE_FILE_PATTERNS = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt",
                       "*.model", "chat_template.*", "preprocessor_config.json", "modules.json",
                       "sentence_bert_config.json", "config_sentence_transformers.json", "1_Pooling")


# ============================================================================ input checks


# ============================================================================ config surgery


# ============================================================================ sublayers


# ============================================================================ selection


# ============================================================================ writing


def _copy_side_files(source_dir: Path | None, tokenizer: Any, dest: Path) -> list[str]:
    copied: list[str] = []
    if source_dir is not None:
        for pattern in _SIDE_FILE_PATTERNS:
            for f in sorted(source_dir.glob(pattern)):
                target = dest / f.name
                if target.exists():
                    continue
                if f.is_dir():
                    shutil.copytree(f, target)
                else:
                    shutil.copy2(f, target)
                copied.append(f.name)
    if not copied and tokenizer is not None:
        tokenizer.save_pretrained(str(dest))
        copied.append("tokenizer (saved)")
    return copied


def _dtype_name(model: nn.Module) -> str:
    return str(next(model.parameters()).dtype).replace("torch.", "")


@dataclass
class PruneResult(Result):
    """What `prune` wrote: the directory and its record (`layerscope_pruned.json`, kind layerscope.prune)."""

    kind = "layerscope.prune"
    out: Path
    unit: str
    removed: list[int]
    kept: list[int]
    provenance: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **self.provenance}

    @classmethod
    def summary_of(cls, d: dict[str, Any]) -> str:
        sel = d.get("selection") or {}
        how = f"by {sel.get('by')} ({sel.get('method')})" if sel.get("by") and sel.get("method") != "explicit" else "as listed"
        noun = "blocks" if d["unit"] == "block" else f"{d['unit']} sublayers"
        return f"removed {noun} {', '.join(map(str, d['removed']))} of {d['source']['num_layers']} {how}"

    @classmethod
    def table_of(cls, d: dict[str, Any]):
        from layerscope.report.extras import extras_table

        src = d["source"]
        prov = {"model_id": f"{src.get('model_id')} (pruned)", "model_family": src.get("family", ""),
                "weights_sha256": src.get("weights_sha256"), "num_layers": src.get("num_layers", 0),
                "created": d.get("created", "")}
        return extras_table({"prune": d}, prov)


def write_pruned(model: nn.Module, tokenizer: Any, plan: PrunePlan, out: str | Path, *, source_id: str,
                 source_dir: Path | None, weights_sha256: str | None, force: bool = False) -> PruneResult:
    """Apply `plan` to `model` (in place: the model is changed) and write the pruned directory `out`."""
    from layerscope import __version__
    from layerscope.model.adapter import find_parts
    from layerscope.outputs import (
        check_output,
        output_dir,
        write_json_atomic,
        write_text_atomic,
    )

    unit = check_unit(plan.unit)
    out = check_output(out, force=force, sources=(source_dir,))
    parts = find_parts(model)
    n = parts.num_layers
    removed = check_removal(plan.remove, n, unit)
    keep = [i for i in range(n) if i not in set(removed)]
    prov: dict[str, Any] = {
        "layerscope_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "source": {"model_id": source_id, "path": str(source_dir) if source_dir else None,
                   "weights_sha256": weights_sha256, "family": parts.family, "num_layers": n,
                   "dtype": _dtype_name(model)},
        "unit": unit,
        "removed": removed,
        "kept": keep,
        "selection": {**plan.model_dump(mode="json"), "removed": removed},
        "plan": plan.to_dict(),
    }
    with output_dir(out, verb="prune", force=force, sources=(source_dir,)) as tmp:
        if unit == "block":
            changes = apply_block_removal(model, removed)
            prov["config_changes"] = changes
            prov["skipped_sublayers"] = {}
            prov["block_map"] = {str(j): i for j, i in enumerate(keep)}  # new index -> source index
            prov["load"] = "transformers.AutoModelForCausalLM.from_pretrained(DIR) (a standard model)"
        else:
            # out-of-core: each block is zeroed while it is loaded for writing (the list fills then)
            zeroed = [] if streams_from_disk(model) else zero_sublayers(model, unit, removed)
            prov["skipped_sublayers"] = {unit: removed}
            prov["zeroed_parameters"] = zeroed
            prov["load"] = ("plain transformers computes the pruned network with zeroed output projections; "
                            "layerscope.load(DIR) skips the sublayers' computation")
        if streams_from_disk(model):
            def edit(j, block):
                if unit != "block" and j in removed:
                    zeroed.extend(zero_sublayers(model, unit, [j]))

            save_streamed(model, tmp, edit)
            prov["written"] = "shard by shard (out-of-core: one block in memory at a time)"
        else:
            model.save_pretrained(str(tmp), safe_serialization=True)
        prov["side_files"] = _copy_side_files(source_dir, tokenizer, tmp)
        if unit == "block":
            (tmp / MERGEKIT_YAML).write_text(
                mergekit_yaml(str(source_dir or source_id), keep, _dtype_name(model), removed), encoding="utf-8")
            prov["mergekit"] = MERGEKIT_YAML
        plan.save(tmp / PLAN_YAML)
        result = PruneResult(out=out, unit=unit, removed=removed, kept=keep, provenance=prov)
        write_json_atomic(tmp / PRUNED_JSON, result.to_dict())
        write_text_atomic(tmp / "report.html", result.report_html())
    return result


def prune(model: Any = None, plan: PrunePlan | str | Path | None = None, *, out: str | Path, force: bool = False,
          trust_remote_code: bool = False, device: str | None = None, dtype: Any = None,
          offload: bool | None = None, **request: Any) -> PruneResult:
    """Apply a PrunePlan to `model` and write the pruned model to `out`.

    `plan` is a PrunePlan or a plan file; without one, `request` (remove, unit, by, scores, units,
    iterative, scan_options) is resolved by `plan_prune` first. A plan made for other weights is
    refused.
    """
    from layerscope.model.loading import load_model, resolve, source_dtype
    from layerscope.outputs import check_output

    _, source_dir = resolve(model)
    check_output(out, force=force, sources=(source_dir,))
    if isinstance(plan, (str, Path)):
        plan = PrunePlan.from_file(plan)
    loaded = None
    if plan is None:
        plan, loaded = resolve_plan(model, trust_remote_code=trust_remote_code, device=device, dtype=dtype,
                                    offload=offload, **request)
    elif request:
        raise LayerscopeError(f"give either a plan or a request, not both ({', '.join(request)})")
    if loaded is None:
        loaded = load_model(model, trust_remote_code=trust_remote_code, dtype=dtype or source_dtype(source_dir),
                            device=device, offload=offload)
    if plan.weights_sha256 and loaded.weights_sha256 and plan.weights_sha256 != loaded.weights_sha256:
        raise LayerscopeError(f"the plan was made for other weights (sha256 {plan.weights_sha256[:12]}… vs "
                              f"{loaded.weights_sha256[:12]}…)")
    return write_pruned(loaded.model, loaded.tokenizer, plan, out, source_id=loaded.model_id,
                        source_dir=source_dir, weights_sha256=loaded.weights_sha256, force=force)
