"""Fine-tune the layers that matter: LISA (uniform or importance-weighted), IST, static freezing and
layer-selected LoRA, as `transformers.Trainer` callbacks and as the `finetune` action.

Layout: `layers` (switching blocks on/off, trimming optimizer state, measuring it), `lisa`, `ist` (callbacks),
`lora` (PEFT configs), `meter` (costs measured while training), `run` (the action), `result` (FinetuneResult).
"""
from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    import importlib

    where = {"LisaCallback": "lisa", "IstCallback": "ist", "LayerGate": "layers", "optimizer_state_bytes": "layers",
             "freeze_blocks": "layers", "lora_config": "lora", "finetune": "run", "train": "run",
             "FinetuneResult": "result", "CostMeter": "meter"}
    if name in where:
        return getattr(importlib.import_module(f"{__name__}.{where[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
