"""A plan in each quantizer's own configuration format, and the checks that each one parses.

* GPTQModel  - ``QuantizeConfig`` with ``dynamic`` overrides: regex keys ("+:" positive, "-:" skip)
  matched with ``match`` against full module names, first match wins, each mapping to
  ``{"bits": .., "group_size": ..}``; base bits/group = the plan's most common option.
* llm-compressor - a compressed-tensors ``QuantizationConfig`` (``config_groups``: one
  ``QuantizationScheme`` per option, targets = "re:" regexes on module names; ``ignore`` = lm_head
  and unquantized layers) and the same groups as a ``QuantizationModifier`` recipe (YAML).
* HQQ - ``{module name: hqq BaseQuantizeConfig}`` (what ``HQQLinear(layer, cfg)`` takes).
* llama.cpp - ``--tensor-type NAME=TYPE`` arguments for ``llama-quantize`` (NAME is a regex searched
  in GGUF tensor names such as ``blk.3.attn_q.weight``; TYPE a ggml type name, case-insensitive):
  2 -> q2_K, 3 -> q3_K, 4 -> q4_K, 8 -> q8_0, 16 -> f16. GGUF names come from the gguf package's
  own tensor-name map. k-quants need rows that are a multiple of 256 values; llama-quantize
  replaces them with a fallback type for other tensors (noted per tensor in the export).

`validate_*` parse each export with the tool's own code where it is installed here (compressed-
tensors' pydantic models and module matcher; hqq's BaseQuantizeConfig; the gguf package's type
and name tables), else with a schema check that follows the tool's documented semantics
(GPTQModel: not installable on a CPU-only torch), and check that every layer resolves to the
planned bits and group size.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from layerscope.compress.quant import (
    GGML_TYPE_FOR_BITS,
    UNQUANTIZED,
    Scheme,
    hqq_quant_config,
)
from layerscope.errors import LayerscopeError
from layerscope.plans.allocate import QuantPlan

EXPORTS = ("gptqmodel", "llm-compressor", "hqq", "llamacpp")
MODEL_EXPORTS = ("hqq-pickle",)  # the quantized model itself in HQQ's pickle-based format (explicit only)
GPTQ_BITS = (2, 3, 4, 8)
GPTQ_DYNAMIC_KEYS = {"bits", "group_size", "sym", "desc_act", "mse", "pack_dtype"}


def parse_exports(text: str | Sequence[str] | None) -> list[str]:
    if not text:
        return []
    items = text.split(",") if isinstance(text, str) else [x for t in text for x in str(t).split(",")]
    out = []
    for x in (i.strip().lower() for i in items):
        if not x:
            continue
        x = {"llm_compressor": "llm-compressor", "llmcompressor": "llm-compressor", "gptq": "gptqmodel",
             "llama.cpp": "llamacpp", "gguf": "llamacpp", "compressed-tensors": "llm-compressor"}.get(x, x)
        if x not in EXPORTS + MODEL_EXPORTS:
            raise LayerscopeError(f"unknown export format '{x}' (known: {', '.join(EXPORTS + MODEL_EXPORTS)})")
        if x not in out:
            out.append(x)
    return out


def _base_option(plan: QuantPlan) -> tuple[int, int]:
    weight = Counter()
    for e in plan.entries:
        if e.bits != UNQUANTIZED:
            weight[(e.bits, e.group_size)] += e.shape[0] * e.shape[1]
    if not weight:
        raise LayerscopeError("the plan quantizes no layer: nothing to export")
    return max(weight.items(), key=lambda kv: (kv[1], -kv[0][0]))[0]


def _blocks(plan: QuantPlan) -> dict[int, list]:
    out: dict[int, list] = {}
    for e in plan.entries:
        out.setdefault(e.block, []).append(e)
    return out


# --------------------------------------------------------------------------- GPTQModel
def export_gptqmodel(plan: QuantPlan) -> dict[str, Any]:
    """GPTQModel QuantizeConfig fields, with `dynamic` carrying the per-layer plan."""
    base_bits, base_group = _base_option(plan)
    dynamic: dict[str, dict] = {}
    prefix = re.escape(plan.blocks_path)
    for b, es in sorted(_blocks(plan).items()):
        opts = {(e.bits, e.group_size) for e in es}
        if len(opts) == 1:
            bits, group = opts.pop()
            if (bits, group) == (base_bits, base_group):
                continue
            key = rf"{prefix}\.{b}\."
            dynamic[("-:" if bits == UNQUANTIZED else "+:") + key] = (
                {} if bits == UNQUANTIZED else {"bits": bits, "group_size": group})
            continue
        for e in es:
            if (e.bits, e.group_size) == (base_bits, base_group):
                continue
            key = "^" + re.escape(e.name) + "$"
            dynamic[("-:" if e.bits == UNQUANTIZED else "+:") + key] = (
                {} if e.bits == UNQUANTIZED else {"bits": e.bits, "group_size": e.group_size})
    return {
        "bits": base_bits,
        "group_size": base_group,
        "sym": True,
        "desc_act": False,
        "dynamic": dynamic,
        "quant_method": "gptq",
        "checkpoint_format": "gptq",
    }


def _gptq_resolve(dynamic: dict[str, dict], name: str) -> dict | bool | None:
    """GPTQModel's documented resolution: first pattern (in order) whose regex .match()es wins;
    '-:' means skip (False); no match means the base config (None)."""
    for pattern, overrides in dynamic.items():
        neg = pattern.startswith("-:")
        raw = pattern[2:] if pattern.startswith(("-:", "+:")) else pattern
        if re.match(raw, name):
            return False if neg else dict(overrides)
    return None


def validate_gptqmodel(cfg: dict[str, Any], plan: QuantPlan) -> str:
    """Parse with gptqmodel when installed, else a schema check of the same rules. Returns how."""
    how = "schema check (GPTQModel's dynamic rules: +:/-: prefixes, regex .match, first match wins)"
    try:  # pragma: no cover - gptqmodel needs a CUDA build of torch; not installable here
        from gptqmodel import QuantizeConfig  # type: ignore
        from gptqmodel.quantization.config import dynamic_get  # type: ignore

        qc = QuantizeConfig(bits=cfg["bits"], group_size=cfg["group_size"], sym=cfg["sym"],
                            desc_act=cfg["desc_act"], dynamic=cfg["dynamic"])
        resolve = lambda n: dynamic_get(qc.dynamic, n)  # noqa: E731
        how = "gptqmodel.QuantizeConfig + dynamic_get"
    except ImportError:
        resolve = lambda n: _gptq_resolve(cfg["dynamic"], n)  # noqa: E731
    for key in ("bits", "group_size", "sym", "desc_act", "dynamic"):
        if key not in cfg:
            raise LayerscopeError(f"gptqmodel export lacks '{key}'")
    if cfg["bits"] not in GPTQ_BITS:
        raise LayerscopeError(f"gptqmodel export: base bits {cfg['bits']} not in {GPTQ_BITS}")
    if not isinstance(cfg["group_size"], int) or not (cfg["group_size"] == -1 or cfg["group_size"] > 0):
        raise LayerscopeError("gptqmodel export: group_size must be -1 or a positive integer")
    for pattern, overrides in cfg["dynamic"].items():
        raw = pattern[2:] if pattern.startswith(("-:", "+:")) else pattern
        try:
            re.compile(raw)
        except re.error as exc:
            raise LayerscopeError(f"gptqmodel export: invalid dynamic pattern {pattern!r}: {exc}") from None
        if not isinstance(overrides, dict) or set(overrides) - GPTQ_DYNAMIC_KEYS:
            raise LayerscopeError(f"gptqmodel export: bad overrides for {pattern!r}: {overrides!r}")
        if "bits" in overrides and overrides["bits"] not in GPTQ_BITS:
            raise LayerscopeError(f"gptqmodel export: bits {overrides['bits']} not in {GPTQ_BITS}")
    for e in plan.entries:
        got = resolve(e.name)
        if e.bits == UNQUANTIZED:
            ok = got is False
        else:
            eff = {"bits": cfg["bits"], "group_size": cfg["group_size"], **(got or {})}
            ok = got is not False and (eff["bits"], eff["group_size"]) == (e.bits, e.group_size)
        if not ok:
            raise LayerscopeError(f"gptqmodel export resolves {e.name} to {got!r}, plan says {e.bits}b/g{e.group_size}")
    return how


# --------------------------------------------------------------------------- llm-compressor / compressed-tensors
def _targets(plan: QuantPlan, entries: list) -> list[str]:
    """'re:' targets matching exactly the given linears (one regex per linear name, blocks alternated)."""
    by_linear: dict[str, list[int]] = {}
    for e in entries:
        by_linear.setdefault(e.linear, []).append(e.block)
    prefix = re.escape(plan.blocks_path)
    out = []
    for lin, blocks in sorted(by_linear.items()):
        alt = "|".join(str(b) for b in sorted(set(blocks)))
        out.append(rf"re:^{prefix}\.(?:{alt})\.{re.escape(lin)}$")
    return out


def export_llmcompressor(plan: QuantPlan, head: str = "lm_head") -> dict[str, Any]:
    """A compressed-tensors QuantizationConfig dict (also the `config_groups` of an llm-compressor recipe)."""
    groups: dict[tuple[int, int], list] = {}
    ignore = [head] if head else []
    for e in plan.entries:
        if e.bits == UNQUANTIZED:
            ignore.append(e.name)
        else:
            groups.setdefault((e.bits, e.group_size), []).append(e)
    config_groups = {}
    for k, ((bits, group), es) in enumerate(sorted(groups.items())):
        config_groups[f"group_{k}"] = {
            "targets": _targets(plan, es),
            "weights": {"num_bits": bits, "type": "int", "symmetric": True, "strategy": "group",
                        "group_size": group, "dynamic": False},
            "input_activations": None,
            "output_activations": None,
        }
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "initialized",
            "config_groups": config_groups, "ignore": ignore}


def llmcompressor_recipe(cfg: dict[str, Any]) -> str:
    """The same groups as an llm-compressor QuantizationModifier recipe (YAML)."""
    import yaml

    groups = {k: {kk: vv for kk, vv in v.items() if vv is not None} for k, v in cfg["config_groups"].items()}
    recipe = {"quant_stage": {"quant_modifiers": {"QuantizationModifier": {
        "ignore": cfg["ignore"], "config_groups": groups}}}}
    return yaml.safe_dump(recipe, sort_keys=False)


def validate_llmcompressor(cfg: dict[str, Any], plan: QuantPlan, model=None, recipe: str | None = None) -> str:
    """compressed-tensors' own pydantic models, and its module matcher on every planned layer."""
    try:
        from compressed_tensors.quantization import (
            QuantizationConfig,
            QuantizationScheme,
        )
        from compressed_tensors.utils.match import is_match
    except ImportError:  # `pip install --no-deps compressed-tensors loguru` brings the real parser
        return _schema_llmcompressor(cfg, plan)
    try:
        qc = QuantizationConfig.model_validate(cfg)
    except ValueError as exc:  # pydantic's ValidationError
        raise LayerscopeError(f"llm-compressor export rejected by compressed-tensors: {str(exc).splitlines()[0]}") from None
    if recipe is not None:
        import yaml

        mod = yaml.safe_load(recipe)["quant_stage"]["quant_modifiers"]["QuantizationModifier"]
        for name, g in mod["config_groups"].items():
            QuantizationScheme.model_validate(g)
    modules = dict(model.named_modules()) if model is not None else {}
    import torch

    for e in plan.entries:
        m = modules.get(e.name) or torch.nn.Linear(1, 1)
        hits = [g for g, s in qc.config_groups.items() if is_match(e.name, m, s.targets, qc.ignore or [])]
        if e.bits == UNQUANTIZED:
            if hits:
                raise LayerscopeError(f"llm-compressor export quantizes {e.name}, planned unquantized")
            continue
        if len(hits) != 1:
            raise LayerscopeError(f"llm-compressor export: {e.name} matches {len(hits)} config groups")
        w = qc.config_groups[hits[0]].weights
        if (w.num_bits, w.group_size) != (e.bits, e.group_size):
            raise LayerscopeError(f"llm-compressor export gives {e.name} {w.num_bits}b/g{w.group_size}")
    if model is not None:  # nothing else in the model may be caught by a target
        planned = {e.name for e in plan.entries}
        for n, m in model.named_modules():
            if n and n not in planned and any(is_match(n, m, s.targets, qc.ignore or []) for s in qc.config_groups.values()):
                raise LayerscopeError(f"llm-compressor export also targets {n}, which the plan does not cover")
    return "compressed_tensors.QuantizationConfig.model_validate + compressed_tensors.utils.match.is_match"


