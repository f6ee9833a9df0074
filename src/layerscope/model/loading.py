"""Load a model by local path, hub id or alias, refusing anything that would need unpickling."""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from layerscope.errors import LayerscopeError
from layerscope.model.checks import check_loading_info

ALIASES = {"default": "smollm2", "smollm2": "smollm2", "minilm": "minilm", "gemma3": "gemma3"}
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object | None
    model_id: str
    path: Path | None  # local directory, if any (never written to)
    weights_sha256: str | None
    warnings: list[str] = field(default_factory=list)  # e.g. tensors loaded with --allow-missing


def resolve(spec: str | os.PathLike | None) -> tuple[str, Path | None]:
    """Return (model id, local directory or None for a hub id)."""
    from layerscope.data import assets

    if spec is None or str(spec) in ALIASES:
        name = ALIASES[str(spec) if spec is not None else "default"]
        return name, assets.asset_dir(name)
    s = str(spec)
    p = Path(s).expanduser()
    if not p.exists():
        if _HUB_ID.match(s) and not s.startswith((".", "/", "~")):
            return s, None
        raise LayerscopeError(f"model path does not exist: {p}")
    if p.is_file():
        raise LayerscopeError(f"model path must be a directory with config.json and *.safetensors, got a file: {p}")
    return s, p.resolve()


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def check_local_dir(path: Path) -> list[Path]:
    """Validate a local model directory; return its safetensors files."""
    if not (path / "config.json").is_file():
        raise LayerscopeError(f"no config.json in {path}: not a Hugging Face model directory")
    try:
        json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LayerscopeError(f"{path / 'config.json'} is not valid JSON ({exc})") from None
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickles = [f.name for f in path.glob("*.bin")] + [f.name for f in path.glob("*.pt")]
        if pickles:
            raise LayerscopeError(
                f"{path} has only pickle weights ({', '.join(pickles)}); layerscope loads safetensors only "
                "(convert with `model.save_pretrained(dir, safe_serialization=True)`)"
            )
        raise LayerscopeError(f"{path} has a config but no weights (*.safetensors)")
    from safetensors import SafetensorError, safe_open

    for f in files:
        try:
            size = f.stat().st_size
            with safe_open(str(f), framework="pt") as fh:
                keys = list(fh.keys())
            header_len = int.from_bytes(f.open("rb").read(8), "little")
            end = 0
            with f.open("rb") as fh:
                fh.seek(8)
                header = json.loads(fh.read(header_len))
            for k, meta in header.items():
                if k != "__metadata__":
                    end = max(end, meta["data_offsets"][1])
            if 8 + header_len + end > size:
                raise ValueError(f"file is {size} bytes, header needs {8 + header_len + end}")
            if not keys:
                raise ValueError("no tensors")
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as exc:
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise LayerscopeError(f"corrupt or truncated safetensors file {f}: {msg}") from None
    return files


def weights_hash(files: list[Path]) -> str:
    """sha256 over the weight files, cached by (path, size, mtime)."""
    from layerscope.paths import cache_root

    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    key = h.hexdigest()
    cache = cache_root() / "hashes" / f"{key}.txt"
    if cache.is_file():
        return cache.read_text().strip()
    digest = hashlib.sha256()
    for f in files:
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                digest.update(chunk)
    value = digest.hexdigest()
    try:
        from layerscope.outputs import write_text_atomic

        write_text_atomic(cache, value)
    except OSError:
        pass
    return value


