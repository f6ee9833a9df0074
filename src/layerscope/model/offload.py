"""Out-of-core and device-streamed execution: only the running block's weights are materialised.

Two situations need the same machinery:

* **Out-of-core** (weights larger than the memory available): the model skeleton is built on the
  meta device (`accelerate.init_empty_weights`); the embeddings, final norm and head are loaded
  into RAM, and each block's tensors are read from the safetensors shards (`safetensors.safe_open`,
  memory-mapped) when the block runs and dropped (back to meta) when the next block runs -- the
  sequential onloading of llm-compressor.
* **GPU path** (`--device cuda`): the weights stay in CPU RAM (or on disk, when out-of-core too)
  and only the running block -- and the output head while scoring -- is copied to the GPU.
  Activations stay on the CPU between blocks when the calibration set does not fit on the GPU.

A `BlockStreamer` is attached to the model (`streamer_of(model)`); forward pre-hooks on every block
and on the head make it transparent: any code that runs the model block by block (`BlockRunner`) or
as a whole (`model(**inputs)`, perplexity) gets the right weights in the right place. Removing
blocks (`engine.removal`) keeps working because slots follow the block modules, not their indices.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from layerscope.errors import LayerscopeError
from layerscope.model.memory import activation_device, available_memory, choose_offload, weights_bytes  # noqa: F401

STREAMER_ATTR = "_layerscope_streamer"


# ------------------------------------------------------------------------------ tensors and slots
@dataclass
class _Tensor:
    """One parameter/buffer of a slot and where its values come from (a shard, or a CPU tensor)."""

    module: nn.Module
    name: str
    is_param: bool
    file: str | None = None
    key: str | None = None
    cpu: torch.Tensor | None = None
    shape: tuple = ()
    dtype: torch.dtype | None = None
    path: str = ""  # the tensor's name inside its block (e.g. "mlp.down_proj.weight")
    loader: Any = None  # while set (`BlockStreamer.substituted`): value = loader(source value)


@dataclass
class _Slot:
    label: str
    tensors: list[_Tensor] = field(default_factory=list)
    resident: bool = False


def _set(t: _Tensor, value: torch.Tensor) -> None:
    if t.is_param:
        t.module._parameters[t.name] = value if isinstance(value, nn.Parameter) else nn.Parameter(value, requires_grad=False)
    else:
        t.module._buffers[t.name] = value


class BlockStreamer:
    """Keeps at most one block (plus the head while scoring) materialised on the compute device.

    device: where blocks compute ("cpu", "cuda", ... or "meta" in placement tests); act_device:
    where block outputs are kept between blocks (the compute device, or "cpu" when they do not fit).
    """

    def __init__(self, model: nn.Module, parts: Any, device: str | torch.device, dtype: torch.dtype,
                 act_device: str | torch.device | None = None, note: str = ""):
        self.model, self.parts = model, parts
        self.device, self.dtype = torch.device(device), dtype
        self.act_device = torch.device(act_device) if act_device is not None else self.device
        self.note = note
        self.slots: dict[int, _Slot] = {}
        self.head_slot: _Slot | None = None
        self.loads = 0  # how many times a slot was materialised (tests and benches read it)
        self.log: list[tuple[str, str]] = []  # (event, slot label), in order
        self._paused = 0
        self._handles: list[Any] = []

    # ----------------------------------------------------------------- building
    def add_block(self, module: nn.Module, label: str, sources: dict[str, tuple[str, str]] | None = None) -> None:
        """Register a block; `sources` maps tensor names inside it to (shard file, key) -- else the
        block's current CPU tensors are the source (GPU path with the weights in RAM)."""
        self.slots[id(module)] = self._slot(module, label, sources)
        self._handles.append(module.register_forward_pre_hook(self._block_hook(module), with_kwargs=True))
        self._handles.append(module.register_forward_hook(self._to_act))

    def add_head(self, modules: list[nn.Module]) -> None:
        """The final norm and output head: copied to the compute device when first used for scoring."""
        slot = _Slot("head")
        for m in modules:
            slot.tensors += self._slot(m, "head", None).tensors
        self.head_slot = slot
        for m in modules:
            self._handles.append(m.register_forward_pre_hook(self._head_hook, with_kwargs=True))

    def _slot(self, module: nn.Module, label: str, sources: dict[str, tuple[str, str]] | None) -> _Slot:
        slot = _Slot(label)
        for kind, named in (("p", module.named_parameters()), ("b", module.named_buffers())):
            for name, value in named:
                owner_name, _, leaf = name.rpartition(".")
                owner = module.get_submodule(owner_name) if owner_name else module
                src = sources.get(name) if sources else None
                if sources is not None and src is None and value.device.type == "meta":
                    raise LayerscopeError(f"{label}: no tensor for '{name}' in the checkpoint")
                slot.tensors.append(_Tensor(owner, leaf, kind == "p", file=src[0] if src else None,
                                            key=src[1] if src else None, cpu=None if src else value,
                                            shape=tuple(value.shape), dtype=value.dtype, path=name))
        return slot

    # ----------------------------------------------------------------- residency
    def _materialise(self, slot: _Slot) -> None:
        by_file: dict[str, list[_Tensor]] = {}
        for t in slot.tensors:
            if t.file is not None:
                by_file.setdefault(t.file, []).append(t)
            else:
                _set(t, self._value(t, t.cpu))  # type: ignore[arg-type]
        from safetensors import safe_open

        for f, ts in by_file.items():
            with safe_open(f, framework="pt", device="cpu") as fh:
                for t in ts:
                    _set(t, self._value(t, fh.get_tensor(t.key)))
        slot.resident = True
        self.loads += 1
        self.log.append(("load", slot.label))

    def _value(self, t: _Tensor, source: torch.Tensor) -> torch.Tensor:
        if t.loader is not None:
            source = t.loader(source)
        return source.to(device=self.device, dtype=t.dtype if source.is_floating_point() else source.dtype)

    def _release(self, slot: _Slot) -> None:
        for t in slot.tensors:
            _set(t, t.cpu if t.cpu is not None else torch.empty(t.shape, dtype=t.dtype, device="meta"))
        slot.resident = False
        self.log.append(("free", slot.label))

    def ensure(self, module: nn.Module | int) -> None:
        """Make this block (a module, or an index into the current block list) resident; free the others."""
        if isinstance(module, int):
            module = self.parts.blocks[module]
        slot = self.slots.get(id(module))
        if slot is None or slot.resident:
            return
        for other in self.slots.values():
            if other.resident:
                self._release(other)
        self._materialise(slot)

    def release(self) -> None:
        """Everything back to its storage (shards: meta; RAM: the CPU tensors)."""
        for slot in [*self.slots.values(), *([self.head_slot] if self.head_slot else [])]:
            if slot.resident:
                self._release(slot)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """No loading while the engine records block inputs (recorders replace the blocks' forward)."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    @contextmanager
    def substituted(self, loaders: dict[str, Any]) -> Iterator[None]:
        """While active, the block tensors named in `loaders` ({full name: callable}) take the value
        `callable(source value)` whenever their block loads -- e.g. a quantized model's dequantized
        weights, read back from the shards just written, or the source rounded to a grid."""
        prefix = self.parts.blocks_path + "."
        where = {}
        for i, block in enumerate(self.parts.blocks):
            for t in self.slots[id(block)].tensors:
                where[f"{prefix}{i}.{t.path}"] = t
        unknown = [n for n in loaders if n not in where]
        if unknown:
            raise LayerscopeError(f"no streamed block tensor named {unknown[0]}")
        self.release()  # nothing resident keeps the old values
        try:
            for n, fn in loaders.items():
                where[n].loader = fn
            yield
        finally:
            for n in loaders:
                where[n].loader = None
            self.release()

    def resident_labels(self) -> list[str]:
        return [s.label for s in [*self.slots.values(), *([self.head_slot] if self.head_slot else [])] if s.resident]

    # ----------------------------------------------------------------- hooks
    def _move(self, x: Any, device: torch.device) -> Any:
        if isinstance(x, torch.Tensor):
            return x.to(device) if x.device != device else x
        if isinstance(x, tuple):
            return tuple(self._move(v, device) for v in x)
        if isinstance(x, list):
            return [self._move(v, device) for v in x]
        if isinstance(x, dict):
            return {k: self._move(v, device) for k, v in x.items()}
        return x

    def _block_hook(self, module: nn.Module):
        def hook(mod, args, kwargs):
            if self._paused:
                return None
            self.ensure(module)
            return self._move(args, self.device), self._move(kwargs, self.device)

        return hook

    def _to_act(self, mod, args, output):
        if self._paused or self.act_device == self.device:
            return None
        return self._move(output, self.act_device)

    def plan_activations(self, need_bytes: int) -> torch.device:
        """Keep block outputs on the compute device when `need_bytes` fit there, else on the CPU."""
        self.act_device = activation_device(need_bytes, self.device)
        return self.act_device

    def _head_hook(self, mod, args, kwargs):
        if self._paused and not (self.head_slot is not None and self.head_slot.resident):
            return None  # the base model's final norm while block inputs are recorded: stays where it is
        if self.head_slot is not None and not self.head_slot.resident:
            self._materialise(self.head_slot)
        return self._move(args, self.device), self._move(kwargs, self.device)

    def _outputs_back(self, mod, args, kwargs, output):
        x = kwargs.get("input_ids", args[0] if args else None)
        if self._paused or not isinstance(x, torch.Tensor) or x.device == self.device:
            return None
        if hasattr(output, "keys"):  # a ModelOutput: keep its class
            for k in list(output.keys()):
                output[k] = self._move(output[k], x.device)
            return output
        return self._move(output, x.device)

    def detach(self) -> None:
        """Remove the hooks (the model stays as it is)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()


