"""Architecture adapter: where the blocks, sublayers, norms and head of a model live.

A small registry names the modules for each known family; a structural fallback finds them in
unknown models (the longest ModuleList of identical blocks, children named like attention/MLP).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from layerscope.errors import LayerscopeError

# How the residual stream between attention and MLP can be read inside a block:
#   ("input", path)  - the module at `path` receives it as its first input (pre-LN)
#   ("output", path) - the module at `path` returns it (post-LN, e.g. BERT)
#   None             - attention and MLP read the same input in parallel
MidPoint = tuple[Literal["input", "output"], str] | None


@dataclass(frozen=True)
class FamilySpec:
    blocks: tuple[str, ...]  # candidate paths of the block ModuleList (first found wins)
    attention: str  # module inside a block whose output[0] is the attention contribution
    mlp: str | None  # module whose output is the MLP contribution (None: use h_out - h_mid)
    mid: MidPoint
    attn_out_proj: str  # linear fed with the concatenated per-head outputs
    mlp_down_proj: str  # linear fed with the MLP's intermediate activation
    final_norm: tuple[str, ...] = ()
    causal: bool = True
    head_proj: tuple[str, ...] = ()  # projection between the final norm and the head (OPT-350m's project_out)


_LLAMA_LIKE = FamilySpec(
    blocks=("model.layers", "layers"),
    attention="self_attn",
    mlp="mlp",
    mid=("input", "post_attention_layernorm"),
    attn_out_proj="self_attn.o_proj",
    mlp_down_proj="mlp.down_proj",
    final_norm=("model.norm", "norm"),
)
_GEMMA2_LIKE = FamilySpec(
    blocks=("model.layers", "layers"),
    attention="self_attn",
    mlp="mlp",
    mid=("input", "pre_feedforward_layernorm"),
    attn_out_proj="self_attn.o_proj",
    mlp_down_proj="mlp.down_proj",
    final_norm=("model.norm", "norm"),
)
_BERT_LIKE = FamilySpec(
    blocks=("encoder.layer", "bert.encoder.layer", "roberta.encoder.layer"),
    attention="attention",
    mlp=None,
    mid=("output", "attention.output.LayerNorm"),
    attn_out_proj="attention.output.dense",
    mlp_down_proj="output.dense",
    final_norm=(),
    causal=False,
)

FAMILIES: dict[str, FamilySpec] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "phi3": _LLAMA_LIKE,
    "gemma2": _GEMMA2_LIKE,
    "gemma3_text": _GEMMA2_LIKE,
    "gemma3": FamilySpec(
        blocks=("model.language_model.layers", "language_model.layers", "model.layers"),
        attention="self_attn",
        mlp="mlp",
        mid=("input", "pre_feedforward_layernorm"),
        attn_out_proj="self_attn.o_proj",
        mlp_down_proj="mlp.down_proj",
        final_norm=("model.language_model.norm", "language_model.norm", "model.norm"),
    ),
    "gpt2": FamilySpec(
        blocks=("transformer.h", "h"),
        attention="attn",
        mlp="mlp",
        mid=("input", "ln_2"),
        attn_out_proj="attn.c_proj",
        mlp_down_proj="mlp.c_proj",
        final_norm=("transformer.ln_f", "ln_f"),
    ),
    "gpt_neox": FamilySpec(
        blocks=("gpt_neox.layers", "layers"),
        attention="attention",
        mlp="mlp",
        mid=("input", "post_attention_layernorm"),  # replaced by None when use_parallel_residual
        attn_out_proj="attention.dense",
        mlp_down_proj="mlp.dense_4h_to_h",
        final_norm=("gpt_neox.final_layer_norm", "final_layer_norm"),
    ),
    "opt": FamilySpec(
        blocks=("model.decoder.layers", "decoder.layers"),
        attention="self_attn",
        mlp="fc2",
        mid=("input", "final_layer_norm"),
        attn_out_proj="self_attn.out_proj",
        mlp_down_proj="fc2",
        final_norm=("model.decoder.final_layer_norm", "decoder.final_layer_norm"),
        head_proj=("model.decoder.project_out", "decoder.project_out"),
    ),
    "falcon": FamilySpec(
        blocks=("transformer.h", "h"),
        attention="self_attention",
        mlp="mlp",
        mid=None,  # replaced by post_attention_layernorm when the model is not parallel
        attn_out_proj="self_attention.dense",
        mlp_down_proj="mlp.dense_4h_to_h",
        final_norm=("transformer.ln_f", "ln_f"),
    ),
    "bert": _BERT_LIKE,
    "roberta": _BERT_LIKE,
    "xlm-roberta": _BERT_LIKE,
    "vit": FamilySpec(
        blocks=("layers", "vit.layers", "encoder.layer", "vit.encoder.layer"),
        attention="attention",
        mlp="mlp",
        mid=("input", "layernorm_after"),
        attn_out_proj="attention.o_proj",
        mlp_down_proj="mlp.fc2",
        final_norm=("layernorm", "vit.layernorm"),
        causal=False,
    ),
}


@dataclass
class ModelParts:
    """Handles on the pieces of one model that layerscope measures and edits."""

    model: nn.Module
    family: str
    blocks: nn.ModuleList
    blocks_path: str
    attention: list[nn.Module]
    mlp: list[nn.Module | None]
    mid: list[tuple[str, nn.Module] | None]
    attn_out_proj: list[nn.Module | None]
    mlp_down_proj: list[nn.Module | None]
    final_norm: nn.Module | None
    head: nn.Module | None
    causal: bool
    num_heads: int | None
    spec: FamilySpec | None = None
    notes: list[str] = field(default_factory=list)
    head_proj: nn.Module | None = None

    def head_input(self, h: torch.Tensor) -> torch.Tensor:
        """What the output head reads from a residual state: the final norm, then any projection."""
        x = self.final_norm(h) if self.final_norm is not None else h
        return self.head_proj(x) if self.head_proj is not None else x

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    @property
    def parallel(self) -> bool:
        return self.mid[0] is None

    @property
    def has_lm_head(self) -> bool:
        return self.head is not None and self.causal

    def base_model(self) -> nn.Module:
        """The module that embeds the input and runs the blocks, without the output head."""
        owner = self.blocks_path.rpartition(".")[0]
        if owner.rpartition(".")[2] == "encoder":  # BERT-like: embeddings live one level up
            owner = owner.rpartition(".")[0]
        return self.model.get_submodule(owner) if owner else self.model

    def block_linears(self, i: int) -> dict[str, nn.Module]:
        """Every 2-D weight layer (nn.Linear or GPT-2 Conv1D) of block i, by name inside the block."""
        return {n: m for n, m in self.blocks[i].named_modules() if _is_linear(m)}

    def sublayer_of(self, linear_name: str) -> str:
        """'attention' or 'mlp' for a linear's name inside a block."""
        attn_prefix = self.spec.attention if self.spec else _ATTN_HINT
        if self.spec and linear_name.startswith(attn_prefix + "."):
            return "attention"
        if any(h in linear_name.lower() for h in _ATTN_HINT_WORDS):
            return "attention"
        return "mlp"


