"""`layerscope merge`: every method and layer scheme checked against an independent computation on tiny models."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.tiny_models import build, save_tiny, tiny_tokenizer

MERGEKIT_VENV = Path("/work/venv-mergekit")


def _finetune_like(path: Path, seed: int, scale: float = 0.05, only: str | None = None, tied: bool = True) -> Path:
    m = build("llama", seed=0, tie_word_embeddings=tied)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if only is None or only in name:
                p.add_(scale * torch.randn(p.shape, generator=g))
    m.save_pretrained(path, safe_serialization=True)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("merge")
    base = d / "base"
    build("llama", seed=0, tie_word_embeddings=True).save_pretrained(base, safe_serialization=True)
    tiny_tokenizer().save_pretrained(base)
    words = [" ".join(f"w{(i * 7 + j) % 120}" for j in range(40)) for i in range(40)]
    (d / "task.txt").write_text("\n\n".join(words))
    return {"base": base, "ft1": _finetune_like(d / "ft1", 1), "ft2": _finetune_like(d / "ft2", 2),
            "data": d / "task.txt", "dir": d}


def _params(path: Path) -> dict[str, torch.Tensor]:
    import transformers

    m = transformers.AutoModelForCausalLM.from_pretrained(str(path))
    return {k: v.detach() for k, v in m.state_dict().items()}


def test_task_arithmetic_uniform_equals_base_plus_weighted_task_vectors(models, tmp_path):
    import layerscope

    layerscope.merge(models["base"], [models["ft1"], models["ft2"]], out=tmp_path / "m", lambdas=[0.3, 0.7])
    b, f1, f2 = (_params(models[k]) for k in ("base", "ft1", "ft2"))
    m = _params(tmp_path / "m")
    for k in b:
        torch.testing.assert_close(m[k], b[k] + 0.3 * (f1[k] - b[k]) + 0.7 * (f2[k] - b[k]), atol=1e-6, rtol=0)
    assert torch.equal(m["lm_head.weight"], m["model.embed_tokens.weight"])  # tied embeddings stay tied


def test_ties_trims_elects_sign_and_sums_agreeing_entries_on_a_toy_tensor():
    from layerscope.actions.merge.methods import ties

    base = torch.zeros(4)
    d0, d1 = torch.tensor([1.0, -2.0, 3.0, 0.1]), torch.tensor([-3.0, 1.0, 1.5, 0.2])
    # density 1: signs of the sums are (-, -, +, +); entries agreeing with them are summed
    assert torch.equal(ties.combine(base, [d0, d1], [1.0, 1.0]), torch.tensor([-3.0, -2.0, 4.5, 0.3]))
    # density 0.5 keeps the two largest |entries|: d0 -> (0,-2,3,0), d1 -> (-3,0,1.5,0); sums (-3,-2,4.5,0)
    assert torch.equal(ties.combine(base, [d0, d1], [1.0, 1.0], density=0.5), torch.tensor([-3.0, -2.0, 4.5, 0.0]))
    # weights enter the election: 0.1·d0 + 1·d1 at index 1 is -0.2 + 1 > 0, so d1's +1 wins
    assert torch.allclose(ties.combine(base, [d0, d1], [0.1, 1.0]), torch.tensor([-3.0, 1.0, 1.8, 0.21]))


def test_dare_ties_keeps_density_share_and_l1_norm():
    from layerscope.actions.merge.methods.dare_ties import drop

    d = torch.randn(20000, generator=torch.Generator().manual_seed(0))
    out = drop(d, 0.3, torch.Generator().manual_seed(1))
    assert abs(float((out != 0).float().mean()) - 0.3) < 0.02
    assert torch.isclose(out.abs().sum(), d.abs().sum(), rtol=1e-5)


def test_lines_coefficients_rise_linearly_from_alpha_and_merge_per_block(models, tmp_path):
    import layerscope

    res = layerscope.merge(models["base"], [models["ft1"], models["ft2"]], out=tmp_path / "m", layers="lines")
    L, alpha = 4, 0.5  # task arithmetic of 2 tasks: α = 1/T; β = mean(λ) − α = 0.5
    expected = [alpha + 0.5 * l / (L - 1) for l in range(L)]
    for c in res.coefficients:
        assert c["mlp"] == pytest.approx(expected) and c["attention"] == pytest.approx(expected)
        assert c["embed"] == pytest.approx(alpha) and c["head"] == pytest.approx(alpha)
    b, f1, f2, m = (_params(p) for p in (models["base"], models["ft1"], models["ft2"], tmp_path / "m"))
    for k in b:
        layer = int(k.split(".")[2]) if k.startswith("model.layers.") else None
        c = alpha if layer is None else expected[layer]
        torch.testing.assert_close(m[k], b[k] + c * (f1[k] - b[k] + f2[k] - b[k]), atol=1e-6, rtol=0)
    rec = yaml.safe_load((tmp_path / "m" / "mergekit.yaml").read_text())
    assert rec["models"][0]["parameters"]["weight"] == pytest.approx([expected[0], expected[-1]])  # a 2-point gradient


def test_importance_from_task_vectors_puts_the_coefficient_where_the_task_changed_the_model(models, tmp_path):
    import layerscope

    only = _finetune_like(tmp_path / "ft-mlp2", 3, only="layers.2.mlp.")
    plan = layerscope.plan_merge(models["base"], [only, models["ft2"]], layers="importance", lambdas=[0.5, 1.0])
    c = plan.coefficients[0]
    # all of task 0's change is in block 2's MLP: relative importance L there (capped at 2), 0 elsewhere
    assert c["mlp"] == pytest.approx([0.0, 0.0, 1.0, 0.0])
    assert c["attention"] == pytest.approx([0.5] * 4)  # no change at all: the importance is flat (mean 1)
    assert c["embed"] == 0.5 and c["head"] == 0.5


def test_importance_from_score_tables_follows_the_ranking(models, tmp_path):
    import layerscope
    from layerscope.metrics.scan import scan

    table = scan(str(models["ft1"]), str(models["data"]), ["block_influence"], tokens=256, seq_len=32)
    table.to_json(tmp_path / "s.json")
    plan = layerscope.plan_merge(models["base"], [{"model": str(models["ft1"]), "scores": str(tmp_path / "s.json")},
                                                  {"model": str(models["ft2"]), "scores": str(tmp_path / "s.json")}],
                                 layers="importance", importance="scores", by="block_influence")
    order = table.ranking("block_influence")  # least important first
    expected = [0.0] * 4
    for rank, layer in enumerate(order):
        expected[layer] = 2.0 * rank / 3
    assert plan.coefficients[0]["block"] == pytest.approx(expected)


def test_adamerging_learns_coefficients_that_lower_heldout_entropy(models, tmp_path):
    import layerscope

    src = [{"model": str(models[k]), "data": str(models["data"])} for k in ("ft1", "ft2")]
    res = layerscope.merge(models["base"], src, out=tmp_path / "m", layers="adamerging", steps=4, lr=0.05,
                           tokens=256, seq_len=32, batch=2, lambdas=[0.5, 0.5], progress=lambda s, m: None)
    d = res.record["plan"]["details"]
    assert d["best_heldout_entropy"] <= d["history"][0]["heldout_entropy"]
    assert 1 <= d["steps_run"] <= 4
    c = res.coefficients
    b, f1, f2, m = (_params(p) for p in (models["base"], models["ft1"], models["ft2"], tmp_path / "m"))
    k = "model.layers.1.mlp.up_proj.weight"
    torch.testing.assert_close(m[k], b[k] + c[0]["mlp"][1] * (f1[k] - b[k]) + c[1]["mlp"][1] * (f2[k] - b[k]),
                               atol=1e-6, rtol=0)


def test_cli_dry_run_plan_roundtrip_and_one_line_errors(models, tmp_path):
    from typer.testing import CliRunner

    from layerscope.cli.app import app

    r = CliRunner().invoke(app, ["merge", str(models["base"]), str(models["ft1"]), str(models["ft2"]),
                                 "--method", "ties", "--layers", "lines", "--dry-run"])
    assert r.exit_code == 0, r.output
    plan = yaml.safe_load(r.output)
    assert plan["plan"] == "merge" and len(plan["coefficients"]) == 2
    (tmp_path / "p.yaml").write_text(r.output)
    r2 = CliRunner().invoke(app, ["merge", "--plan", str(tmp_path / "p.yaml"), "--out", str(tmp_path / "m")])
    assert r2.exit_code == 0, r2.output
    rec = json.loads((tmp_path / "m" / "merge.json").read_text())
    assert rec["kind"] == "layerscope.merge" and rec["mergekit"]["exact"] is True
    from layerscope import load_result

    assert "ties" in load_result(tmp_path / "m" / "merge.json").summary()
    assert "merge-coefficients" in (tmp_path / "m" / "report.html").read_text()
    res = subprocess.run([sys.executable, "-m", "layerscope", "merge", str(models["base"]), "--out",
                          str(tmp_path / "x")], capture_output=True, text=True)
    assert res.returncode != 0 and res.stderr.count("\n") == 1 and "fine-tuned" in res.stderr


@pytest.mark.slow
@pytest.mark.skipif(not (MERGEKIT_VENV / "bin" / "mergekit-yaml").exists(),
                    reason="mergekit is not installed in /work/venv-mergekit (its own venv; see bench/merge.py)")
@pytest.mark.parametrize("method,layers", [("ties", "importance")])
def test_mergekit_rebuilds_the_same_weights_from_the_exported_recipe(models, tmp_path, method, layers):
    import layerscope
    from safetensors.torch import load_file

    untied = {k: _finetune_like(tmp_path / k, s, scale=0.05 if s else 0.0, tied=False)
              for k, s in (("b", 0), ("f1", 1), ("f2", 2))}
    res = layerscope.merge(untied["b"], [untied["f1"], untied["f2"]], out=tmp_path / "m", method=method,
                           layers=layers, lambdas=[0.6, 0.9])
    assert res.record["mergekit"]["exact"]
    run = subprocess.run([str(MERGEKIT_VENV / "bin" / "mergekit-yaml"), str(tmp_path / "m" / "mergekit.yaml"),
                          str(tmp_path / "mk"), "--no-lazy-unpickle", "--safe-serialization", "--no-copy-tokenizer"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    ours, theirs = load_file(str(tmp_path / "m" / "model.safetensors")), {}
    for f in (tmp_path / "mk").glob("*.safetensors"):
        theirs.update(load_file(str(f)))
    assert set(ours) == set(theirs)
    assert max(float((ours[k] - theirs[k]).abs().max()) for k in ours) <= 1e-6


def _hand_nll(model_dir: Path, text_file: Path, tokens: int, seq_len: int) -> float:
    """Mean next-token NLL of a saved model on a task file's held-out documents (every 5th), by hand:
    EOS after each document, the first `tokens` tokens, disjoint windows whose first token is context only."""
    import transformers

    tok = tiny_tokenizer()
    docs = [d.strip() for d in text_file.read_text().split("\n\n") if d.strip()]
    ids: list[int] = []
    for d in docs[4::5]:
        ids += tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = torch.tensor(ids[:tokens])
    model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for b in range(0, len(ids) - 1, seq_len):
            x = ids[b:b + seq_len]
            logits = model(input_ids=x[None]).logits[0, :-1].double()
            total += float(torch.nn.functional.cross_entropy(logits, x[1:], reduction="sum"))
            count += len(x) - 1
    return total / count


def test_lambda_grid_records_every_point_and_writes_the_least_mean_heldout_nll(models, tmp_path):
    import math

    import layerscope
    from layerscope.errors import LayerscopeError

    other = tmp_path / "task2.txt"
    other.write_text("\n\n".join(" ".join(f"w{(i * 3 + j * j) % 90}" for j in range(40)) for i in range(30)))
    src = [{"model": str(models["ft1"]), "data": str(models["data"])}, {"model": str(models["ft2"]), "data": str(other)}]
    grid, lams, kw = [0.5, 1.0, 2.0, 4.0], [0.6, 1.0], dict(tokens=256, seq_len=32, batch=2)
    res = layerscope.merge(models["base"], src, out=tmp_path / "g", lambdas=lams, lambda_grid=grid, **kw)
    rec = json.loads((tmp_path / "g" / "merge.json").read_text())["lambda_grid"]
    assert [p["lambda"] for p in rec["points"]] == grid and rec["lambdas"] == lams
    means = [p["mean_nll"] for p in rec["points"]]
    assert len(set(means)) == len(grid)  # the scale changes the merged model's held-out NLL
    best = rec["points"][means.index(min(means))]
    assert rec["chosen"] == best["lambda"] and res.record["plan"]["lambdas"] == best["lambdas"]
    assert res.record["plan"].get("lambda_grid") is None
    for p in rec["points"]:
        assert p["mean_nll"] == pytest.approx(sum(t["nll"] for t in p["tasks"]) / 2, rel=1e-12)
    # independently: merge with λ scaled by the chosen value, then each task's held-out NLL by hand
    direct = tmp_path / "direct"
    layerscope.merge(models["base"], src, out=direct, lambdas=[rec["chosen"] * x for x in lams], **kw)
    g, d = _params(tmp_path / "g"), _params(direct)
    assert all(torch.equal(g[k], d[k]) for k in d)
    for task, text in zip(best["tasks"], (models["data"], other)):
        assert task["nll"] == pytest.approx(_hand_nll(direct, text, 256, 32), rel=1e-5)
        assert task["perplexity"] == pytest.approx(math.exp(task["nll"]), rel=1e-12)
    for bad in ([0.5, 0.0], [-1.0], []):
        with pytest.raises(LayerscopeError, match="grid"):
            layerscope.merge(models["base"], src, out=tmp_path / "bad", lambda_grid=bad)


def test_cli_lambda_grid_rejects_bad_values_in_one_line(models, tmp_path):
    from typer.testing import CliRunner

    from layerscope.cli.app import app
    from layerscope.errors import LayerscopeError

    head = ["merge", str(models["base"]), str(models["ft1"]), "--data", str(models["data"]), "--out", str(tmp_path / "m")]
    for bad, says in (("0.5,0", "> 0"), ("0.5,x", "must be a number"), ("-1", "> 0")):
        r = CliRunner().invoke(app, [*head, "--lambda-grid", bad])
        assert r.exit_code != 0 and isinstance(r.exception, LayerscopeError), r.output
        assert says in str(r.exception) and "\n" not in str(r.exception)
    assert not (tmp_path / "m").exists()


def test_lambda_grid_holds_out_every_fifth_document_and_breaks_ties_toward_the_smaller_lambda(tmp_path):
    from layerscope.actions.merge.grid import choose, task_texts
    from layerscope.errors import LayerscopeError

    f = tmp_path / "t.txt"
    f.write_text("\n\n".join(f"w{i} w{i + 1}" for i in range(12)))
    held, seen = task_texts(str(f), "evaluation"), task_texts(str(f), "calibration")
    assert held == ["w4 w5", "w9 w10"] and len(seen) == 10 and not set(held) & set(seen)
    f.write_text("w1 w2")
    with pytest.raises(LayerscopeError, match="at least two documents"):
        task_texts(str(f), "evaluation")
    pts = [{"lambda": 1.0, "mean_nll": 2.0}, {"lambda": 0.5, "mean_nll": 2.0}, {"lambda": 0.3, "mean_nll": 2.5}]
    assert choose(pts)["lambda"] == 0.5
