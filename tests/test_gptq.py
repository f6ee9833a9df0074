"""GPTQ (own implementation) against an unblocked OBQ reference; measured allocation; compressed-tensors
export reloaded by plain transformers; quantize checkpoint and --resume."""
from __future__ import annotations

import math

import pytest
import torch

from layerscope.compress import gptq as G


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _layer(out=24, inn=64, tokens=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, inn, generator=g, dtype=torch.float64)
    mix = torch.randn(inn, inn, generator=g, dtype=torch.float64) / inn ** 0.5 + torch.eye(inn, dtype=torch.float64)
    X = torch.randn(tokens, inn, generator=g, dtype=torch.float64) @ mix  # correlated inputs
    X[:, 3] = 0.0  # a dead input column
    H = 2 * X.T @ X / tokens
    H += 0.01 * torch.diagonal(H).mean() * torch.eye(inn, dtype=torch.float64)
    return W, X, H


def obq_reference(W, H, bits, group, order=None, static_scale=None):
    """Straightforward OBQ/GPTQ: quantize one column at a time in `order`, spread the error with the
    explicit inverse Hessian of the remaining columns, then drop the column from the inverse."""
    W, H = W.clone(), H.clone()
    n = W.shape[1]
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    order = list(range(n)) if order is None else list(order)
    Hinv = torch.linalg.inv(H[order][:, order])
    Wp = W[:, order]
    Q = torch.zeros_like(Wp)
    scale = {}
    lo, hi = G.qrange(bits)
    for i in range(n):
        col = order[i]
        k = col // group
        if static_scale is not None:
            s = static_scale[:, k]
        else:
            if col % group == 0:
                scale[k] = G.group_scale(Wp[:, i:i + group], bits)
            s = scale[k]
        q = torch.clamp(torch.round(Wp[:, i] / s), lo, hi) * s
        Q[:, i] = q
        err = (Wp[:, i] - q) / Hinv[i, i]
        Wp[:, i + 1:] -= err[:, None] * Hinv[i, i + 1:][None, :]
        Hinv = Hinv - Hinv[:, i:i + 1] @ Hinv[i:i + 1, :] / Hinv[i, i]  # Hinv of the remaining columns
    out = torch.zeros_like(Q)
    out[:, order] = Q
    return out


@pytest.mark.parametrize("bits,group", [(3, 16), (4, 32), (2, 64)])
def test_gptq_blocked_cholesky_equals_unblocked_obq_reference(bits, group):
    W, _, H = _layer()
    ref = obq_reference(W, H, bits, group)
    got = G.gptq_quantize(W, H, bits, group, block_size=32, dtype=torch.float64)
    assert torch.allclose(got.weight.double(), ref, atol=1e-6)
    # codes x per-group scales reproduce the weight
    rec = got.codes.double().reshape(W.shape[0], -1, group) * got.scale.double()[..., None]
    assert torch.allclose(rec.reshape(W.shape), got.weight.double(), atol=1e-6)


def test_gptq_act_order_equals_reference_in_diag_order():
    W, _, H = _layer(seed=1)
    static = torch.stack([G.group_scale(W[:, k * 16:(k + 1) * 16], 4) for k in range(4)], 1)
    order = torch.argsort(torch.diagonal(H), descending=True).tolist()
    ref = obq_reference(W, H, 4, 16, order=order, static_scale=static)
    got = G.gptq_quantize(W, H, 4, 16, act_order=True, block_size=16, dtype=torch.float64)
    assert torch.allclose(got.weight.double(), ref, atol=1e-6)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_output_error_not_above_rtn(bits, act_order):
    W, X, H = _layer(seed=bits)
    W, X, H = W.float(), X.float(), H.float()
    gq = G.gptq_quantize(W, H, bits, 16, act_order=act_order)
    rq = G.rtn_sym(W, bits, 16)
    e_g = float(((W - gq.weight) @ X.T).norm())
    e_r = float(((W - rq.weight) @ X.T).norm())
    assert e_g < e_r


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_clipping_search_never_rounds_worse_than_min_max_and_clips_heavy_tailed_groups(bits):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(64, 32, generator=g) * torch.rand(64, 1, generator=g)
    w[:, 0] *= 6  # one outlier per row: min-max spends the grid on it
    lo, hi = G.qrange(bits)

    def err(scale):
        return ((torch.clamp(torch.round(w / scale[:, None]), lo, hi) * scale[:, None] - w) ** 2).sum(1)

    minmax = (w.abs().amax(1) / ((2 ** bits - 1) / 2)).half().float()
    chosen = G.group_scale(w, bits)
    assert torch.all(err(chosen) <= err(minmax) + 1e-7)
    assert torch.all(chosen <= minmax + 1e-7) and bool((chosen < minmax - 1e-6).any())
    assert torch.equal(chosen, chosen.half().float())  # float16-representable


