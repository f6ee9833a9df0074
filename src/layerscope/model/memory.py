"""How much memory there is, how much the weights need, and where the weights and activations go."""
from __future__ import annotations

import json
from pathlib import Path

import torch

# Out-of-core is chosen when the weights (at the compute dtype) need more than this share of the
# memory available: activations, the reference distributions and the allocator need the rest.
RAM_SHARE = 0.6


def cgroup_memory_left() -> int | None:
    """Bytes this process may still allocate under its memory cgroup (v1 or v2), None if unlimited."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "" and Path("/sys/fs/cgroup/memory.max").exists():  # v2 unified hierarchy
            base = Path("/sys/fs/cgroup") / path.lstrip("/")
            limit_f, usage_f = base / "memory.max", base / "memory.current"
        elif "memory" in controllers.split(","):
            base = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
            limit_f, usage_f = base / "memory.limit_in_bytes", base / "memory.usage_in_bytes"
        else:
            continue
        try:
            limit_s = limit_f.read_text().strip()
            if limit_s == "max" or int(limit_s) >= 1 << 60:
                return None
            cache = 0
            stat = base / "memory.stat"
            if stat.exists():  # page cache is reclaimable: do not count it as used
                for row in stat.read_text().splitlines():
                    k, _, v = row.partition(" ")
                    if k in ("total_inactive_file", "inactive_file"):
                        cache = int(v)
                        break
            return max(0, int(limit_s) - int(usage_f.read_text()) + cache)
        except (OSError, ValueError):
            return None
    return None


def available_memory() -> int:
    """Memory this process can use now: psutil's available memory, capped by a cgroup limit."""
    import psutil

    avail = int(psutil.virtual_memory().available)
    left = cgroup_memory_left()
    return min(avail, left) if left is not None else avail


def weights_bytes(files: list[Path], dtype: torch.dtype | None = None) -> int:
    """Bytes the weights take in memory at `dtype` (the files' own dtypes when None), from the headers."""
    total = 0
    for f in files:
        with f.open("rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        for k, meta in header.items():
            if k == "__metadata__":
                continue
            a, b = meta["data_offsets"]
            if dtype is None:
                total += b - a
            else:
                numel = 1
                for s in meta["shape"]:
                    numel *= int(s)
                total += numel * torch.empty((), dtype=dtype).element_size()
    return total


def choose_offload(files: list[Path], dtype: torch.dtype, force: bool | None) -> tuple[bool, str]:
    """(out-of-core?, why) -- forced by `force`, else automatic from the weights' size vs available memory."""
    need = weights_bytes(files, dtype)
    avail = available_memory()
    gib = 1 << 30
    what = f"weights {need / gib:.2f} GiB at {str(dtype).replace('torch.', '')}, available memory {avail / gib:.2f} GiB"
    if force:
        return True, f"out-of-core (--offload): {what}"
    if force is None and need > RAM_SHARE * avail:
        return True, f"out-of-core (automatic: {what})"
    return False, f"in RAM ({what})"


def activation_device(need_bytes: int, device: torch.device, free_bytes: int | None = None,
                      share: float = 0.5) -> torch.device:
    """Where the calibration activations live: on `device` when they fit in `share` of its free
    memory, else on the CPU (each block's inputs then travel to the device when it runs)."""
    if device.type in ("cpu", "meta"):
        return device
    if free_bytes is None:
        free_bytes = int(torch.cuda.mem_get_info(device)[0]) if device.type == "cuda" else 0
    return device if need_bytes <= share * free_bytes else torch.device("cpu")