def streamer_of(model: nn.Module | None) -> BlockStreamer | None:
    return getattr(model, STREAMER_ATTR, None) if model is not None else None


def from_disk(model: nn.Module | None) -> bool:
    """True when the model's blocks live in safetensors shards (out-of-core), not in memory."""
    s = streamer_of(model)
    return s is not None and any(t.file is not None for slot in s.slots.values() for t in slot.tensors)


def unstream(model: nn.Module) -> str | None:
    """GPU path only: move the whole in-RAM model to its device instead (for metrics that need every
    block's weights at once, e.g. gradients). Returns a note, or None when nothing changed."""
    s = streamer_of(model)
    if s is None or from_disk(model):
        return None
    s.release()
    s.detach()
    setattr(model, STREAMER_ATTR, None)
    model.to(s.device)
    return f"the whole model on {s.device} (gradient metrics need every block at once)"


def make_resident(model: nn.Module, i: int) -> None:
    """Load block i now (before reading or temporarily editing its weights); no-op for a model in RAM."""
    s = streamer_of(model)
    if s is not None:
        s.ensure(i)


@contextmanager
def block_resident(model: nn.Module, i: int) -> Iterator[None]:
    """Block i's weights readable (weight statistics) -- a no-op for a model held in RAM."""
    make_resident(model, i)
    yield