def test_gptq_rejects_group_that_does_not_divide_rows():
    from layerscope.errors import LayerscopeError

    W, _, H = _layer(inn=48)
    with pytest.raises(LayerscopeError, match="not a multiple"):
        G.gptq_quantize(W, H[:48, :48], 4, 32)


# --------------------------------------------------------------------------- on a tiny model
def _tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    from layerscope.model.adapter import find_parts

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    m = LlamaForCausalLM(cfg).eval()
    return m, find_parts(m)


def _batches():
    from layerscope.engine.runner import make_batches

    g = torch.Generator().manual_seed(1)
    return make_batches(torch.randint(0, 96, (8, 32), generator=g), 4)[0]


OPTIONS = None


def _options(method="gptq"):
    from layerscope.plans.allocate import parse_options

    return parse_options([2, 4, 8], [32, 128], method)


def _inputs_and_output_grads(m, name, batches):
    """X [n, in] and G [n, out] = ∂(summed next-token NLL)/∂y of one linear, from hooks on the plain model."""
    import torch.nn.functional as F

    mod = m.get_submodule(name)
    xs, gs = [], []

    def post(_m, a, out):
        xs.append(a[0].detach().reshape(-1, a[0].shape[-1]).double())
        out.register_hook(lambda g: gs.append(g.detach().reshape(-1, g.shape[-1]).double()))

    h = mod.register_forward_hook(post)
    try:
        for b in batches:
            logits = m(**b).logits
            ids = b["input_ids"]
            F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                            reduction="sum").backward()
    finally:
        h.remove()
        m.zero_grad(set_to_none=True)
    return torch.cat(xs), torch.cat(gs)


@pytest.mark.parametrize("loss_model", ["fisher", "token_fisher"])
def test_measured_losses_match_direct_computation_and_gptq_beats_rtn_per_layer(loss_model):
    from layerscope.compress.quant_stats import measure_candidates

    m, parts = _tiny()
    batches = _batches()
    res = measure_candidates(parts, batches, _options("gptq"), loss_model=loss_model, joint_tokens=0)
    rtn = measure_candidates(parts, batches, _options("rtn"), loss_model=loss_model, joint_tokens=0)
    # independent check of one entry: hooks on the plain model give X and the output gradients G
    name = f"{parts.blocks_path}.1.mlp.down_proj"
    mod = m.get_submodule(name)
    X, Gr = _inputs_and_output_grads(m, name, batches)
    H = 2 * X.T @ X / X.shape[0]
    H += 0.01 * torch.diagonal(H).mean() * torch.eye(H.shape[0], dtype=H.dtype)
    k = res.options.index(next(o for o in res.options if o.bits == 4 and o.group_size == 32))
    qw = G.gptq_quantize(mod.weight.data, H.float(), 4, 32)
    E = (qw.weight.double() - mod.weight.data.double())
    D2 = (X @ E.T) ** 2  # [n, out]: squared output change per token and channel
    G2 = Gr ** 2
    if loss_model == "fisher":  # ½ Σ_j mean_t(g²)_j · mean_t(δ²)_j
        direct = 0.5 * float((G2.mean(0) * D2.mean(0)).sum())
    else:  # ½ Σ_t Σ_j a_t b_j δ_tj² / n with a_t = Σ_j g_tj², b_j = Σ_t g_tj² / Σ g²
        a, bj = G2.sum(1), G2.sum(0) / G2.sum()
        direct = 0.5 * float((a[:, None] * bj[None, :] * D2).sum()) / X.shape[0]
    assert res.losses[name][k] == pytest.approx(direct, rel=1e-3)
    assert res.raw == res.losses  # no joint factors without the joint measurement
    # GPTQ's loss estimate is below RTN's for every layer at 2 and 4 bits (its objective is ‖E X‖²)
    for n in res.losses:
        for c, o in enumerate(res.options):
            if o.bits in (2, 4):
                assert res.losses[n][c] < rtn.losses[n][c] * 1.05, (n, o)
    # more bits never predicts more loss
    for n, row in res.losses.items():
        by = {o: v for o, v in zip(res.options, row)}
        assert by[type(o)(8, 32, "gptq")] <= by[type(o)(4, 32, "gptq")] <= by[type(o)(2, 32, "gptq")]


