"""`sparsify` and `lowrank` end to end on tiny models: outputs load with plain tools, plans round-trip."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
import transformers
import yaml

from layerscope.plans.sparsify import spread_levels
from tiny_models import save_tiny


def _ready(name: str) -> bool:
    from layerscope.data import assets

    return assets.is_ready(name)


requires_wikipedia = pytest.mark.skipif(not _ready("wikipedia"), reason="run `layerscope assets fetch` first")


def run_cli(args, monkeypatch, capsys):
    from layerscope.cli import app as cli

    monkeypatch.setattr(sys, "argv", ["layerscope", *map(str, args)])
    try:
        cli.main()
        code = 0
    except SystemExit as exc:
        code = exc.code
    cap = capsys.readouterr()
    return code, cap.out, cap.err


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny("llama", tmp_path_factory.mktemp("tiny") / "model")


def test_owl_levels_follow_the_papers_rescaling():
    lod = [4.0, 2.0, 3.0, 1.0]
    lam, S = 0.08, 0.7
    # OWL: (LOD - min) / (max - min) * 2λ, minus its mean, plus (1 - S) = keep ratio
    r = (np.array(lod) - 1.0) / 3.0 * 2 * lam
    keep = r - r.mean() + (1 - S)
    got = spread_levels(lod, S, lam)
    np.testing.assert_allclose(got, 1 - keep, atol=1e-12)
    assert np.mean(got) == pytest.approx(S) and got[0] < got[3]  # more outliers, fewer weights pruned


@requires_wikipedia
def test_sparsify_writes_a_plain_hf_directory_at_the_planned_sparsity(tiny_dir, tmp_path):
    from layerscope.actions.sparsify import sparsify
    from layerscope.results import load_result

    out = tmp_path / "s"
    res = sparsify(tiny_dir, out=out, sparsity=0.5, method="sparsegpt", allocation="owl", tokens=256, seq_len=64,
                   evaluate=False, check_uniform=False)
    plan = res.to_dict()["plan"]
    model = transformers.AutoModelForCausalLM.from_pretrained(out / "model")
    for i, layer in enumerate(model.model.layers):
        for name, m in layer.named_modules():
            if isinstance(m, torch.nn.Linear):
                zeros = float((m.weight == 0).float().mean())
                assert zeros == pytest.approx(plan["levels"][i], abs=0.02), (i, name)
    recipe = yaml.safe_load((out / "llmcompressor_recipe.yaml").read_text())
    mod = recipe["sparsity_stage"]["sparsity_modifiers"]["SparseGPTModifier"]
    assert mod["sparsity"] == pytest.approx(plan["levels"], abs=1e-6) and mod["sequential_targets"] == ["LlamaDecoderLayer"]
    assert "sparse" in load_result(out / "sparsify.json").summary()
    assert (out / "report.html").read_text().count("Sparsity per block") >= 1


@requires_wikipedia
def test_cli_sparsify_dry_run_plan_applies_as_written(tiny_dir, tmp_path, monkeypatch, capsys):
    code, out, err = run_cli(["sparsify", tiny_dir, "--sparsity", "0.6", "--method", "wanda", "--allocation", "exact",
                              "--tokens", "256", "--seq-len", "64", "--dry-run", "--quiet"], monkeypatch, capsys)
    assert code == 0, err
    plan = yaml.safe_load(out)
    assert plan["plan"] == "sparsify" and len(plan["levels"]) == 4 and plan["predicted_loss"] is not None
    assert plan["exact_loss"] == "output_kl" and plan["loss_model"].startswith("KL(dense")
    assert plan["achieved_sparsity"] >= 0.6 - 1e-9
    plan["levels"] = [0.3, 0.3, 0.9, 0.9]
    f = tmp_path / "plan.yaml"
    f.write_text(yaml.safe_dump(plan))
    code, out, err = run_cli(["sparsify", tiny_dir, "--plan", f, "--out", tmp_path / "o", "--no-eval",
                              "--no-check-uniform", "--quiet"], monkeypatch, capsys)
    assert code == 0, err
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "o" / "model")
    assert float((model.model.layers[3].mlp.down_proj.weight == 0).float().mean()) == pytest.approx(0.9, abs=0.01)
    code, out, err = run_cli(["sparsify", tiny_dir, "--sparsity", "1.5", "--dry-run"], monkeypatch, capsys)
    assert code != 0 and "Traceback" not in err and "sparsity must be in" in err


@requires_wikipedia
@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_lowrank_factorized_load_is_smaller_and_matches_the_dense_export(family, tmp_path):
    import layerscope

    d = save_tiny(family, tmp_path / "m")
    res = layerscope.lowrank(d, out=tmp_path / "o", reduction=0.3, method="whitened", allocation="uniform",
                             tokens=256, seq_len=64, evaluate=False)
    fact = layerscope.load(tmp_path / "o" / "factorized")
    dense = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "o" / "dense")
    pairs = [m for m in fact.modules() if isinstance(m, torch.nn.Sequential)]
    assert len(pairs) == 4 * 7 and all(isinstance(p[0], torch.nn.Linear) for p in pairs)
    n_fact = sum(p.numel() for p in fact.parameters())
    assert n_fact == res.to_dict()["params"]["factorized"] < sum(p.numel() for p in dense.parameters())
    x = torch.randint(3, 120, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(fact(x).logits, dense(x).logits, rtol=1e-4, atol=1e-4)


@requires_wikipedia
@pytest.mark.parametrize("loss", ["fisher", "relative"])
def test_cli_lowrank_exact_plan_records_its_loss_and_meets_the_budget(loss, tiny_dir, monkeypatch, capsys):
    code, out, err = run_cli(["lowrank", tiny_dir, "--reduction", "0.3", "--allocation", "exact", "--exact-loss", loss,
                              "--tokens", "256", "--seq-len", "64", "--dry-run", "--quiet"], monkeypatch, capsys)
    assert code == 0, err
    plan = yaml.safe_load(out)
    assert plan["exact_loss"] == loss and plan["predicted_loss"] > 0
    assert plan["loss_model"].startswith("predicted ΔNLL" if loss == "fisher" else "relative layer-output")
    assert plan["achieved_reduction"] >= 0.3 - 0.01
    for verb, amount in (("lowrank", ["--reduction", "0.3"]), ("sparsify", ["--sparsity", "0.5"])):
        code, out, err = run_cli([verb, tiny_dir, *amount, "--allocation", "uniform", "--exact-loss", "nope",
                                  "--dry-run"], monkeypatch, capsys)
        assert code != 0 and "Traceback" not in err and "--exact-loss must be one of" in err
