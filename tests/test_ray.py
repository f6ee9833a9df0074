"""`--ray`: ablation units and sweep points as Ray tasks give exactly the local numbers (same JSON)."""
from __future__ import annotations

import pytest
import torch

import tiny_models as tm

try:
    import ray
except ImportError:
    ray = None
needs_ray = pytest.mark.skipif(ray is None, reason="Ray is not installed (pip install 'layerscope[ray]'): "
                               "the --ray equality test cannot run here")


@pytest.fixture(scope="module")
def local_cluster():
    from layerscope.engine.ray_pool import connect

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # workers compute with the caller's thread count
    connect("local", num_cpus=2)
    yield
    ray.shutdown()
    torch.set_num_threads(before)


@needs_ray
def test_ray_ablation_and_sweep_equal_the_local_run(local_cluster, tmp_path):
    from layerscope.engine.runner import BlockRunner, make_batches
    from layerscope.evaluation import sweep as sw
    from layerscope.evaluation.perplexity import PerplexityProtocol
    from layerscope.metrics.ground_truth.ablation import leave_one_out
    from layerscope.metrics.ground_truth.ablation_parallel import leave_one_out_ray
    from layerscope.model.adapter import find_parts

    model = tm.build("llama")
    batches, _ = make_batches(tm.sample_inputs("llama", n=4, seq=24), 2)
    runner = BlockRunner(find_parts(model), batches)
    runner.capture()
    local = leave_one_out(runner, ("block", "attention"))
    remote = leave_one_out_ray(runner, ("block", "attention"), "local")
    local.wall_time_s = remote.wall_time_s = 0.0
    assert remote == local  # every sum bit-identical, evaluation counts too

    text = tmp_path / "t.txt"
    text.write_text(tm.tiny_text())
    kw = dict(unit="block", ks=[0, 1, 2], orders=sw.parse_orders("random:2,greedy"), seed=0,
              protocol=PerplexityProtocol(context_length=32, stride=32, max_tokens=512, batch_size=4),
              ids=torch.randint(3, tm.V, (2000,), generator=torch.Generator().manual_seed(1)),
              greedy_data=str(text), greedy_tokens=256)
    a = sw.run_sweep(model, tm.tiny_tokenizer(), **kw)
    b = sw.run_sweep(model, tm.tiny_tokenizer(), **kw, ray="local")
    for d in (a, b):
        d.pop("wall_time_s"), d.pop("created")
    assert a == b and a["random"]["perplexity"][0][2] != a["baseline"]


def test_ray_flag_without_ray_says_how_to_install(monkeypatch):
    import builtins

    from layerscope.engine import ray_pool
    from layerscope.errors import LayerscopeError

    real = builtins.__import__
    monkeypatch.setattr(builtins, "__import__",
                        lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name)) if name == "ray" else real(name, *a, **k))
    with pytest.raises(LayerscopeError, match=r"pip install 'layerscope\[ray\]'"):
        ray_pool.require_ray()


def test_bare_ray_flag_means_a_local_cluster_and_an_address_is_kept():
    from layerscope.cli.parsers import with_optional_values

    assert with_optional_values(["sweep", "m", "--ray"]) == ["sweep", "m", "--ray=local"]
    assert with_optional_values(["sweep", "m", "--ray", "--remove", "0..2"]) == ["sweep", "m", "--ray=local", "--remove", "0..2"]
    assert with_optional_values(["sweep", "m", "--ray", "ray://head:10001"]) == ["sweep", "m", "--ray", "ray://head:10001"]


@needs_ray
def test_ray_quantize_search_trials_and_evaluations_equal_the_local_run(local_cluster, tmp_path):
    """`quantize --ray`: the search's plan measurements and the held-out evaluations run as Ray tasks
    and give the local run's plan, trials, perplexities and saved model byte for byte."""
    from test_gptq import save_wordy_llama  # a tiny Llama whose tokenizer reads the calibration text

    from layerscope.actions.quantize import quantize

    model_dir = save_wordy_llama(tmp_path / "model")
    kw = dict(budget="4.5", bits="2,4,8", group="32,64", method="gptq", tokens=2048, eval_tokens=512,
              search_tokens=1024)
    for search in (True, False):  # the search's trials; without it the exact and the uniform plan are both evaluated
        out = tmp_path / f"search{int(search)}"
        a = quantize(str(model_dir), out=out / "local", search=search, **kw).to_dict()
        b = quantize(str(model_dir), out=out / "ray", search=search, ray="local", **kw).to_dict()
        for d in (a, b):
            d.pop("out"), d["plan"]["provenance"].pop("created")
        assert a == b
        trials = a["plan"]["provenance"]["search"]
        if search:  # distinct plans, distinct measured losses
            assert len(trials) > 1 and len({t["measured"] for t in trials}) == len(trials)
        else:
            assert trials is None and len({r["perplexity"] for r in a["evaluations"]}) == len(a["evaluations"]) == 3
        files = sorted(p.name for p in (out / "local" / "model").glob("*.safetensors"))
        assert files and all((out / "local" / "model" / f).read_bytes() == (out / "ray" / "model" / f).read_bytes()
                             for f in files)