_ATTN_HINT = "attn"
_ATTN_HINT_WORDS = ("attn", "attention", "q_proj", "k_proj", "v_proj", "o_proj", "query", "key", "value")


def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"


def _get(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def _first(root: nn.Module, paths: tuple[str, ...]) -> tuple[str, nn.Module] | None:
    for p in paths:
        m = _get(root, p)
        if m is not None:
            return p, m
    return None


def _num_heads(model: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "text_config", None) or cfg
    for key in ("num_attention_heads", "n_head", "num_heads"):
        v = getattr(cfg, key, None)
        if isinstance(v, int):
            return v
    return None


def _output_head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return head if isinstance(head, nn.Module) else None


def _model_type(model: nn.Module) -> str:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "model_type", "") or ""


def find_parts(model: nn.Module) -> ModelParts:
    """Locate the measurable parts of `model` (registry first, structural fallback second)."""
    mtype = _model_type(model)
    spec = FAMILIES.get(mtype)
    if spec is not None:
        spec = _specialise(model, mtype, spec)
        found = _first(model, spec.blocks)
        if found is not None:
            return _from_spec(model, mtype, spec, *found)
    return _structural(model, mtype)


def _specialise(model: nn.Module, mtype: str, spec: FamilySpec) -> FamilySpec:
    cfg = model.config
    from dataclasses import replace

    if mtype == "gpt_neox" and getattr(cfg, "use_parallel_residual", False):
        return replace(spec, mid=None)
    if mtype == "opt" and not getattr(cfg, "do_layer_norm_before", True):  # post-LN (OPT-350m)
        return replace(spec, mid=("output", "self_attn_layer_norm"))
    if mtype == "falcon" and not (getattr(cfg, "parallel_attn", True) or getattr(cfg, "new_decoder_architecture", False)):
        return replace(spec, mid=("input", "post_attention_layernorm"))
    return spec