# ------------------------------------------------------------------------------ building models
def attach(model: nn.Module, device: str | torch.device, act_device: str | torch.device | None = None,
           note: str = "") -> BlockStreamer:
    """GPU path for a model held in RAM: blocks (and the head) visit `device` one at a time."""
    from layerscope.model.adapter import find_parts

    parts = find_parts(model)
    dtype = next(model.parameters()).dtype
    s = BlockStreamer(model, parts, device, dtype, act_device, note=note)
    for i, b in enumerate(parts.blocks):
        s.add_block(b, f"block {i}")
    _add_head(s, parts)
    setattr(model, STREAMER_ATTR, s)
    return s


def _add_head(s: BlockStreamer, parts: Any) -> None:
    if s.device.type != "cpu":
        mods = [m for m in (parts.final_norm, parts.head) if m is not None]
        if mods:
            s.add_head(mods)
        # a whole-model call (perplexity, generation) returns its outputs where its inputs were
        s._handles.append(parts.model.register_forward_hook(s._outputs_back, with_kwargs=True))


def _shard_keys(files: list[Path]) -> dict[str, str]:
    from safetensors import safe_open

    where: dict[str, str] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():
                where[k] = str(f)
    return where


def _checkpoint_key(name: str, where: dict[str, str], prefix: str) -> str | None:
    for cand in (name, f"{prefix}.{name}" if prefix else None,
                 name[len(prefix) + 1:] if prefix and name.startswith(prefix + ".") else None):
        if cand and cand in where:
            return cand
    return None