def _schema_llmcompressor(cfg: dict[str, Any], plan: QuantPlan) -> str:
    """Fallback when compressed-tensors is missing: its documented rules ('re:' = re.match, else the
    exact name; ignore wins), each planned layer in exactly one group with its bits and group size."""
    def hit(name: str, target: str) -> bool:
        return re.match(target[3:], name) is not None if target.startswith("re:") else target == name

    if cfg.get("quant_method") != "compressed-tensors" or not isinstance(cfg.get("config_groups"), dict):
        raise LayerscopeError("llm-compressor export: not a compressed-tensors quantization config")
    ignore = cfg.get("ignore") or []
    for e in plan.entries:
        groups = [g for g in cfg["config_groups"].values()
                  if any(hit(e.name, t) for t in g["targets"]) and not any(hit(e.name, t) for t in ignore)]
        if e.bits == UNQUANTIZED:
            if groups:
                raise LayerscopeError(f"llm-compressor export quantizes {e.name}, planned unquantized")
            continue
        if len(groups) != 1:
            raise LayerscopeError(f"llm-compressor export: {e.name} matches {len(groups)} config groups")
        w = groups[0]["weights"]
        if (w["num_bits"], w["group_size"]) != (e.bits, e.group_size):
            raise LayerscopeError(f"llm-compressor export gives {e.name} {w['num_bits']}b/g{w['group_size']}")
    return "schema check (compressed-tensors not installed: 're:' targets, ignore, one group per layer)"


