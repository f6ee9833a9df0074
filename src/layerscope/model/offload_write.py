"""Write an out-of-core model shard by shard: each block is read, (edited,) written and freed in turn."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from layerscope.model.offload import from_disk, streamer_of


def streams_from_disk(model: nn.Module) -> bool:
    """True when the model's blocks live in safetensors shards (out-of-core), not in memory."""
    return from_disk(model)


class ShardWriter:
    """One safetensors shard per block plus one for everything else, and the standard
    `model.safetensors.index.json` -- written as the blocks come, so only one block is ever held."""

    def __init__(self, dest: Path, num_blocks: int):
        self.dest, self.n_shards = Path(dest), num_blocks + 1
        self.dest.mkdir(parents=True, exist_ok=True)
        self.index: dict[str, str] = {}
        self.total = 0

    def put(self, k: int, tensors: dict[str, torch.Tensor]) -> None:
        """Shard k (0: the non-block tensors, j + 1: block j)."""
        from safetensors.torch import save_file

        fname = f"model-{k + 1:05d}-of-{self.n_shards:05d}.safetensors"
        save_file({n: t.detach().contiguous() for n, t in tensors.items()}, str(self.dest / fname),
                  metadata={"format": "pt"})
        for n, t in tensors.items():
            self.index[n] = fname
            self.total += t.numel() * t.element_size()

    def put_rest(self, model: nn.Module, blocks_prefix: str) -> None:
        """Everything outside the blocks; tied tensors (embeddings = head) once, as `save_pretrained` does."""
        rest, seen = {}, set()
        for n, t in model.state_dict().items():
            if n.startswith(blocks_prefix):
                continue
            ptr = (t.data_ptr(), t.dtype, tuple(t.shape))
            if ptr not in seen:
                seen.add(ptr)
                rest[n] = t
        self.put(0, rest)

    def file_of(self, name: str) -> Path:
        return self.dest / self.index[name]

    def finish(self, model: nn.Module) -> int:
        """config.json, generation config and the index; returns the bytes of tensors written."""
        model.config.save_pretrained(str(self.dest))
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(str(self.dest))
        (self.dest / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": self.total}, "weight_map": self.index}, indent=2), encoding="utf-8")
        return self.total


def save_streamed(model: nn.Module, dest: Path, edit: Callable[[int, nn.Module], None] | None = None) -> int:
    """Write `model` (config, generation config, weights) into `dest` as one safetensors shard per
    block plus one for the rest, with the standard `model.safetensors.index.json`. `edit(j, block)`
    may change block j while it is loaded (e.g. zero a projection); the source shards never change.
    Returns the number of bytes written. Tied tensors are written once, as `save_pretrained` does."""
    from layerscope.model.adapter import find_parts

    s = streamer_of(model)
    parts = find_parts(model)
    prefix = parts.blocks_path + "."
    w = ShardWriter(dest, parts.num_layers)
    w.put_rest(model, prefix)
    for j, block in enumerate(parts.blocks):
        if s is not None:
            s.ensure(block)
        if edit is not None:
            edit(j, block)
        w.put(j + 1, {f"{prefix}{j}.{k}": v for k, v in block.state_dict().items()})
    if s is not None:
        s.release()  # edits made to loaded blocks are dropped with them
    return w.finish(model)