@needs_ray
def test_ray_probe_layers_equal_the_local_run(local_cluster):
    """`probe --ray`: every (concept, pooling, layer) fit as a Ray task gives the local run's JSON, and the
    probe finds the planted concept (so equal results are not trivially equal)."""
    import json

    from test_probe_lens_steer import _subject, separable

    from layerscope import probe

    tok, llama = _probe_tok_and_model()
    kw = dict(n=96, Cs=(0.1, 1.0), poolings=("mean", "last"), seed=0, control=True)
    local = json.loads(probe(_subject(llama, tok), separable(96), **kw).to_json())
    remote = json.loads(probe(_subject(llama, tok), separable(96), ray="local", **kw).to_json())
    for d in (local, remote):
        d.pop("timings_s", None), d.pop("created", None)
    assert local == remote
    mean = local["concepts"]["label"]["poolings"]["mean"]
    assert max(mean["accuracy"]) >= 0.8 and max(mean["accuracy"]) > max(mean["control"]) + 0.2


def _probe_tok_and_model():
    """A word-level tokenizer over tests/test_probe_lens_steer.py's words and a tiny Llama (as its fixtures)."""
    from test_probe_lens_steer import WORDS
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[BOS]", "[EOS]", *WORDS])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]",
                                  bos_token="[BOS]")

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    return tok, LlamaForCausalLM(cfg).eval()


def _local_equals_ray(verb, src, tmp_path, subdirs: tuple[str, ...], **kw) -> dict:
    """Run `verb` locally and with `ray="local"`: the same result (but the out path and creation stamp) and
    the same saved safetensors in each of `subdirs`, byte for byte. Returns the local result."""
    a = verb(src, out=tmp_path / "local", **kw).to_dict()
    b = verb(src, out=tmp_path / "ray", ray="local", **kw).to_dict()
    for d in (a, b):
        d.pop("out", None), d["plan"]["provenance"].pop("created", None)
    assert a == b
    for sub in subdirs:
        files = sorted(p.name for p in (tmp_path / "local" / sub).glob("*.safetensors"))
        assert files and all((tmp_path / "local" / sub / f).read_bytes() == (tmp_path / "ray" / sub / f).read_bytes()
                             for f in files)
    return a


@needs_ray
def test_ray_sparsify_plan_evaluations_equal_the_local_run(local_cluster, tmp_path):
    """`sparsify --ray`: the exact allocation's loss curves, the plan and the uniform plan pruned side by side
    and every perplexity run as Ray tasks give the local run's result and saved weights byte for byte."""
    from layerscope.actions.sparsify import sparsify

    a = _local_equals_ray(sparsify, tm.save_tiny("llama", tmp_path / "model"), tmp_path, ("model",), sparsity=0.5,
                          method="sparsegpt", allocation="exact", exact_loss="output_kl", tokens=256, seq_len=64,
                          eval_tokens=512, select_tokens=256)
    ppl = [e["perplexity"] for e in a["evaluations"]]
    assert len(ppl) >= 2 and len(set(ppl)) == len(ppl)  # the dense and the sparse model differ


@needs_ray
def test_ray_lowrank_plan_evaluations_equal_the_local_run(local_cluster, tmp_path):
    """`lowrank --ray`: the exact allocation's loss curves, the plan and the uniform plan factorized side by side
    and every perplexity run as Ray tasks give the local run's result and saved tensors byte for byte."""
    from layerscope.actions.lowrank import lowrank

    a = _local_equals_ray(lowrank, tm.save_tiny("llama", tmp_path / "model"), tmp_path, ("factorized", "dense"),
                          reduction=0.3, method="whitened", allocation="exact", exact_loss="fisher", tokens=256,
                          seq_len=64, eval_tokens=512, select_tokens=256)
    ppl = [e["perplexity"] for e in a["evaluations"]]
    assert len(ppl) >= 2 and len(set(ppl)) == len(ppl)  # the dense and the factorized model differ