# --------------------------------------------------------------------------- HQQ
def export_hqq(plan: QuantPlan) -> dict[str, Any]:
    """{module name: hqq BaseQuantizeConfig} (None = leave unquantized)."""
    out: dict[str, Any] = {}
    for e in plan.entries:
        out[e.name] = None if e.bits == UNQUANTIZED else hqq_quant_config(Scheme(e.bits, e.group_size, plan.method))
    return out


def validate_hqq(cfg: dict[str, Any], plan: QuantPlan) -> str:
    from hqq.core.quantize import BaseQuantizeConfig, Quantizer

    for e in plan.entries:
        c = cfg.get(e.name, "missing")
        if e.bits == UNQUANTIZED:
            if c is not None:
                raise LayerscopeError(f"hqq export quantizes {e.name}, planned unquantized")
            continue
        if c == "missing" or c is None:
            raise LayerscopeError(f"hqq export has no config for {e.name}")
        w = c["weight_quant_params"]
        ref = BaseQuantizeConfig(nbits=w["nbits"], group_size=w["group_size"], axis=w["axis"])
        if set(c) != set(ref) or set(w) != set(ref["weight_quant_params"]):
            raise LayerscopeError(f"hqq export for {e.name} does not have BaseQuantizeConfig's fields")
        if w["nbits"] not in Quantizer.SUPPORTED_BITS or (w["nbits"], w["group_size"]) != (e.bits, e.group_size):
            raise LayerscopeError(f"hqq export gives {e.name} {w['nbits']}b/g{w['group_size']}")
    return "hqq.core.quantize.BaseQuantizeConfig fields and Quantizer.SUPPORTED_BITS"


