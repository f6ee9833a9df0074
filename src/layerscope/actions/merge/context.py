"""Everything a layer scheme needs: the loaded base, the task vectors, the parameter groups, task data."""
from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from layerscope.actions.merge.groups import ParamInfo, check_coefficients, param_infos
from layerscope.errors import LayerscopeError
from layerscope.plans.merge import MergePlan


@dataclass
class MergeContext:
    plan: MergePlan
    model: nn.Module  # the base model (its parameters are replaced by the merge)
    tokenizer: Any
    base: dict[str, torch.Tensor]
    deltas: list[dict[str, torch.Tensor]]
    infos: dict[str, ParamInfo]
    num_layers: int
    base_info: dict[str, Any]
    sources: list[dict[str, Any]]
    progress_cb: Callable[[int, str], None] | None = None
    score_sources: list[str] = field(default_factory=list)

    def lambdas(self) -> list[float]:
        lams = self.plan.lambdas or [1.0] * len(self.deltas)
        if len(lams) != len(self.deltas):
            raise LayerscopeError(f"{len(lams)} lambdas for {len(self.deltas)} fine-tuned models")
        return [float(x) for x in lams]

    def generator(self, name: str) -> torch.Generator:
        """A drop-mask generator per tensor, seeded from the plan's seed and the tensor's name (order-free)."""
        h = int(hashlib.sha256(f"{self.plan.seed}:{name}".encode()).hexdigest()[:15], 16)
        return torch.Generator().manual_seed(h)

    def progress(self, total: int, what: str) -> Callable[[int, str], None]:
        def bar(step: int, msg: str) -> None:
            if self.progress_cb is not None:
                self.progress_cb(step, msg)
            else:
                print(f"\r{what}: step {step}/{total} {msg}", end="\n" if step >= total else "", file=sys.stderr,
                      flush=True)
        return bar

    # ---------------------------------------------------------------- task data
    def _texts(self, t: int) -> list[str]:
        from layerscope.data.sources import load_texts

        src = self.plan.models[t]
        if not src.data:
            raise LayerscopeError(f"{self.plan.layers} needs each fine-tuned model's task data: give --data for "
                                  f"model {t} ({src.model})")
        if self.plan.lambda_grid:  # a λ grid measures on held-out documents: the schemes never read them
            from layerscope.actions.merge.grid import task_texts

            return task_texts(src.data, "calibration")
        return load_texts(src.data, split="calibration")

    def entropy_batches(self) -> tuple[list[dict], list[dict]]:
        """Unlabelled inputs of every task, as (training, held-out) batches; held-out = every 4th batch."""
        from layerscope.data.windows import tokenize_windows

        plan, tok = self.plan, self.tokenizer
        train, held = [], []
        for t, src in enumerate(plan.models):
            texts = self._texts(t)
            if src.entropy == "all":
                ids = tokenize_windows(tok, texts, plan.tokens, plan.seq_len)
                batches = [{"input_ids": ids[s:s + plan.batch], "attention_mask": torch.ones_like(ids[s:s + plan.batch])}
                           for s in range(0, len(ids), plan.batch)]
            else:
                n = max(2, plan.tokens // 32)
                batches = [_prompt_batch(tok, texts[s:s + plan.batch], plan.seq_len)
                           for s in range(0, min(n, len(texts)), plan.batch)]
            if len(batches) < 2:
                raise LayerscopeError(f"model {t}: too little task data for AdaMerging (need two batches; raise tokens)")
            h = set(range(3, len(batches), 4)) or {len(batches) - 1}
            held += [b for i, b in enumerate(batches) if i in h]
            train += [b for i, b in enumerate(batches) if i not in h]
        return train, held

    def score_tables(self) -> list:
        from layerscope.metrics.table import ScoreTable
        from layerscope.model.loading import load_model
        from layerscope.plans.prune import metric_for_column

        tables = []
        for t, src in enumerate(self.plan.models):
            if src.scores:
                tables.append(ScoreTable.from_json(src.scores))
                self.score_sources.append(src.scores)
                continue
            from layerscope.metrics.scan import scan

            metric = metric_for_column(self.plan.by)
            if metric is None:
                raise LayerscopeError(f"no metric produces the column '{self.plan.by}'")
            ft = load_model(src.model, tokenizer=False).model
            tables.append(scan(ft, self._texts(t), [metric], tokenizer=self.tokenizer, tokens=self.plan.tokens,
                               seq_len=self.plan.seq_len, seed=self.plan.seed))
            self.score_sources.append(f"scanned {src.model} on {src.data} ({metric}, {self.plan.tokens} tokens)")
            del ft
        return tables

    # ---------------------------------------------------------------- resolve
    def resolve(self) -> MergePlan:
        """The plan with its coefficients (computed by the layer scheme unless the plan already has them)."""
        from layerscope.actions.merge.layers import scheme

        if self.plan.coefficients is None:
            coefs, details = scheme(self.plan.layers)(self)
            self.plan = self.plan.model_copy(update={"coefficients": coefs, "details": details})
        check_coefficients(self.plan.coefficients, len(self.deltas), self.num_layers)
        return self.plan


def _prompt_batch(tok, texts: list[str], max_len: int) -> dict:
    enc = [tok(x, add_special_tokens=False)["input_ids"][-max_len:] or [tok.eos_token_id] for x in texts]
    width = max(len(e) for e in enc)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    ids = torch.full((len(enc), width), pad, dtype=torch.long)
    mask = torch.zeros((len(enc), width), dtype=torch.long)
    for i, e in enumerate(enc):
        ids[i, :len(e)] = torch.tensor(e)
        mask[i, :len(e)] = 1
    return {"input_ids": ids, "attention_mask": mask, "last": torch.tensor([len(e) - 1 for e in enc])}


def load_context(plan: MergePlan, *, trust_remote_code: bool = False, progress=None) -> MergeContext:
    """Load the base (fp32) and every fine-tuned model's parameters; refuse models that do not match."""
    from layerscope.model.loading import load_model

    base = load_model(plan.base, trust_remote_code=trust_remote_code, dtype=torch.float32)
    infos = param_infos(base.model)
    base_params = {k: p.detach().clone() for k, p in base.model.named_parameters()}
    from layerscope.model.adapter import find_parts

    L = find_parts(base.model).num_layers
    deltas, sources = [], []
    for src in plan.models:
        ft = load_model(src.model, trust_remote_code=trust_remote_code, dtype=torch.float32, tokenizer=False)
        params = dict(ft.model.named_parameters())
        missing = [k for k in base_params if k not in params]
        if missing:
            raise LayerscopeError(f"{src.model} is not a fine-tune of {plan.base}: it has no parameter {missing[0]}")
        bad = [k for k in base_params if params[k].shape != base_params[k].shape]
        if bad:
            raise LayerscopeError(f"{src.model} does not match {plan.base}: {bad[0]} has shape "
                                  f"{tuple(params[bad[0]].shape)}, not {tuple(base_params[bad[0]].shape)}")
        deltas.append({k: params[k].detach().float() - base_params[k] for k in base_params})
        sources.append({"model_id": ft.model_id, "path": str(ft.path) if ft.path else None,
                        "weights_sha256": ft.weights_sha256})
        del ft, params
    info = {"model_id": base.model_id, "path": str(base.path) if base.path else None,
            "weights_sha256": base.weights_sha256, "num_layers": L}
    return MergeContext(plan=plan, model=base.model, tokenizer=base.tokenizer, base=base_params, deltas=deltas,
                        infos=infos, num_layers=L, base_info=info, sources=sources, progress_cb=progress)