@torch.no_grad()
def test_joint_measurement_equals_the_uniform_plan_run_directly_and_scales_each_options_losses():
    import torch.nn.functional as F

    from layerscope.compress.quant import fake_quant
    from layerscope.compress.quant_stats import JOINT_FLOOR, measure_candidates

    m, parts = _tiny()
    g = torch.Generator().manual_seed(0)
    for p in m.parameters():  # larger weights than the default init: quantization changes the loss measurably
        if p.dim() == 2:
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    batches = _batches()
    opts = _options("rtn")
    res = measure_candidates(parts, batches, opts, joint_tokens=64)
    joint_batches = batches[:1]  # 4 x 32 = 128 tokens >= 64: the first batch only

    def nll():
        tot = cnt = 0
        for b in joint_batches:
            lg = m(**b).logits
            tot += float(F.cross_entropy(lg[:, :-1].reshape(-1, lg.shape[-1]), b["input_ids"][:, 1:].reshape(-1),
                                         reduction="sum"))
            cnt += b["input_ids"][:, 1:].numel()
        return tot / cnt

    base = nll()
    lin = [n for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear) and ".layers." in n]
    for k, o in enumerate(opts):
        saved = {n: m.get_submodule(n).weight.data for n in lin}
        for n in lin:
            m.get_submodule(n).weight.data = fake_quant(saved[n], o)
        direct = nll() - base
        for n in lin:
            m.get_submodule(n).weight.data = saved[n]
        j = res.joint[k]
        assert j["measured"] == pytest.approx(direct, rel=1e-4, abs=1e-6), o
        assert j["predicted"] == pytest.approx(sum(r[k] for r in res.raw.values()), rel=1e-9)
        if j["measured"] >= JOINT_FLOOR and j["predicted"] >= JOINT_FLOOR:
            assert j["factor"] == pytest.approx(min(max(direct / j["predicted"], 0.1), 10.0), rel=1e-4)
        else:
            assert j["factor"] == 1.0 and j["reason"]
        for n in res.raw:
            assert res.losses[n][k] == pytest.approx(res.raw[n][k] * j["factor"], rel=1e-12)
    assert sum(j["factor"] != 1.0 for j in res.joint) >= 2  # with these weights 2- and 4-bit are above the floor