# --------------------------------------------------------------------------- llama.cpp
def gguf_tensor_name(hf_name: str, model_type: str, num_layers: int) -> str:
    """GGUF tensor name of an HF weight, from the gguf package's tensor-name map."""
    import gguf

    arch = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}.get(model_type, gguf.MODEL_ARCH.LLAMA)
    tmap = gguf.get_tensor_name_map(arch, num_layers)
    name = tmap.get_name(hf_name + ".weight", try_suffixes=(".weight",))
    if name is None:
        raise LayerscopeError(f"no GGUF tensor name for '{hf_name}' ({model_type})")
    return name


def export_llamacpp(plan: QuantPlan, model_type: str = "llama") -> dict[str, Any]:
    """llama-quantize --tensor-type arguments (one per planned weight) plus notes."""
    args, entries = [], []
    for e in plan.entries:
        gname = gguf_tensor_name(e.name, model_type, plan.num_layers)  # e.g. blk.3.attn_q.weight
        stem = gname[: -len(".weight")] if gname.endswith(".weight") else gname
        gtype = GGML_TYPE_FOR_BITS[e.bits]
        k_ok = not gtype.endswith("_K") or e.shape[1] % 256 == 0
        arg = f"{stem}={gtype.lower()}"
        args += ["--tensor-type", arg]
        entries.append({"hf": e.name, "gguf": gname, "type": gtype, "row": e.shape[1], "k_quant_row_ok": k_ok})
    base_bits, _ = _base_option(plan)
    base = {2: "Q2_K", 3: "Q3_K_M", 4: "Q4_K_M", 8: "Q8_0"}.get(base_bits, "Q4_K_M")
    notes = []
    bad = [x for x in entries if not x["k_quant_row_ok"]]
    if bad:
        notes.append(f"{len(bad)} tensors have rows that are not a multiple of 256 values (e.g. {bad[0]['gguf']}, "
                     f"{bad[0]['row']} values): llama-quantize replaces their k-quant type with a fallback type, "
                     "so those bit widths are not realised in llama.cpp")
    return {"base_type": base, "args": args, "tensors": entries, "notes": notes,
            "command": "llama-quantize " + " ".join(f"--tensor-type {a}" for a in args[1::2])
                       + f" model-f16.gguf model-mixed.gguf {base}"}


