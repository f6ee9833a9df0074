"""Write an out-of-core model shard by shard: each block is read, (edited,) written and freed in turn."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from torch import nn

from layerscope.model.offload import from_disk, streamer_of


def streams_from_disk(model: nn.Module) -> bool:
    """True when the model's blocks live in safetensors shards (out-of-core), not in memory."""
    return from_disk(model)


def save_streamed(model: nn.Module, dest: Path, edit: Callable[[int, nn.Module], None] | None = None) -> int:
    """Write `model` (config, generation config, weights) into `dest` as one safetensors shard per
    block plus one for the rest, with the standard `model.safetensors.index.json`. `edit(j, block)`
    may change block j while it is loaded (e.g. zero a projection); the source shards never change.
    Returns the number of bytes written. Tied tensors are written once, as `save_pretrained` does."""
    from safetensors.torch import save_file

    from layerscope.model.adapter import find_parts

    s = streamer_of(model)
    parts = find_parts(model)
    prefix = parts.blocks_path + "."
    n_shards = parts.num_layers + 1
    name = "model-{:05d}-of-{:05d}.safetensors".format
    index: dict[str, str] = {}
    total = 0

    def put(k: int, tensors: dict) -> None:
        nonlocal total
        fname = name(k + 1, n_shards)
        save_file({n: t.detach().contiguous() for n, t in tensors.items()}, str(dest / fname), metadata={"format": "pt"})
        for n, t in tensors.items():
            index[n] = fname
            total += t.numel() * t.element_size()

    rest, seen = {}, set()
    for n, t in model.state_dict().items():
        if n.startswith(prefix):
            continue
        ptr = (t.data_ptr(), t.dtype, tuple(t.shape))
        if ptr not in seen:  # tied weights (embeddings = head) once
            seen.add(ptr)
            rest[n] = t
    put(0, rest)
    for j, block in enumerate(parts.blocks):
        if s is not None:
            s.ensure(block)
        if edit is not None:
            edit(j, block)
        put(j + 1, {f"{prefix}{j}.{k}": v for k, v in block.state_dict().items()})
    if s is not None:
        s.release()  # edits made to loaded blocks are dropped with them
    model.config.save_pretrained(str(dest))
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(str(dest))
    (dest / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": index}, indent=2), encoding="utf-8")
    return total