@pytest.mark.parametrize("verb", [["scan", "-m", "ablation"], ["sweep", "--remove", "0..1"], ["probe"],
                                  ["sparsify", "--sparsity", "0.5"], ["lowrank", "--reduction", "0.2"],
                                  ["quantize", "--budget", "4.25"]])
def test_ray_flag_without_ray_is_one_line_and_a_failure(verb, monkeypatch, capsys):
    import builtins
    import sys

    from layerscope.cli import app as cli

    real = builtins.__import__
    monkeypatch.setattr(builtins, "__import__",
                        lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name)) if name == "ray" else real(name, *a, **k))
    monkeypatch.setattr(sys, "argv", ["layerscope", verb[0], "smollm2", *verb[1:], "--ray"])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    err = capsys.readouterr().err.strip()
    assert exc.value.code not in (0, None) and len(err.splitlines()) == 1 and "layerscope[ray]" in err


def test_probe_ray_with_cka_only_is_refused_before_loading(monkeypatch, capsys):
    import sys

    from layerscope.cli import app as cli

    monkeypatch.setattr(sys, "argv", ["layerscope", "probe", "no-such-model", "--cka-only", "--ray"])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    err = capsys.readouterr().err
    assert exc.value.code not in (0, None) and "--cka-only" in err and "Traceback" not in err


def _tiny_finetunes(d, n: int = 2) -> list:
    """A tiny base and `n` fine-tunes of it (the base plus seeded noise), each a model directory."""
    paths = [tm.save_tiny("llama", d / "base")]
    for s in range(1, n + 1):
        m = tm.build("llama")
        g = torch.Generator().manual_seed(s)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        m.save_pretrained(d / f"ft{s}", safe_serialization=True)
        tm.tiny_tokenizer().save_pretrained(d / f"ft{s}")
        paths.append(d / f"ft{s}")
    return paths


@needs_ray
def test_ray_merge_lambda_grid_equals_the_local_run(local_cluster, tmp_path):
    """`merge --lambda-grid --ray`: every grid point merged and measured on held-out task text as a Ray task
    gives the local run's merge.json (every point's NLL, the choice, the plan) and weights byte for byte."""
    import json

    from layerscope.actions.merge.apply import merge

    base, *fts = _tiny_finetunes(tmp_path)
    data = tmp_path / "task.txt"
    data.write_text(tm.tiny_text(3000, seed=3))
    src = [{"model": str(f), "data": str(data)} for f in fts]
    kw = dict(method="ties", layers="lines", lambdas=[0.6, 1.0], lambda_grid=[0.5, 1.0, 2.0], tokens=256,
              seq_len=32, batch=2)
    merge(base, src, out=tmp_path / "local", **kw)
    merge(base, src, out=tmp_path / "ray", ray="local", **kw)
    a, b = (json.loads((tmp_path / d / "merge.json").read_text()) for d in ("local", "ray"))
    for d in (a, b):
        d.pop("created"), d.pop("side_files", None)
    assert a == b
    nll = [p["mean_nll"] for p in a["lambda_grid"]["points"]]
    assert len(nll) == 3 and len(set(nll)) == 3  # the grid's points differ
    files = sorted(p.name for p in (tmp_path / "local").glob("*.safetensors"))
    assert files and all((tmp_path / "local" / f).read_bytes() == (tmp_path / "ray" / f).read_bytes() for f in files)


def test_ray_merge_flag_without_ray_is_one_line_and_a_failure(monkeypatch, capsys):
    import builtins
    import sys

    from layerscope.cli import app as cli

    real = builtins.__import__
    monkeypatch.setattr(builtins, "__import__",
                        lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name)) if name == "ray" else real(name, *a, **k))
    monkeypatch.setattr(sys, "argv", ["layerscope", "merge", "base", "ft", "--lambda-grid", "0.5,1", "--out", "x",
                                      "--ray"])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    err = capsys.readouterr().err.strip()
    assert exc.value.code not in (0, None) and len(err.splitlines()) == 1 and "layerscope[ray]" in err


def test_merge_ray_without_a_lambda_grid_is_refused(monkeypatch, capsys):
    import sys

    from layerscope.cli import app as cli

    monkeypatch.setattr(sys, "argv", ["layerscope", "merge", "base", "ft", "--ray"])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    err = capsys.readouterr().err
    assert exc.value.code not in (0, None) and "--lambda-grid" in err and "Traceback" not in err