def test_exact_plan_within_budget_and_not_worse_than_uniform_on_its_loss_model():
    from layerscope.compress.quant_stats import measure_candidates
    from layerscope.plans.allocate import model_layers
    from layerscope.plans.quant_measured import exact_plan, uniform_plan

    m, parts = _tiny()
    res = measure_candidates(parts, _batches(), _options("gptq"))
    layers = model_layers(parts)
    kw = dict(fmt="hqq", num_layers=3, blocks_path=parts.blocks_path, method="gptq")
    for budget in (3.0, 4.5, 5.0):
        p = exact_plan(layers, res, budget, **kw)
        u = uniform_plan(layers, res.options, budget, losses=res, **kw)
        assert p.achieved_bpw <= budget + 1e-9 and u.achieved_bpw <= budget + 1e-9
        assert p.objective <= u.objective + 1e-12
        # group 128 on 64-wide rows is realised as group 64 (GPTQ groups run along a row)
        assert all(e.shape[1] % e.group_size == 0 for e in p.entries)


def test_compressed_tensors_model_reloads_with_transformers_and_matches(tmp_path):
    from layerscope.actions.export.compressed import save_compressed, validate_reload
    from layerscope.compress.quant_stats import apply_gptq, measure_candidates
    from layerscope.plans.allocate import model_layers
    from layerscope.plans.quant_measured import exact_plan

    m, parts = _tiny()
    res = measure_candidates(parts, _batches(), _options("gptq"))
    plan = exact_plan(model_layers(parts), res, 4.0, fmt="hqq", num_layers=3, blocks_path=parts.blocks_path,
                      method="gptq")
    assert len({(e.bits, e.group_size) for e in plan.entries}) > 1  # a real mix
    before = {n: p.clone() for n, p in m.state_dict().items()}
    qweights = apply_gptq(parts, plan.assignment(), hessians=res.hessians)
    for n, qw in qweights.items():
        assert torch.equal(m.get_submodule(n).weight.data, qw.weight)
    files = save_compressed(m, qweights, tmp_path / "model")
    assert "model.safetensors" in files and not list(tmp_path.glob("**/*.pt"))
    cfg = __import__("json").loads((tmp_path / "model" / "config.json").read_text())
    assert cfg["quantization_config"]["format"] == "pack-quantized"
    ids = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(3))
    assert validate_reload(tmp_path / "model", m, ids) < 1e-4
    # the saved model is the quantized one, not the original
    m.load_state_dict(before)
    assert validate_reload(tmp_path / "model", m, ids) > 1e-3


def test_interrupted_measurement_resumes_to_identical_numbers(tmp_path):
    from layerscope.compress.quant_stats import Checkpoint, measure_candidates

    m, parts = _tiny()
    batches, opts = _batches(), _options("gptq")
    full = measure_candidates(parts, batches, opts)

    def stop(i):
        if i == 1:
            raise KeyboardInterrupt

    ck = Checkpoint(tmp_path / "checkpoint", {"k": 1})
    with pytest.raises(KeyboardInterrupt):
        measure_candidates(parts, batches, opts, checkpoint=ck, after_block=stop)
    saved = __import__("json").loads((tmp_path / "checkpoint" / "candidate_losses.json").read_text())
    assert sorted(saved["blocks"]) == ["0", "1"]
    resumed = measure_candidates(parts, batches, opts, checkpoint=Checkpoint(tmp_path / "checkpoint", {"k": 1}),
                                 resume=True)
    assert resumed.resumed_blocks == [0, 1]
    assert resumed.losses == full.losses
    from layerscope.errors import LayerscopeError

    with pytest.raises(LayerscopeError, match="another request"):
        measure_candidates(parts, batches, opts, checkpoint=Checkpoint(tmp_path / "checkpoint", {"k": 2}), resume=True)


# --------------------------------------------------------------------------- the CLI
WORDS = ("the of and in to a is was for on as with by he at from his an were are which this also be has or "
         "had first one their its new after but who not they have her she two been other when there all during "
         "into school time may years more most only over city some world would where later up such used many").split()


def save_wordy_llama(d):
    """A tiny random Llama with a word-level tokenizer over common English words (calibration text
    from Wikipedia tokenizes into real ids), saved to `d`."""
    import transformers
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tk = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = Whitespace()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>",
                                               eos_token="</s>", pad_token="<pad>")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    m = transformers.LlamaForCausalLM(cfg).eval()
    m.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_wordy_llama(tmp_path_factory.mktemp("tiny") / "model")


