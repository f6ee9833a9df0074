"""A mergekit recipe of a layer-wise merge, and a check that mergekit would compute the same coefficients.

mergekit evaluates a list-valued parameter as a "gradient" over depth: block ℓ of L reads the list at
t = ℓ/(L−1) (linear interpolation between neighbouring entries), and the tensors outside the blocks
(embeddings, final norm, head) read it at t = 0. A conditional list (``- filter: X / value: ...``) takes
the first entry whose filter is a substring of the tensor name. The recipe gives every sublayer group its
own list (``.self_attn.`` / ``.mlp.`` and a fallback for the block norms) and every tensor outside the
blocks its own scalar, or a single list when the groups agree. `check` replays mergekit's rule on every
tensor name and reports the largest difference from layerscope's coefficients: 0 means exact.
"""
from __future__ import annotations

import json
from typing import Any

from layerscope.actions.merge.groups import LAYER_GROUPS, ParamInfo, coefficient

_METHOD_PARAMS = {"task_arithmetic": {}, "ties": {"normalize": False}, "dare_ties": {"normalize": False, "rescale": True}}


def read_setting(setting: Any, name: str, t: float) -> float | None:
    """The value mergekit reads from `setting` for tensor `name` at depth t (our re-statement of its rule)."""
    if isinstance(setting, (int, float)):
        return float(setting)
    if setting and all(isinstance(e, (int, float)) for e in setting):
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * setting[i0] + frac * setting[i1]
    for cond in setting:
        if cond.get("filter") in (None, "*") or cond["filter"] in name:
            return read_setting(cond["value"], name, t)
    return None


def _compact(values: list[float]) -> list[float]:
    """Two points when the values are linear in depth (a LiNeS ramp), else one per block."""
    L = len(values)
    if L > 2:
        a, b = values[0], values[-1]
        if all(abs(v - (a + (b - a) * i / (L - 1))) <= 1e-12 * max(1.0, abs(v)) for i, v in enumerate(values)):
            return [a, b] if a != b else [a]
    return list(values)


def weight_setting(coefs: dict[str, Any], infos: dict[str, ParamInfo], filters: dict[str, str]) -> Any:
    """mergekit `weight` for one model: a gradient list, or conditional lists per sublayer / tensor."""
    lists = {g: _compact(coefs[g]) for g in LAYER_GROUPS}
    outside = {n: coefficient(coefs, i) for n, i in infos.items() if i.layer is None}
    same = all(lists[g] == lists["block"] for g in LAYER_GROUPS)
    first = coefs["block"][0]
    if same and all(v == first for v in outside.values()):
        return lists["block"] if len(lists["block"]) > 1 else lists["block"][0]
    setting: list[dict[str, Any]] = []
    for g in ("attention", "mlp"):
        if lists[g] != lists["block"] and filters.get(g):
            setting.append({"filter": filters[g], "value": lists[g] if len(lists[g]) > 1 else lists[g][0]})
    for n, v in outside.items():
        setting.append({"filter": n, "value": v})
    setting.append({"value": lists["block"] if len(lists["block"]) > 1 else lists["block"][0]})
    return setting


def check(settings: list[Any], coefs: list[dict[str, Any]], infos: dict[str, ParamInfo], num_layers: int) -> float:
    """Largest |mergekit's coefficient − ours| over every tensor and model."""
    worst = 0.0
    for setting, c in zip(settings, coefs):
        for name, info in infos.items():
            t = info.layer / (num_layers - 1) if info.layer is not None and num_layers > 1 else 0.0
            got = read_setting(setting, name, t)
            worst = max(worst, float("inf") if got is None else abs(got - coefficient(c, info)))
    return worst


def merge_recipe(plan, coefs: list[dict[str, Any]], infos: dict[str, ParamInfo], num_layers: int, base_path: str,
                 model_paths: list[str], filters: dict[str, str], dtype: str = "float32") -> tuple[str, dict[str, Any]]:
    """The mergekit YAML of the merge and its exactness record."""
    import yaml

    settings = [weight_setting(c, infos, filters) for c in coefs]
    worst = check(settings, coefs, infos, num_layers)
    reasons = []
    if worst > 1e-9:
        reasons.append(f"mergekit's depth interpolation gives coefficients up to {worst:.3g} away from layerscope's")
    if plan.method == "dare_ties":
        reasons.append("dare_ties drops task-vector entries at random: mergekit draws other masks, so its tensors "
                       "differ (the same merge in expectation)")
    models = []
    for path, s in zip(model_paths, settings):
        params: dict[str, Any] = {"weight": s}
        if plan.method != "task_arithmetic":
            params["density"] = plan.density
        models.append({"model": path, "parameters": params})
    recipe = {"merge_method": plan.method, "base_model": base_path, "models": models,
              "parameters": _METHOD_PARAMS[plan.method] or None, "dtype": dtype}
    recipe = {k: v for k, v in recipe.items() if v is not None}
    head = [f"# layerscope merge: {plan.describe()}",
            "# weight lists are mergekit gradients: block l of L reads t = l/(L-1); tensors outside the blocks read t = 0",
            f"# exact: {'yes' if not reasons else 'no -- ' + '; '.join(reasons)}"]
    text = "\n".join(head) + "\n" + yaml.safe_dump(json.loads(json.dumps(recipe)), sort_keys=False, width=120)
    return text, {"exact": not reasons, "max_coefficient_difference": worst, "reasons": reasons}
