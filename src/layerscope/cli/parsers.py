"""Options shared by every verb that loads a model, and the small helpers the commands share."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

ModelArg = Annotated[Optional[str], typer.Argument(
    help="Local model directory, hub id, or 'smollm2'/'gemma3'/'minilm'. Default: embedded SmolLM2-135M-Instruct.")]
Device = Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N or auto (a GPU when one is visible).")]
Dtype = Annotated[Optional[str], typer.Option("--dtype", help="float32 (default), bfloat16 or float16.")]
TrustRemoteCode = Annotated[bool, typer.Option("--trust-remote-code", help="Allow custom model code from the model repository.")]
Seed = Annotated[int, typer.Option("--seed", help="Seed of every random choice (sampling, bootstrap, random orders).")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or summary.")]
Force = Annotated[bool, typer.Option("--force", help="Write into a non-empty --out that layerscope did not create "
                                     "(its own earlier files are replaced; the user's files never are).")]
Options = Annotated[Optional[list[str]], typer.Option(
    "--option", help="KEY=VALUE passed to the metrics (e.g. ablation_units=block, ablation_tokens=2048, "
    "quant_bits=3); repeatable.")]
Offload = Annotated[Optional[bool], typer.Option(
    "--offload/--no-offload", help="Stream each block's weights from the safetensors shards when it runs (out-of-core). "
    "Default: automatic, when the weights do not fit in the available memory.")]
RayAddress = Annotated[Optional[str], typer.Option(
    "--ray", metavar="[ADDRESS]",
    help="Fan independent work out as Ray tasks: a local cluster (--ray) or ray.init(address=ADDRESS) "
    "(--ray=ADDRESS). Needs Ray (the 'ray' extra of layerscope).")]
OPTIONAL_VALUES = {"--ray": "local"}  # options whose value may be left out (`--ray` = `--ray=local`)


def with_optional_values(argv: list[str]) -> list[str]:
    """Give a bare `--ray` (last, or followed by another option) its default value."""
    out = []
    for i, a in enumerate(argv):
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        if a in OPTIONAL_VALUES and (nxt is None or nxt.startswith("-")):
            a = f"{a}={OPTIONAL_VALUES[a]}"
        out.append(a)
    return out


PlanFile = Annotated[Optional[Path], typer.Option("--plan", help="Apply this plan file (YAML/JSON, e.g. from --dry-run) "
                                                  "instead of choosing now.")]
DryRun = Annotated[bool, typer.Option("--dry-run", help="Print the plan (YAML) that would be applied, and exit.")]


def out_option(default: str, what: str):
    return typer.Option(Path(default), "--out", "-o", help=f"Output directory ({what}); created if missing.")