def validate_llamacpp(cfg: dict[str, Any], plan: QuantPlan, model_type: str = "llama") -> str:
    """Each NAME=TYPE the way llama-quantize parses it: one '=', a known ggml type (case-insensitive),
    the lower-cased name used as a regex searched in the GGUF names; each must hit exactly its tensor."""
    import gguf

    types = {t.name.lower() for t in gguf.GGMLQuantizationType}
    pairs = cfg["args"]
    if len(pairs) % 2 or any(pairs[k] != "--tensor-type" for k in range(0, len(pairs), 2)):
        raise LayerscopeError("llama.cpp export: arguments must be '--tensor-type NAME=TYPE' pairs")
    all_names = [gguf_tensor_name(e.name, model_type, plan.num_layers) for e in plan.entries]
    for spec, e, gname in zip(pairs[1::2], plan.entries, all_names):
        if spec.count("=") != 1:
            raise LayerscopeError(f"llama.cpp export: malformed tensor type '{spec}'")
        name, typ = spec.split("=")
        if not name or typ.lower() not in types:
            raise LayerscopeError(f"llama.cpp export: invalid quantization type '{typ}'")
        pat = re.compile(name.lower())
        hits = [n for n in all_names if pat.search(n)]
        if hits != [gname]:
            raise LayerscopeError(f"llama.cpp export: pattern '{name}' matches {hits}, expected [{gname}]")
        if typ.upper() != GGML_TYPE_FOR_BITS[e.bits].upper():
            raise LayerscopeError(f"llama.cpp export: {gname} gets {typ}, plan says {e.bits} bits")
    return "gguf.GGMLQuantizationType names + gguf tensor-name map; patterns searched as llama-quantize does"


# --------------------------------------------------------------------------- write all
def write_exports(plan: QuantPlan, formats: Sequence[str], directory: Path, model=None,
                  model_type: str = "llama") -> dict[str, dict[str, Any]]:
    """Write each format into `directory` and validate it; returns {format: {files, validated_by}}."""
    from layerscope.outputs import write_json_atomic, write_text_atomic

    directory.mkdir(parents=True, exist_ok=True)
    out: dict[str, dict[str, Any]] = {}
    for f in formats:
        if f == "gptqmodel":
            cfg = export_gptqmodel(plan)
            how = validate_gptqmodel(cfg, plan)
            write_json_atomic(directory / "gptqmodel_quantize_config.json", cfg)
            files = ["gptqmodel_quantize_config.json"]
        elif f == "llm-compressor":
            cfg = export_llmcompressor(plan)
            recipe = llmcompressor_recipe(cfg)
            how = validate_llmcompressor(cfg, plan, model=model, recipe=recipe)
            write_json_atomic(directory / "compressed_tensors_quantization_config.json", cfg)
            write_text_atomic(directory / "llmcompressor_recipe.yaml", recipe)
            files = ["compressed_tensors_quantization_config.json", "llmcompressor_recipe.yaml"]
        elif f == "hqq":
            cfg = export_hqq(plan)
            how = validate_hqq(cfg, plan)
            write_json_atomic(directory / "hqq_quant_config.json", cfg)
            files = ["hqq_quant_config.json"]
        elif f == "llamacpp":
            cfg = export_llamacpp(plan, model_type)
            how = validate_llamacpp(cfg, plan, model_type)
            write_json_atomic(directory / "llamacpp_tensor_types.json", cfg)
            write_text_atomic(directory / "llamacpp_tensor_types.txt", "\n".join(cfg["args"][1::2]) + "\n")
            write_text_atomic(directory / "llamacpp_quantize.sh",
                              "#!/bin/sh\n# llama-quantize with the per-tensor plan (convert the model to GGUF f16 first)\n"
                              + cfg["command"] + "\n")
            files = ["llamacpp_tensor_types.json", "llamacpp_tensor_types.txt", "llamacpp_quantize.sh"]
        else:
            raise LayerscopeError(f"unknown export format '{f}'")
        out[f] = {"files": files, "validated_by": how}
        if f in ("gptqmodel", "llm-compressor"):
            odd = [e.name for e in plan.entries if e.bits != UNQUANTIZED and e.shape[1] % e.group_size]
            if odd:
                out[f]["warnings"] = [f"{len(odd)} layers have an input width that is not a multiple of their group "
                                      f"size (e.g. {odd[0]}); {f} kernels may refuse them: prefer group 64 there"]
    return out


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2)