def _auto_class(config) -> type:
    import transformers

    archs = getattr(config, "architectures", None) or []
    if any(a.endswith(_CAUSAL_SUFFIXES) for a in archs):
        return transformers.AutoModelForCausalLM
    if not archs and getattr(config, "model_type", "") in transformers.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return transformers.AutoModelForCausalLM
    return transformers.AutoModel


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """'float32' | 'bfloat16' | 'float16' (or a torch dtype, or None = the default float32)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype) not in DTYPES:
        raise LayerscopeError(f"unknown dtype '{dtype}' (use one of: {', '.join(DTYPES)})")
    return DTYPES[str(dtype)]


def resolve_device(device: str | None) -> str:
    """'cpu', 'cuda', 'cuda:N' or 'auto' (a GPU when torch sees one, else the CPU), checked."""
    d = (device or "cpu").strip().lower()
    if d == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if d == "cpu":
        return d
    if d == "cuda" or (d.startswith("cuda:") and d[5:].isdigit()):
        if not torch.cuda.is_available():
            raise LayerscopeError(f"--device {device}: torch sees no CUDA GPU on this machine (use cpu or auto)")
        if ":" in d and int(d[5:]) >= torch.cuda.device_count():
            raise LayerscopeError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) visible")
        return d
    raise LayerscopeError(f"unknown device '{device}' (use cpu, cuda, cuda:N or auto)")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model", "vocab.json",
                   "vocab.txt", "merges.txt")


def load_tokenizer(source: str, path: Path | None, trust_remote_code: bool = False) -> Any:
    """The model's tokenizer; None only when a local directory has no tokenizer files at all
    (vision models). A tokenizer that is there but does not load is an error that says why."""
    import transformers

    if path is not None and not any((path / f).exists() for f in TOKENIZER_FILES):
        return None
    try:
        return transformers.AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise LayerscopeError(f"the tokenizer of {source} does not load: {first}") from None


def load_model(
    spec: str | os.PathLike | None = None,
    *,
    trust_remote_code: bool = False,
    dtype: torch.dtype | str | None = None,
    attn_implementation: str = "sdpa",
    device: str | None = None,
    tokenizer: bool = True,
    allow_missing: bool | None = None,
    offload: bool | None = None,
) -> LoadedModel:
    """Load a model (and tokenizer) from a local directory, a hub id, or an alias (smollm2, gemma3, minilm).

    offload: True streams every block from the safetensors shards when it runs (out-of-core), None
    chooses that when the weights do not fit the available memory (`model.offload`). A GPU
    `device` holds only the running block (and the head while scoring)."""
    import transformers

    model_id, path = resolve(spec)
    files = check_local_dir(path) if path is not None else []
    source = str(path) if path is not None else model_id
    try:
        config = transformers.AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        first = str(exc).splitlines()[0]
        if "trust_remote_code" in first:
            raise LayerscopeError(
                f"{model_id} needs custom code from its repository; pass --trust-remote-code if you trust it"
            ) from None
        raise LayerscopeError(f"unsupported architecture in {model_id}: {first}") from None
    except OSError as exc:
        raise LayerscopeError(f"could not load '{model_id}' (offline or not found): {str(exc).splitlines()[0]}") from None
    cls = _auto_class(config)
    dtype = resolve_dtype(dtype)
    kwargs = dict(config=config, dtype=dtype or torch.float32, trust_remote_code=trust_remote_code, use_safetensors=True,
                  output_loading_info=True)
    from layerscope.model import offload as off

    dev = resolve_device(device) if device else None
    force = offload if offload is not None else off.offload_env_default()
    streamed, why = off.choose_offload(files, dtype or torch.float32, force) if files else (False, "")
    if streamed:
        model = off.load_streamed(cls, config, files, dtype=dtype or torch.float32, device=dev or "cpu",
                                  attn_implementation=attn_implementation, trust_remote_code=trust_remote_code,
                                  note=why)
        tok = load_tokenizer(source, path, trust_remote_code=trust_remote_code) if tokenizer else None
        return LoadedModel(model=model, tokenizer=tok, model_id=model_id, path=path, weights_sha256=weights_hash(files))
    if offload and not files:
        raise LayerscopeError(f"--offload needs a local model directory with safetensors shards ({model_id})")
    try:
        try:
            model, info = cls.from_pretrained(source, attn_implementation=attn_implementation, **kwargs)
        except ValueError as exc:
            if "attention implementation" not in str(exc) and "attn_implementation" not in str(exc):
                raise
            model, info = cls.from_pretrained(source, attn_implementation="eager", **kwargs)  # no SDPA kernel for it
    except ValueError as exc:
        raise LayerscopeError(f"unsupported architecture in {model_id}: {str(exc).splitlines()[0]}") from None
    except OSError as exc:
        raise LayerscopeError(f"could not load weights of '{model_id}': {str(exc).splitlines()[0]}") from None
    except RuntimeError as exc:  # tensors whose shapes do not fit the config: name them (model/checks.py)
        if "mismatched_sizes" not in str(exc):
            raise
        model, info = cls.from_pretrained(source, attn_implementation="eager", ignore_mismatched_sizes=True, **kwargs)
    load_warnings = check_loading_info(info, model_id, allow_missing)
    model.eval()
    if dev and dev != "cpu":
        off.attach(model, dev, note=f"{dev}: one block at a time ({why})")
    tok = None
    if tokenizer:
        tok = load_tokenizer(source, path, trust_remote_code=trust_remote_code)
    return LoadedModel(model=model, tokenizer=tok, model_id=model_id, path=path,
                       weights_sha256=weights_hash(files) if files else None, warnings=load_warnings)


def _local_config(path: Path | None) -> dict | None:
    """config.json of a local model directory as a dict (None if absent or unreadable)."""
    if path is None:
        return None
    try:
        cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return cfg if isinstance(cfg, dict) else None


def source_dtype(path: Path | None) -> torch.dtype | None:
    """The dtype a local model directory stores (config 'dtype'/'torch_dtype'), else None."""
    cfg = _local_config(path)
    if cfg is None:
        return None
    name = cfg.get("dtype") or cfg.get("torch_dtype") or (cfg.get("text_config") or {}).get("dtype")
    dt = getattr(torch, str(name), None) if name else None
    return dt if isinstance(dt, torch.dtype) else None


def config_layers(path: Path | None) -> int | None:
    """Number of blocks a local model directory's config declares (None if it cannot tell)."""
    cfg = _local_config(path)
    if cfg is None:
        return None
    for c in (cfg, cfg.get("text_config") or {}):
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if isinstance(c.get(key), int):
                return int(c[key])
    return None
