"""Plans are requests (dry-run -> file -> same model), one result contract (report re-renders from JSON),
one output policy (the user's files are never touched)."""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

from tiny_models import save_tiny, tiny_text

from layerscope.cli import app as cli
from layerscope.errors import LayerscopeError


def run_cli(args, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["layerscope", *map(str, args)])
    try:
        cli.main()
        code = 0
    except SystemExit as exc:
        code = exc.code
    cap = capsys.readouterr()
    return code, cap.out, cap.err


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny("llama", tmp_path_factory.mktemp("m") / "llama")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("t") / "calib.txt"
    p.write_text(tiny_text(4000))
    return p


def weights_hash(d: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(d.glob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()


def tree(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_dry_run_plan_file_gives_the_same_model_as_the_one_line_form(model_dir, text_file, tmp_path, monkeypatch, capsys):
    scan_opts = ["--data", text_file, "--tokens", 256, "--seq-len", 32]
    code, plan_text, err = run_cli(["prune", model_dir, "--remove", 2, "--by", "block_influence", *scan_opts,
                                    "--dry-run"], monkeypatch, capsys)
    assert code == 0, err
    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(plan_text)
    assert "plan: prune" in plan_text and "remove:" in plan_text
    code, _, err = run_cli(["prune", model_dir, "--plan", plan_file, "--out", tmp_path / "from_plan"], monkeypatch, capsys)
    assert code == 0, err
    code, _, err = run_cli(["prune", model_dir, "--remove", 2, "--by", "block_influence", *scan_opts,
                            "--out", tmp_path / "one_line"], monkeypatch, capsys)
    assert code == 0, err
    assert weights_hash(tmp_path / "from_plan") == weights_hash(tmp_path / "one_line")
    recorded = (tmp_path / "from_plan" / "layerscope_plan.yaml").read_text()
    assert recorded == plan_text  # the artefact records the plan that made it


def test_plan_file_with_unknown_field_is_one_line(model_dir, tmp_path, monkeypatch, capsys):
    bad = tmp_path / "plan.yaml"
    bad.write_text("plan: prune\nunit: block\nremove: [1]\nremvoe: [2]\n")
    code, _, err = run_cli(["prune", model_dir, "--plan", bad, "--out", tmp_path / "o"], monkeypatch, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "remvoe" in err
    assert not (tmp_path / "o").exists()


def test_plan_for_other_weights_is_refused(model_dir, tmp_path):
    from layerscope.actions.prune import prune
    from layerscope.plans.prune import PrunePlan

    plan = PrunePlan(unit="block", remove=[1], weights_sha256="0" * 64)
    with pytest.raises(LayerscopeError, match="other weights"):
        prune(str(model_dir), plan, out=tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_plan_prune_from_a_table_alone_matches_its_ranking(model_dir, text_file):
    import layerscope

    table = layerscope.scan(str(model_dir), str(text_file), ["block_influence"], tokens=256, seq_len=32)
    plan = layerscope.plan_prune(table, remove=2, by="block_influence")
    assert plan.remove == sorted(table.least_important("block_influence", 2))
    assert plan.weights_sha256 == table.provenance.weights_sha256


def test_report_rerenders_from_every_saved_result(model_dir, text_file, tmp_path, monkeypatch, capsys):
    out = tmp_path / "scan"
    code, _, err = run_cli(["scan", model_dir, "--data", text_file, "--tokens", 256, "--seq-len", 32,
                            "--metrics", "block_influence", "--out", out, "--quiet"], monkeypatch, capsys)
    assert code == 0, err
    original = (out / "report.html").read_text()
    (out / "report.html").unlink()
    code, stdout, err = run_cli(["report", out / "scores.json"], monkeypatch, capsys)
    assert code == 0, err
    again = (out / "report.html").read_text()
    assert 'data-chart="heatmap"' in again and again.count("<section") == original.count("<section")
    assert "block_influence" in stdout
    pruned = tmp_path / "pruned"
    code, _, err = run_cli(["prune", model_dir, "--units", "1,2", "--out", pruned], monkeypatch, capsys)
    assert code == 0, err
    (pruned / "report.html").unlink()
    code, stdout, err = run_cli(["report", pruned / "layerscope_pruned.json"], monkeypatch, capsys)
    assert code == 0, err
    assert "removed blocks 1, 2 of 4" in stdout and 'data-section="prune"' in (pruned / "report.html").read_text()


def test_load_result_rejects_what_is_not_a_result(tmp_path):
    from layerscope.results import load_result

    (tmp_path / "x.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(LayerscopeError, match="not a layerscope result"):
        load_result(tmp_path / "x.json")


def test_scan_into_a_folder_with_user_files_leaves_them_intact(model_dir, text_file, tmp_path, monkeypatch, capsys):
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "notes.txt").write_text("my notes")
    (runs / "sub").mkdir()
    (runs / "sub" / "data.csv").write_text("a,b\n1,2\n")
    before = tree(runs)
    args = ["scan", model_dir, "--data", text_file, "--tokens", 256, "--seq-len", 32, "--metrics",
            "block_influence", "--out", runs, "--quiet"]
    code, _, err = run_cli(args, monkeypatch, capsys)
    assert code == 2 and "did not write" in err and len(err.strip().splitlines()) == 1
    assert tree(runs) == before
    code, _, err = run_cli([*args, "--force"], monkeypatch, capsys)  # our files beside theirs, theirs untouched
    assert code == 0, err
    after = tree(runs)
    assert {k: v for k, v in after.items() if k in before} == before
    assert {"scores.json", "scores.csv", "report.html"} <= set(after)
    (runs / "scores.csv").write_text("now the user's")  # a user edit of our file is still ours to replace...
    code, _, err = run_cli(args, monkeypatch, capsys)  # ...a folder layerscope wrote into takes new results
    assert code == 0, err
    assert tree(runs)["notes.txt"] == b"my notes"


def test_out_is_a_file_or_contains_the_model(model_dir, text_file, tmp_path, monkeypatch, capsys):
    f = tmp_path / "some_file"
    f.write_text("keep me")
    base = ["scan", model_dir, "--data", text_file, "--tokens", 256, "--seq-len", 32, "--metrics", "block_influence"]
    code, _, err = run_cli([*base, "--out", f], monkeypatch, capsys)
    assert code == 2 and "not a directory" in err and f.read_text() == "keep me"
    assert not list(tmp_path.glob(".some_file*"))
    before = tree(model_dir)
    code, _, err = run_cli([*base, "--out", model_dir.parent, "--force"], monkeypatch, capsys)
    assert code == 2 and "contains the source model" in err
    assert tree(model_dir) == before


def test_a_user_file_with_an_output_name_is_never_replaced(tmp_path):
    from layerscope.outputs import output_dir

    out = tmp_path / "o"
    out.mkdir()
    (out / "report.html").write_text("theirs")
    with pytest.raises(LayerscopeError, match="did not write"):
        with output_dir(out, verb="test", force=True) as tmp:
            (tmp / "report.html").write_text("ours")
    assert (out / "report.html").read_text() == "theirs"
    assert [p.name for p in out.iterdir()] == ["report.html"]  # no staging left behind


def test_outputs_get_ordinary_permissions_even_when_written_privately(tmp_path):
    import os

    from layerscope.outputs import output_dir

    mask = os.umask(0o022)
    try:
        with output_dir(tmp_path / "o", verb="test") as tmp:
            (tmp / "model.safetensors").write_bytes(b"x")
            os.chmod(tmp / "model.safetensors", 0o600)  # what save_pretrained's private temporary file leaves
    finally:
        os.umask(mask)
    assert (tmp_path / "o" / "model.safetensors").stat().st_mode & 0o777 == 0o644


def test_steer_dry_run_prints_a_plan_that_reads_back(model_dir, tmp_path, monkeypatch, capsys):
    from layerscope.plans.steer import SteerPlan

    code, text, err = run_cli(["steer", model_dir, "--alpha", 0.5, "--compare", "every:2", "--dry-run"],
                              monkeypatch, capsys)
    assert code == 0, err
    (tmp_path / "steer.yaml").write_text(text)
    plan = SteerPlan.from_file(tmp_path / "steer.yaml")
    assert plan.alpha == 0.5 and plan.compare == "every:2" and plan.layer is None
    assert not (tmp_path / "layerscope-steer").exists()
