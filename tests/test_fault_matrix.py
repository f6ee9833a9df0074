"""The bad-input matrix (issue 10): every verb x every kind of bad input gives one clear line on
stderr, a non-zero exit (130 for Ctrl-C), no traceback, and leaves the filesystem as it was:
no output folder, nothing written next to or inside the model, the user's files byte-identical.

Everything runs in-process on tiny random models written to a temporary folder."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

from layerscope.cli import app as cli
from cli_runner import run
from tiny_models import save_tiny, tiny_text

MODEL_VERBS = ("scan", "agree", "prune", "eval", "sweep", "quantize", "probe", "lens", "steer", "sparsify", "lowrank",
               "finetune", "merge")
VERBS = (*MODEL_VERBS, "report", "assets")


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    import layerscope.report

    monkeypatch.setattr(layerscope.report, "render_report", lambda *a, **k: "<html></html>")
    yield
    torch.set_num_threads(before)


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


# ------------------------------------------------------------------------------- the bad inputs


def _safetensors_with_header(path: Path, header: dict, payload: bytes = b"") -> None:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + payload)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """One folder with every bad input next to a good tiny model, a text file and a result."""
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("world")
    good = save_tiny("llama", root / "good")
    m = {"good": good, "nonexistent": root / "no-such-model"}
    (root / "not_a_model").mkdir()
    (root / "not_a_model" / "readme.txt").write_text("hello")
    m["not_a_model"] = root / "not_a_model"

    def copy_of(name: str) -> Path:
        d = root / name
        d.mkdir()
        for f in good.iterdir():
            (d / f.name).write_bytes(f.read_bytes())
        return d

    d = copy_of("truncated")
    st = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(st[: len(st) // 2])
    m["truncated"] = d
    d = copy_of("garbage")
    (d / "model.safetensors").write_bytes(b"\x00\xff" * 300)
    m["garbage"] = d
    d = copy_of("pickle_only")
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    m["pickle_only"] = d
    d = copy_of("config_mismatch")
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 96  # the weights were made with 64
    (d / "config.json").write_text(json.dumps(cfg))
    m["config_mismatch"] = d
    d = copy_of("missing_tensors")
    sd = load_file(d / "model.safetensors")
    save_file({k: v for k, v in sd.items() if "layers.2.mlp." not in k}, d / "model.safetensors",
              metadata={"format": "pt"})
    m["missing_tensors"] = d
    d = copy_of("unknown_arch")
    cfg["model_type"], cfg["architectures"] = "blorptron", ["BlorptronForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    m["unknown_arch"] = d

    data = root / "data"
    data.mkdir()
    (data / "text.txt").write_text(tiny_text(3000))
    (data / "empty.txt").write_text("")
    (data / "binary.txt").write_bytes(bytes(range(256)) * 8)
    (data / "short.txt").write_text("w1 w2 w3")
    (data / "labelled.csv").write_text("text,label\n" + "".join(f"w{i} w{i + 1},{'positive' if i % 2 else 'negative'}\n"
                                                               for i in range(3, 60)))
    (data / "empty.csv").write_text("")
    (data / "binary.csv").write_bytes(bytes(range(256)) * 8)
    (data / "short.csv").write_text("text,label\nw1,positive\n")
    (data / "user_file").write_bytes(b"the user's own file")
    (data / "plan_unknown_field.yaml").write_text("remove: 1\nby: block_influence\nfrobnicate: 3\n")
    (data / "not_a_result.json").write_text(json.dumps({"kind": "layerscope.nothing", "x": 1}))
    return root, m, data


def base_args(verb: str, model, data: Path, out: Path) -> list:
    text = data / "text.txt"
    return {
        "scan": ["scan", model, "--data", text, "--tokens", 64, "--seq-len", 16, "-q", "--out", out],
        "agree": ["agree", model, "--data", text, "--tokens", 64, "--seq-len", 16, "--second-corpus", "none",
                  "--ablation-data", "calibration", "--bootstrap", 0, "--no-extras", "-q", "--out", out],
        "prune": ["prune", model, "--remove", 1, "--by", "block_influence", "--data", text, "--tokens", 64,
                  "--seq-len", 16, "--out", out],
        "eval": ["eval", model, "--dataset", text, "--tokens", 64, "--context", 16, "--out", out / "eval.json"],
        "sweep": ["sweep", model, "--remove", "0..1", "--orders", "random:1", "--dataset", text, "--tokens", 64,
                  "--context", 16, "--greedy-data", text, "--greedy-tokens", 32, "-q", "--out", out],
        "quantize": ["quantize", model, "--budget", 4, "--by", "uniform", "--no-eval", "--no-save-model", "-q",
                     "--out", out],
        "probe": ["probe", model, "--data", data / "labelled.csv", "--n", 40, "--no-control", "-q", "--out", out],
        "lens": ["lens", model, "--steps", 0, "--train-tokens", 32, "--eval-tokens", 32, "--seq-len", 16, "-q",
                 "--out", out],
        "steer": ["steer", model, "--data", data / "labelled.csv", "--n", 40, "--seeds", 1, "--compare", "1",
                  "--layer", 1, "-q", "--out", out],
        "sparsify": ["sparsify", model, "--sparsity", 0.5, "--tokens", 64, "--seq-len", 16, "--no-eval",
                     "--no-check-uniform", "-q", "--out", out],
        "lowrank": ["lowrank", model, "--reduction", 0.2, "--tokens", 64, "--seq-len", 16, "--no-eval",
                    "--no-check-uniform", "-q", "--out", out],
        "finetune": ["finetune", model, "--plan", "lisa-importance", "--n-layers", 1, "--data", text, "--steps", 1, "--batch-size", 1,
                     "--seq-len", 16, "-q", "--out", out],
        "merge": ["merge", model, model, "--tokens", 32, "--out", out],  # the base and one fine-tuned model
    }[verb]


def check(code, err, expect=2):
    assert code == expect, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    line = err.strip()
    assert line.startswith("layerscope: error: ") or line == "layerscope: interrupted", line


def _with(args: list, flag: str, value) -> list:
    args = list(args)
    args[args.index(flag) + 1] = value
    return args


# ------------------------------------------------------------------------------- model cases

MODEL_CASES = ("nonexistent", "not_a_model", "truncated", "garbage", "pickle_only", "config_mismatch",
               "missing_tensors", "unknown_arch")


@pytest.mark.parametrize("case", MODEL_CASES)
@pytest.mark.parametrize("verb", MODEL_VERBS)
def test_bad_model(verb, case, world, tmp_path, monkeypatch, capsys):
    root, models, data = world
    before = snapshot(root)
    out = tmp_path / "out"
    code, _, err = run(base_args(verb, models[case], data, out), monkeypatch, capsys)
    check(code, err)
    assert not out.exists() and snapshot(root) == before


# ------------------------------------------------------------------------------- data cases

DATA_VERBS = {"scan": ("--data", "txt"), "agree": ("--data", "txt"), "eval": ("--dataset", "txt"),
              "sweep": ("--dataset", "txt"), "prune": ("--data", "txt"), "probe": ("--data", "csv"),
              "steer": ("--data", "csv")}


@pytest.mark.parametrize("kind", ["empty", "binary", "short", "missing"])
@pytest.mark.parametrize("verb", list(DATA_VERBS))
def test_bad_data(verb, kind, world, tmp_path, monkeypatch, capsys):
    root, models, data = world
    flag, ext = DATA_VERBS[verb]
    before = snapshot(root)
    out = tmp_path / "out"
    bad = data / f"{kind}.{ext}" if kind != "missing" else data / f"nope.{ext}"
    code, _, err = run(_with(base_args(verb, models["good"], data, out), flag, bad), monkeypatch, capsys)
    check(code, err)
    assert not out.exists() and snapshot(root) == before


# ------------------------------------------------------------------------------- numbers and names

NUMBERS = {
    "scan": [("--tokens", 0), ("--seq-len", -1)],
    "agree": [("--tokens", 0), ("--ablation-tokens", 1)],
    "prune": [("--remove", 4), ("--remove", -1)],           # K >= layers (4)
    "eval": [("--tokens", 0), ("--context", 1)],
    "sweep": [("--remove", "0..4"), ("--tokens", 0)],
    "quantize": [("--budget", 1), ("--budget", "lots")],   # below the smallest bit width
    "probe": [("--n", 0), ("--batch-size", 0)],
    "lens": [("--steps", -1), ("--seq-len", 0)],
    "steer": [("--layer", 99), ("--n", 0)],
    "sparsify": [("--sparsity", 1.5), ("--tokens", 0)],
    "lowrank": [("--reduction", 1.0), ("--tokens", 0)],
    "finetune": [("--steps", 0), ("--n-layers", 99)],
    "merge": [("--density", 2.0), ("--lambdas", "1,2,3")],
}
NAMES = {
    "scan": [("-m", "no_such_metric")],
    "agree": [("--truth", "no_such_truth")],
    "prune": [("--by", "no_such_metric"), ("--unit", "tail")],
    "eval": [("--dataset", "no_such_corpus")],
    "sweep": [("--orders", "no_such_metric"), ("--unit", "tail")],
    "quantize": [("--by", "no_such_metric"), ("--bits", "2,5")],  # unsupported bit width
    "probe": [("--pooling", "median")],
    "lens": [("--neurons", "banana")],
    "steer": [("--compare", "banana")],
    "sparsify": [("--method", "banana"), ("--pattern", "5:4")],
    "lowrank": [("--method", "banana"), ("--allocation", "banana")],
    "finetune": [("--plan", "banana"), ("--by", "no_such_metric")],
    "merge": [("--method", "banana"), ("--layers", "banana")],
}


@pytest.mark.parametrize("verb,flag,value", [(v, f, x) for v, cases in NUMBERS.items() for f, x in cases]
                         + [(v, f, x) for v, cases in NAMES.items() for f, x in cases])
def test_out_of_range_numbers_and_unknown_names(verb, flag, value, world, tmp_path, monkeypatch, capsys):
    root, models, data = world
    before = snapshot(root)
    out = tmp_path / "out"
    args = base_args(verb, models["good"], data, out)
    args = _with(args, flag, value) if flag in args else [*args, flag, value]
    code, _, err = run(args, monkeypatch, capsys)
    check(code, err)
    assert not out.exists() and snapshot(root) == before


@pytest.mark.parametrize("verb", ["prune", "quantize", "steer"])
def test_plan_with_an_unknown_field(verb, world, tmp_path, monkeypatch, capsys):
    root, models, data = world
    before = snapshot(root)
    out = tmp_path / "out"
    code, _, err = run([*base_args(verb, models["good"], data, out), "--plan", data / "plan_unknown_field.yaml"],
                       monkeypatch, capsys)
    check(code, err)
    assert not out.exists() and snapshot(root) == before


# ------------------------------------------------------------------------------- output paths


@pytest.mark.parametrize("case", ["file", "contains_model", "inside_model"])
@pytest.mark.parametrize("verb", MODEL_VERBS)
def test_output_path_cases(verb, case, world, tmp_path, monkeypatch, capsys):
    root, models, data = world
    model = tmp_path / "models" / "m"
    model.mkdir(parents=True)
    for f in models["good"].iterdir():
        (model / f.name).write_bytes(f.read_bytes())
    user = tmp_path / "user_file"
    user.write_bytes(b"the user's own file")
    out = {"file": user, "contains_model": tmp_path / "models", "inside_model": model / "out"}[case]
    args = base_args(verb, model, data, out)
    if verb == "eval":
        args = _with(args, "--out", {"file": tmp_path / "user_file", "contains_model": tmp_path / "models",
                                     "inside_model": model / "eval.json"}[case])
    before = snapshot(tmp_path)
    code, _, err = run(args, monkeypatch, capsys)
    check(code, err)
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------------------- Ctrl-C


@pytest.mark.parametrize("verb", MODEL_VERBS)
def test_ctrl_c_exits_130_with_one_line(verb, world, tmp_path, monkeypatch, capsys):
    import transformers

    root, models, data = world

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", interrupted)
    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", interrupted)
    before = snapshot(root)
    out = tmp_path / "out"
    code, _, err = run(base_args(verb, models["good"], data, out), monkeypatch, capsys)
    check(code, err, expect=130)
    assert not out.exists() and snapshot(root) == before


# ------------------------------------------------------------------------------- report and assets


@pytest.mark.parametrize("case", ["nonexistent", "binary", "not_a_result", "out_is_a_file", "interrupted"])
def test_report_bad_inputs(case, world, tmp_path, monkeypatch, capsys):
    root, models, data = world
    out = tmp_path / "out"
    src = {"nonexistent": data / "nope.json", "binary": data / "binary.txt",
           "not_a_result": data / "not_a_result.json"}.get(case, data / "not_a_result.json")
    if case in ("out_is_a_file", "interrupted"):  # a real result
        from layerscope.metrics.table import Provenance, ScoreTable

        src = tmp_path / "scores.json"
        ScoreTable(provenance=Provenance(model_id="m", model_family="llama", num_layers=2,
                                         layerscope_version="t")).to_json(src)
        if case == "out_is_a_file":
            out = tmp_path / "user_file"
            out.write_bytes(b"mine")
        else:
            import layerscope.results

            monkeypatch.setattr(layerscope.results, "load_result",
                                lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    before = snapshot(root), snapshot(tmp_path)
    code, _, err = run(["report", src, "--out", out], monkeypatch, capsys)
    check(code, err, expect=130 if case == "interrupted" else 2)
    assert (snapshot(root), snapshot(tmp_path)) == before


@pytest.mark.parametrize("args", [["assets", "fetch", "no_such_asset"], ["assets", "frobnicate"]])
def test_assets_bad_inputs(args, monkeypatch, capsys):
    code, _, err = run(args, monkeypatch, capsys)
    check(code, err)


def test_matrix_size():
    """Every verb on main is in the matrix (new verbs are added here by whoever adds them)."""
    assert set(VERBS) == set(cli.COMMAND_MODULES)


@pytest.mark.parametrize("verb", ["prune", "sweep", "agree", "quantize"])
def test_scores_made_on_other_weights(verb, world, tmp_path, monkeypatch, capsys):
    from layerscope.metrics.table import Provenance, ScoreColumn, ScoreTable

    root, models, data = world
    scores = tmp_path / "scores.json"
    t = ScoreTable(provenance=Provenance(model_id="other", model_family="llama", num_layers=4, layerscope_version="t",
                                         weights_sha256="0" * 64))
    t.add(ScoreColumn(name="block_influence", metric="block_influence", unit="block", direction="higher",
                      definition="", reference="", values=[0.1, 0.2, 0.3, 0.4]))
    t.to_json(scores)
    args = base_args(verb, models["good"], data, tmp_path / "out")
    args = [*args, "--scores", scores]
    if verb in ("sweep", "quantize"):
        args = _with(args, {"sweep": "--orders", "quantize": "--by"}[verb], "block_influence")
    before = snapshot(root)
    code, _, err = run(args, monkeypatch, capsys)
    check(code, err)
    assert "other weights" in err and not (tmp_path / "out").exists() and snapshot(root) == before
