"""mergekit recipes of what layerscope did (block removal: a passthrough merge of the kept slices)."""
from __future__ import annotations

import json
from typing import Sequence


def mergekit_yaml(source: str, keep: Sequence[int], dtype: str, removed: Sequence[int]) -> str:
    """A mergekit passthrough recipe that rebuilds the block-pruned model from the source."""
    ranges: list[list[int]] = []
    for i in keep:
        if ranges and ranges[-1][1] == i:
            ranges[-1][1] = i + 1
        else:
            ranges.append([i, i + 1])
    src = json.dumps(str(source))
    lines = [f"# layerscope: source model without blocks {', '.join(map(str, removed))}",
             "# layer_range is [start, end) as in mergekit", "slices:"]
    for a, b in ranges:
        lines += ["  - sources:", f"      - model: {src}", f"        layer_range: [{a}, {b}]"]
    lines += ["merge_method: passthrough", f"dtype: {dtype}", ""]
    return "\n".join(lines)