def load_streamed(cls: type, config: Any, files: list[Path], *, dtype: torch.dtype, device: str = "cpu",
                  attn_implementation: str = "sdpa", trust_remote_code: bool = False, note: str = "") -> nn.Module:
    """Build `cls` from `config` on the meta device, load everything but the blocks into RAM and
    attach a BlockStreamer that reads each block from the shards when it runs."""
    from accelerate import init_empty_weights

    from layerscope.model.adapter import find_parts

    with init_empty_weights():
        try:
            model = cls.from_config(config, attn_implementation=attn_implementation, dtype=dtype,
                                    trust_remote_code=trust_remote_code)
        except ValueError as exc:
            if "attn" not in str(exc):
                raise
            model = cls.from_config(config, attn_implementation="eager", dtype=dtype,
                                    trust_remote_code=trust_remote_code)
    model.eval()
    parts = find_parts(model)
    where = _shard_keys(files)
    prefix = getattr(model, "base_model_prefix", "") or ""
    block_ids = {id(b): i for i, b in enumerate(parts.blocks)}
    state = model.state_dict(keep_vars=True)
    missing: list[str] = []
    per_block: dict[int, dict[str, tuple[str, str]]] = {i: {} for i in range(parts.num_layers)}
    from safetensors import safe_open

    handles: dict[str, Any] = {}
    try:
        for name, value in state.items():
            key = _checkpoint_key(name, where, prefix)
            owner_path = f"{parts.blocks_path}."
            if name.startswith(owner_path):
                idx_s, _, inner = name[len(owner_path):].partition(".")
                if key is None:
                    missing.append(name)
                else:
                    per_block[int(idx_s)][inner] = (where[key], key)
                continue
            if key is None:
                continue  # checked below: tied weights are allowed to be absent
            f = where[key]
            if f not in handles:
                handles[f] = safe_open(f, framework="pt", device="cpu")
            v = handles[f].get_tensor(key)
            if v.is_floating_point():
                v = v.to(dtype)
            owner_name, _, leaf = name.rpartition(".")
            owner = model.get_submodule(owner_name) if owner_name else model
            if leaf in owner._parameters:
                owner._parameters[leaf] = nn.Parameter(v, requires_grad=False)
            else:
                owner._buffers[leaf] = v
    finally:
        handles.clear()
    if getattr(config, "tie_word_embeddings", False) or getattr(getattr(config, "text_config", None),
                                                                 "tie_word_embeddings", False):
        model.tie_weights()
    for name, p in [*model.named_parameters(), *model.named_buffers()]:
        if p.device.type == "meta" and not name.startswith(f"{parts.blocks_path}."):
            missing.append(name)
    if missing:
        shown = ", ".join(missing[:5]) + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
        raise LayerscopeError(f"the checkpoint lacks {len(missing)} tensor(s) the model needs: {shown}")
    s = BlockStreamer(model, parts, device, dtype, note=note)
    for i, b in enumerate(parts.blocks):
        s.add_block(b, f"block {i}", per_block[i])
    _add_head(s, parts)
    setattr(model, STREAMER_ATTR, s)
    return model


def offload_env_default() -> bool | None:
    """LAYERSCOPE_OFFLOAD=1 forces out-of-core, =0 forbids it; unset = automatic."""
    v = os.environ.get("LAYERSCOPE_OFFLOAD", "").strip().lower()
    return True if v in ("1", "true", "yes") else False if v in ("0", "false", "no") else None
