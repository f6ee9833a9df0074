"""The quantized model as compressed-tensors `pack-quantized` safetensors, loadable by plain transformers.

Built with the compressed-tensors library itself: `apply_quantization_config` attaches one
`QuantizationScheme` per (bits, group) to the planned linears (int, symmetric, strategy "group",
weights only), their `weight_scale` is set to the scales our quantizer used, and
`ModelCompressor.compress_model` packs the codes (32 values per `bits` int32 words) before
`save_pretrained`; `update_config` writes `quantization_config` into config.json. transformers'
`CompressedTensorsHfQuantizer` (and vLLM) read that directory. The scales are stored in the model's
dtype (float32 here, values float16-representable), so dequantization on load reproduces the
in-memory weights exactly; `validate_reload` loads the directory with
`transformers.AutoModelForCausalLM.from_pretrained` and reports the largest logit difference.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from layerscope.errors import LayerscopeError


def quantization_config(qweights: dict, ignore: list[str]) -> dict:
    groups: dict[tuple[int, int], list[str]] = {}
    for name, qw in sorted(qweights.items()):
        groups.setdefault((qw.bits, qw.group_size), []).append(name)
    config_groups = {}
    for k, ((bits, g), names) in enumerate(sorted(groups.items())):
        config_groups[f"group_{k}"] = {
            "targets": names,
            "weights": {"num_bits": bits, "type": "int", "symmetric": True, "strategy": "group", "group_size": g,
                        "dynamic": False},
            "input_activations": None, "output_activations": None,
        }
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "initialized",
            "config_groups": config_groups, "ignore": ignore}


@torch.no_grad()
def save_compressed(model, qweights: dict, directory: Path, tokenizer=None) -> list[str]:
    """Write `model` (whose planned linears already hold the dequantized weights) with the codes and
    scales of `qweights` {full module name: QuantizedWeight} as compressed-tensors pack-quantized."""
    ModelCompressor, QuantizationConfig, apply_quantization_config = _library()
    if not qweights:
        raise LayerscopeError("the plan quantizes no layer: nothing to save in compressed-tensors form")
    m = copy.deepcopy(model)
    comp = _compressed_in_place(m, qweights, ModelCompressor, QuantizationConfig, apply_quantization_config)
    directory.mkdir(parents=True, exist_ok=True)
    m.save_pretrained(str(directory))
    comp.update_config(str(directory))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))
    return sorted(p.name for p in directory.iterdir())


def _library():
    try:
        from compressed_tensors.compressors import ModelCompressor
        from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
    except ImportError:
        raise LayerscopeError("saving a compressed-tensors model needs the compressed-tensors package "
                              "(pip install compressed-tensors)") from None
    return ModelCompressor, QuantizationConfig, apply_quantization_config


def _compressed_in_place(m, qweights: dict, ModelCompressor, QuantizationConfig, apply_quantization_config):
    """Attach the schemes to `m`'s planned linears (names relative to `m`), give them our codes'
    values and scales, and pack them with the library; returns its ModelCompressor."""
    modules = dict(m.named_modules())
    ignore = [n for n, mod in modules.items() if isinstance(mod, torch.nn.Linear) and n not in qweights]
    qc = QuantizationConfig.model_validate(quantization_config(qweights, ignore))
    apply_quantization_config(m, qc)
    for name, qw in qweights.items():
        mod = modules[name]
        if tuple(mod.weight.shape) != tuple(qw.weight.shape):
            raise LayerscopeError(f"{name}: quantized weight shape {tuple(qw.weight.shape)} does not match the layer")
        mod.weight.data = qw.weight.to(mod.weight.dtype)
        mod.weight_scale.data = qw.scale.to(mod.weight_scale.dtype).reshape(mod.weight_scale.shape)
    comp = ModelCompressor.from_pretrained_model(m, quantization_format="pack-quantized")
    comp.compress_model(m)
    return comp


@torch.no_grad()
def compress_block(block: torch.nn.Module, qweights: dict, prefix: str) -> dict[str, torch.Tensor]:
    """One block's tensors as `save_compressed` writes them ({prefix + name: tensor}; `qweights` keyed
    by names inside the block) -- the out-of-core model is written one block at a time."""
    lib = _library()
    # A copy of the module tree that shares the tensors (one block's weights are never held twice) and
    # carries no hooks: an out-of-core block's hooks hold the streamer, and through it the whole model.
    memo: dict[int, object] = {id(t): t for t in [*block.parameters(), *block.buffers()]}
    for m in block.modules():
        for hooks in (m._forward_pre_hooks, m._forward_hooks, m._forward_pre_hooks_with_kwargs,
                      m._forward_hooks_with_kwargs):
            memo[id(hooks)] = type(hooks)()
    b = copy.deepcopy(block, memo=memo)
    if qweights:
        _compressed_in_place(b, qweights, *lib)
    return {prefix + k: v for k, v in b.state_dict().items()}


def write_config(skeleton: torch.nn.Module, qweights: dict, directory: Path) -> None:
    """`quantization_config` in directory/config.json exactly as `save_compressed` writes it, built
    on an empty (meta) copy of the model: the schemes need only the module tree."""
    ModelCompressor, QuantizationConfig, apply_quantization_config = _library()
    from compressed_tensors.quantization import QuantizationStatus

    modules = dict(skeleton.named_modules())
    ignore = [n for n, mod in modules.items() if isinstance(mod, torch.nn.Linear) and n not in qweights]
    apply_quantization_config(skeleton, QuantizationConfig.model_validate(quantization_config(qweights, ignore)))
    comp = ModelCompressor.from_pretrained_model(skeleton, quantization_format="pack-quantized")
    comp.quantization_config.quantization_status = QuantizationStatus.COMPRESSED  # what compress_model records
    comp.update_config(str(directory))


def packed_weight(file: Path, name: str, bits: int, group_size: int) -> torch.Tensor:
    """The dequantized weight of linear `name` read back from a pack-quantized shard (float32), with
    the library's own decompression."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from safetensors import safe_open

    with safe_open(str(file), framework="pt", device="cpu") as f:
        state = {k: f.get_tensor(f"{name}.{k}") for k in ("weight_packed", "weight_scale", "weight_shape")}
    scheme = QuantizationScheme.model_validate(
        {"targets": [name], "weights": {"num_bits": bits, "type": "int", "symmetric": True, "strategy": "group",
                                        "group_size": group_size, "dynamic": False}})
    return PackedQuantizationCompressor.decompress(state, scheme)["weight"].float()


@torch.no_grad()
def validate_reload(directory: Path, model, input_ids: torch.Tensor) -> float:
    """Load `directory` with plain transformers; largest |logit difference| against `model` on `input_ids`."""
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(str(directory), dtype=next(model.parameters()).dtype).eval()
    a = loaded(input_ids=input_ids, use_cache=False).logits.float()
    b = model(input_ids=input_ids, use_cache=False).logits.float()
    if a.shape != b.shape:
        raise LayerscopeError(f"the reloaded model's logits have shape {tuple(a.shape)}, expected {tuple(b.shape)}")
    return float((a - b).abs().max())