def run_cli(args, capsys):
    import sys

    from layerscope.cli import app as cli

    old = sys.argv
    sys.argv = ["layerscope", *args]
    try:
        with pytest.raises(SystemExit) as exc:
            cli.main()
            raise SystemExit(0)
    finally:
        sys.argv = old
    cap = capsys.readouterr()
    return exc.value.code, cap.out, cap.err


GPTQ_ARGS = ["--budget", "4.5", "--bits", "2,4,8", "--group", "32,64", "--method", "gptq", "--tokens", "512",
             "--eval-tokens", "512", "-q"]


def test_cli_gptq_saves_compressed_tensors_model_that_transformers_loads(tiny_dir, tmp_path, capsys):
    import json

    from transformers import AutoModelForCausalLM

    out = tmp_path / "q"
    # --no-search: the unconstrained MILP plan, so both it and the uniform plan are evaluated on held-out text
    code, so, err = run_cli(["quantize", str(tiny_dir), *GPTQ_ARGS, "--out", str(out), "--export", "llm-compressor",
                             "--no-search"], capsys)
    assert code == 0, err
    res = json.loads((out / "quantize.json").read_text())
    assert res["plan"]["provenance"]["search"] is None
    rows = res["evaluations"]
    assert rows[0]["name"] == "unquantized" and {"plan (measured)", "uniform (uniform 4b/g64)"} <= {r["name"] for r in rows}
    assert all(r["predicted_dnll"] is not None and r["measured_dnll"] is not None for r in rows[1:])
    assert res["plan"]["provenance"]["shipped"] in ("exact plan", "uniform (measured better than the exact plan)")
    saved = res["exported"]["compressed-tensors model"]
    assert saved["max_abs_logit_diff"] < 1e-4
    assert json.loads((out / "model" / "config.json").read_text())["quantization_config"]["format"] == "pack-quantized"
    assert not list(out.glob("**/*.pt")) and not list(out.glob("**/*.pkl"))
    AutoModelForCausalLM.from_pretrained(out / "model")  # plain transformers loads it


def test_ctrl_c_leaves_no_output_and_cli_resume_gives_the_same_numbers(tiny_dir, tmp_path, capsys, monkeypatch):
    """Ctrl-C (KeyboardInterrupt) during the measurement: it propagates (the CLI turns it into exit 130 with
    one line, cli/app.py), nothing partial is left looking complete, the measured blocks are in the
    checkpoint; `--resume` then gives exactly the numbers of an uninterrupted run."""
    import json

    from layerscope.actions.quantize import quantize
    from layerscope.compress import quant_stats

    ref = tmp_path / "ref"
    assert run_cli(["quantize", str(tiny_dir), *GPTQ_ARGS, "--out", str(ref)], capsys)[0] == 0
    orig = quant_stats.Checkpoint.save_block

    def interrupting(self, block, losses):
        orig(self, block, losses)
        if block == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(quant_stats.Checkpoint, "save_block", interrupting)
    out = tmp_path / "q"
    with pytest.raises(KeyboardInterrupt):
        quantize(str(tiny_dir), out=out, budget="4.5", bits="2,4,8", group="32,64", method="gptq", tokens=512,
                 eval_tokens=512)
    monkeypatch.setattr(quant_stats.Checkpoint, "save_block", orig)
    assert not (out / "quantize.json").exists() and not (out / "model").exists()
    blocks = json.loads((out / "checkpoint" / "candidate_losses.json").read_text())["blocks"]
    assert sorted(blocks) == ["0", "1"]
    code, so, err = run_cli(["quantize", str(tiny_dir), *GPTQ_ARGS, "--out", str(out), "--resume"], capsys)
    assert code == 0, err
    a, b = (json.loads((d / "quantize.json").read_text()) for d in (ref, out))
    assert a["plan"]["entries"] == b["plan"]["entries"]
    assert [r["perplexity"] for r in a["evaluations"]] == [r["perplexity"] for r in b["evaluations"]]
    ca, cb = (json.loads((d / "checkpoint" / "candidate_losses.json").read_text())["blocks"] for d in (ref, out))
    assert ca == cb
    # a different request does not resume someone else's checkpoint
    code, so, err = run_cli(["quantize", str(tiny_dir), *GPTQ_ARGS[:-1], "--damp", "0.3", "-q", "--out", str(out),
                             "--resume"], capsys)
    assert code != 0 and "another request" in err
    # the joint (uniform-plan) measurement is recorded in the plan and survives the resume
    pa, pb = (json.loads((d / "quantize.json").read_text())["plan"]["provenance"] for d in (ref, out))
    assert pa["exact_loss"] == "token_fisher" and pa["joint_uniform_plans"] == pb["joint_uniform_plans"]
    assert [j["measured"] is not None for j in pa["joint_uniform_plans"]] == [True] * 6
    assert pa["search"] == pb["search"] and pa["search"][0]["changed"] == 0  # the uniform plan is the first trial
    code, so, err = run_cli(["quantize", str(tiny_dir), *GPTQ_ARGS, "--out", str(tmp_path / "x"),
                             "--exact-loss", "kfac"], capsys)
    assert code != 0 and "--exact-loss must be one of" in err and "Traceback" not in err


