"""Write a sparsified model: a plain HF directory with the zeros in place, an llm-compressor recipe with
the per-block sparsity list, the plan, the result and its report.

compressed-tensors' sparse formats (sparse-bitmask, sparse-24-bitmask) are written only when the
installed compressed-tensors registers their compressors; 0.20 ships their configs but no
compressors, so the output says so instead of writing a format nothing here can read back.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

RECIPE = "llmcompressor_recipe.yaml"
MODIFIERS = {"wanda": "WandaPruningModifier", "sparsegpt": "SparseGPTModifier"}


def llmcompressor_recipe(plan, block_class: str) -> str | None:
    """SparseGPTModifier / WandaPruningModifier with `sparsity` as the per-block list (None for magnitude)."""
    import yaml

    name = MODIFIERS.get(plan.method)
    if name is None:
        return None
    mod: dict[str, Any] = {"sparsity": [round(float(s), 6) for s in plan.levels],
                           "mask_structure": "0:0" if plan.pattern == "unstructured" else plan.pattern,
                           "sequential_targets": [block_class], "targets": ["Linear"], "ignore": ["re:.*lm_head"]}
    if plan.method == "sparsegpt":
        mod.update(block_size=128, dampening_frac=float(plan.damp))
    return yaml.safe_dump({"sparsity_stage": {"sparsity_modifiers": {name: mod}}}, sort_keys=False)


def compressed_tensors_sparse_note(pattern: str) -> str:
    fmt = "sparse-24-bitmask" if pattern == "2:4" else "sparse-bitmask"
    try:
        from compressed_tensors.compressors import BaseCompressor
    except ImportError:
        return f"compressed-tensors is not installed: the {fmt} format was not written"
    if fmt in BaseCompressor.registered_names():
        return f"compressed-tensors registers {fmt}, but layerscope does not write it yet"
    import compressed_tensors

    return (f"compressed-tensors {compressed_tensors.__version__} has no {fmt} compressor (only its config): the "
            "sparse format was not written; the HF directory holds the zeros densely")


def write_sparse(lm, plan, out: Path, data: dict, *, force: bool, source_dir: Path | None) -> dict:
    """Write everything into `out` atomically; returns the file list recorded in the result."""
    from layerscope.actions.prune import PLAN_YAML, _copy_side_files
    from layerscope.actions.sparsify import SparsifyResult
    from layerscope.model.adapter import find_parts
    from layerscope.outputs import output_dir, write_json_atomic, write_text_atomic

    parts = find_parts(lm.model)
    files: dict[str, Any] = {"model": "model (plain transformers: AutoModelForCausalLM.from_pretrained)"}
    with output_dir(out, verb="sparsify", force=force, sources=(source_dir,)) as tmp:
        lm.model.save_pretrained(str(tmp / "model"), safe_serialization=True)
        if lm.tokenizer is not None:
            lm.tokenizer.save_pretrained(str(tmp / "model"))
        else:
            _copy_side_files(source_dir, None, tmp / "model")
        recipe = llmcompressor_recipe(plan, type(parts.blocks[0]).__name__)
        if recipe is not None:
            write_text_atomic(tmp / RECIPE, recipe)
            files["recipe"] = RECIPE
        else:
            data["notes"].append("magnitude pruning has no llm-compressor one-shot modifier with a per-layer list: "
                                 "no recipe written")
        data["notes"].append(compressed_tensors_sparse_note(plan.pattern))
        plan.save(tmp / PLAN_YAML)
        files["plan"] = PLAN_YAML
        data["out"] = str(out)
        data["files"] = files
        result = SparsifyResult(data)
        result.to_json(tmp / "sparsify.json")
        write_text_atomic(tmp / "report.html", result.report_html())
        write_json_atomic(tmp / "model" / "layerscope_sparsity.json", {"plan": plan.to_dict()})
    return files