def _from_spec(model: nn.Module, mtype: str, spec: FamilySpec, path: str, blocks: nn.Module) -> ModelParts:
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise LayerscopeError(f"{mtype}: '{path}' is not a non-empty list of blocks")
    attn, mlp, mid, oproj, down = [], [], [], [], []
    for i, b in enumerate(blocks):
        a = _get(b, spec.attention)
        if a is None:
            raise LayerscopeError(f"{mtype}: block {i} has no attention module '{spec.attention}'")
        attn.append(a)
        mlp.append(_get(b, spec.mlp) if spec.mlp else None)
        if spec.mid is None:
            mid.append(None)
        else:
            where, mpath = spec.mid
            mm = _get(b, mpath)
            if mm is None:
                raise LayerscopeError(f"{mtype}: block {i} has no '{mpath}' between attention and MLP")
            mid.append((where, mm))
        oproj.append(_get(b, spec.attn_out_proj))
        down.append(_get(b, spec.mlp_down_proj))
    fn = _first(model, spec.final_norm) if spec.final_norm else None
    hp = _first(model, spec.head_proj) if spec.head_proj else None
    return ModelParts(
        model=model,
        family=mtype,
        blocks=blocks,
        blocks_path=path,
        attention=attn,
        mlp=mlp,
        mid=mid,
        attn_out_proj=oproj,
        mlp_down_proj=down,
        final_norm=fn[1] if fn else None,
        head=_output_head(model),
        causal=spec.causal,
        num_heads=_num_heads(model),
        spec=spec,
        head_proj=hp[1] if hp else None,
    )


# ---------------------------------------------------------------- structural fallback
_ATTN_NAMES = ("self_attn", "attention", "attn", "self_attention")
_MLP_NAMES = ("mlp", "feed_forward", "ffn", "ff", "mlp_block")


def _structural(model: nn.Module, mtype: str) -> ModelParts:
    best: tuple[str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) >= 2 and len({type(c) for c in mod}) == 1:
            if best is None or len(mod) > len(best[1]):
                best = (name, mod)
    label = mtype or type(model).__name__
    if best is None:
        raise LayerscopeError(f"unsupported architecture '{label}': no list of repeated transformer blocks found")
    path, blocks = best
    b0 = blocks[0]
    attn_name = next((n for n in _ATTN_NAMES if _get(b0, n) is not None), None)
    if attn_name is None:
        raise LayerscopeError(
            f"unsupported architecture '{label}': blocks at '{path}' have no attention module "
            f"(looked for {', '.join(_ATTN_NAMES)})"
        )
    mlp_name = next((n for n in _MLP_NAMES if _get(b0, n) is not None), None)
    if mlp_name is None:
        raise LayerscopeError(
            f"unsupported architecture '{label}': blocks at '{path}' have no MLP module "
            f"(looked for {', '.join(_MLP_NAMES)})"
        )
    # The norm in front of the MLP reads the residual stream between the sublayers.
    mid_name = next(
        (
            n
            for n in ("post_attention_layernorm", "pre_feedforward_layernorm", "ln_2", "norm2", "ffn_norm", "layernorm_after")
            if _get(b0, n) is not None
        ),
        None,
    )
    spec = FamilySpec(
        blocks=(path,),
        attention=attn_name,
        mlp=mlp_name,
        mid=("input", mid_name) if mid_name else None,
        attn_out_proj=_last_linear_path(_get(b0, attn_name), attn_name),
        mlp_down_proj=_last_linear_path(_get(b0, mlp_name), mlp_name),
        final_norm=tuple(
            p
            for p in (path.rsplit(".", 1)[0] + ".norm", path.rsplit(".", 1)[0] + ".final_layernorm", "norm", "ln_f")
            if p
        ),
    )
    parts = _from_spec(model, label, spec, path, blocks)
    parts.notes.append(f"structural fallback: blocks '{path}', attention '{attn_name}', mlp '{mlp_name}'")
    return parts


def _last_linear_path(module: nn.Module | None, prefix: str) -> str:
    if module is None:
        return prefix
    names = [n for n, m in module.named_modules() if _is_linear(m)]
    return f"{prefix}.{names[-1]}" if names else prefix


def linear_weight(m: nn.Module) -> torch.Tensor:
    """Weight as [out_features, in_features] for nn.Linear and GPT-2's transposed Conv1D."""
    w = m.weight
    return w.t() if type(m).__name__ == "Conv1D" else w