def test_sequential_gptq_sees_the_quantized_prefix():
    """sequential=True: block 0 gets the same Hessians (same inputs) as the one-pass statistics, later blocks
    are quantized with Hessians from the already-quantized blocks, so their weights differ."""
    from layerscope.compress.quant_stats import apply_gptq, measure_candidates
    from layerscope.compress.quant import Scheme

    m, parts = _tiny()
    batches = _batches()
    res = measure_candidates(parts, batches, _options("gptq")[:1])
    a = {n: Scheme(3, 32, "gptq") for n in res.losses}
    state = {n: p.clone() for n, p in m.state_dict().items()}
    one = {n: q.weight.clone() for n, q in apply_gptq(parts, a, hessians=res.hessians).items()}
    m.load_state_dict(state)
    seq = {n: q.weight for n, q in apply_gptq(parts, a, batches=batches, sequential=True).items()}
    for n in a:
        same = torch.allclose(one[n], seq[n], atol=1e-6)
        assert same == (".0." in n), n


@pytest.mark.slow
def test_smollm2_gptq_model_reloads_with_transformers(tmp_path, capsys):
    import json

    from layerscope.data.assets import is_ready

    if not (is_ready("smollm2") and is_ready("wikipedia")):
        pytest.skip("SmolLM2/Wikipedia assets not prepared")
    out = tmp_path / "q"
    code, so, err = run_cli(["quantize", "--budget", "4.5", "--bits", "4", "--group", "64", "--method", "gptq",
                             "--by", "uniform", "--tokens", "1024", "--eval-tokens", "1024", "--out", str(out), "-q"],
                            capsys)
    assert code == 0, err
    res = json.loads((out / "quantize.json").read_text())
    base, plan = res["evaluations"][0]["perplexity"], res["evaluations"][1]["perplexity"]
    assert math.isfinite(base) and math.isfinite(plan)  # measured and recorded; quality is bench/quant_gptq.py's matter
    assert res["exported"]["compressed-tensors model"]["max_abs_logit_diff"] < 1e-3
    cfg = json.loads((out / "model" / "config.json").read_text())["quantization_config"]
    assert cfg["format"] == "pack-quantized" and len(cfg["config_groups"]) == 1


def test_measured_search_keeps_the_plan_that_measures_best_and_records_every_trial():
    """measured_search scores the uniform plan and the trust-region plans with the given measurement and
    ships the least; a measurement that penalises every change returns the uniform plan."""
    from layerscope.compress.quant_stats import measure_candidates
    from layerscope.plans.allocate import model_layers
    from layerscope.plans.quant_measured import measured_search, uniform_plan

    m, parts = _tiny()
    res = measure_candidates(parts, _batches(), _options("rtn"), joint_tokens=0)
    layers = model_layers(parts)
    kw = dict(fmt="hqq", num_layers=3, blocks_path=parts.blocks_path, method="rtn")
    uni = uniform_plan(layers, res.options, 4.25, losses=res, **kw)
    key = lambda p: [(e.bits, e.group_size) for e in p.entries]  # noqa: E731

    def changes(p):
        return sum(a != b for a, b in zip(key(p), key(uni)))

    import numpy as np

    noise = np.array([1.0, -1.0, 0.5, -0.5])  # per-sequence deviations around the plan's loss

    def each(f):  # the search measures all its plans in one call
        return lambda plans: [f(p) for p in plans]

    # a measurement that agrees with the estimate, up to a per-sequence noise shared by every plan: the least wins
    plan, trials = measured_search(layers, res, 4.25, each(lambda p: p.objective + noise), **kw)
    assert trials[0]["changed"] == 0 and len({t["changed"] for t in trials}) == len(trials) > 2
    assert plan.objective == pytest.approx(min(t["measured"] for t in trials))
    assert all(t["changed"] <= (t["max_changes"] if t["max_changes"] is not None else 10 ** 9) for t in trials)
    assert plan.achieved_bpw <= 4.25 + 1e-9 and changes(plan) > 0
    # a measurement that penalises every change: the uniform plan
    plan, trials = measured_search(layers, res, 4.25, each(lambda p: p.objective + changes(p) + noise), **kw)
    assert key(plan) == key(uni) and "chosen by measurement" in plan.notes[-1]
    # a gain smaller than the paired noise between sequences does not replace the uniform plan
    rough = lambda p: uni.objective - 1e-3 * changes(p) + noise * (changes(p) > 0)  # noqa: E731
    plan, trials = measured_search(layers, res, 4.25, each(rough), **kw)
    assert key(plan) == key(uni) and all(t["clear_gain"] is False for t in trials[1:])


@torch.no_grad()
def test_plan_scorer_equals_the_plan_applied_to_the_model():
    import torch.nn.functional as F

    from layerscope.actions.quantize_measured import PlanScorer
    from layerscope.compress.quant import fake_quant
    from layerscope.compress.quant_stats import measure_candidates
    from layerscope.plans.allocate import model_layers
    from layerscope.plans.quant_measured import exact_plan

    m, parts = _tiny()
    batches = _batches()
    res = measure_candidates(parts, batches, _options("rtn"), joint_tokens=0)
    plan = exact_plan(model_layers(parts), res, 4.0, fmt="hqq", num_layers=3, blocks_path=parts.blocks_path,
                      method="rtn")
    scorer = PlanScorer(parts, batches, tokens=128)  # the first batch: 4 x 32 tokens

    def nll():
        b = batches[0]
        lg = m(**b).logits
        return float(F.cross_entropy(lg[:, :-1].reshape(-1, lg.shape[-1]), b["input_ids"][:, 1:].reshape(-1)))

    base = nll()
    saved = {n: m.get_submodule(n).weight.data for n in plan.assignment()}
    for n, s in plan.assignment().items():
        m.get_submodule(n).weight.data = fake_quant(saved[n], s)
    direct = nll() - base
    for n, w in saved.items():
        m.get_submodule(n).weight.data = w
    # both are differences of two float32 NLLs of ~4.6 nats (per sequence vs averaged): 1e-6 is a few float32 ulps
    per_seq = scorer(plan)
    assert per_seq.shape == (4,) and float(per_seq.mean()) == pytest.approx(direct, rel=1e-5, abs=1e-6)
    assert torch.equal(scorer(plan), per_seq)  # from the cache, the model left unchanged
    assert nll() == pytest.approx(base, abs=0)
