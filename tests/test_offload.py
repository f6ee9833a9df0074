"""Out-of-core (blocks streamed from the shards) and device placement (one block at a time on the device)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import tiny_models as tm
from layerscope.engine.runner import BlockRunner, make_batches
from layerscope.errors import LayerscopeError
from layerscope.metrics.scan import scan
from layerscope.model import memory, offload
from layerscope.model.adapter import find_parts
from layerscope.model.loading import load_model


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tm.save_tiny("llama", tmp_path_factory.mktemp("tiny") / "llama")


def _values(table) -> dict:
    return {n: c.values for n, c in table.columns.items()}


def test_out_of_core_scan_gives_the_in_ram_scores_exactly(tiny_dir):
    ids = tm.sample_inputs("llama", n=4, seq=24)
    opts = {"weights_cache": False, "ablation_data": "calibration", "ablation_units": "block,mlp"}
    metrics = ["default", "ablation", "quant_sensitivity", "taylor"]
    in_ram = scan(tiny_dir, ids, metrics, batch_size=2, offload=False, options=opts)
    ooc = scan(tiny_dir, ids, metrics, batch_size=2, offload=True, options=opts)
    assert "out-of-core" in ooc.provenance.skipped.pop("taylor")  # gradients need every block at once
    in_ram.columns = {n: c for n, c in in_ram.columns.items() if not n.startswith("taylor")}
    assert any("streamed" in n for n in ooc.provenance.notes)
    assert not any("streamed" in n for n in in_ram.provenance.notes)
    assert set(ooc.columns) == set(in_ram.columns) and len(ooc.columns) > 30
    assert _values(ooc) == _values(in_ram)  # identical floats, weight statistics and ablation included


def test_streamed_model_holds_one_block_at_a_time_and_reads_it_from_the_shards(tiny_dir):
    lm = load_model(tiny_dir, offload=True, tokenizer=False)
    s = offload.streamer_of(lm.model)
    parts = find_parts(lm.model)
    assert all(p.device.type == "meta" for b in parts.blocks for p in b.parameters())
    assert lm.model.model.embed_tokens.weight.device.type == "cpu"
    seen = []
    for i, b in enumerate(parts.blocks):
        b.register_forward_pre_hook(lambda m, a, i=i: seen.append(
            (i, [all(p.device.type == "cpu" for p in blk.parameters()) for blk in parts.blocks])))
    ids = tm.sample_inputs("llama", n=2, seq=16)
    with torch.no_grad():
        logits = lm.model(input_ids=ids).logits
    assert [i for i, _ in seen] == [0, 1, 2, 3]
    assert all(flags == [j == i for j in range(4)] for i, flags in seen)  # only the running block is loaded
    s.release()
    assert s.resident_labels() == [] and s.loads == 4
    ref = load_model(tiny_dir, offload=False, tokenizer=False).model
    with torch.no_grad():
        assert torch.equal(ref(input_ids=ids).logits, logits)


def test_missing_block_tensor_is_an_error_that_names_it(tiny_dir, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_dir, bad)
    f = next(bad.glob("*.safetensors"))
    state = load_file(str(f))
    del state["model.layers.2.mlp.down_proj.weight"]
    save_file(state, str(f), metadata={"format": "pt"})
    with pytest.raises(LayerscopeError, match=r"model\.layers\.2\.mlp\.down_proj\.weight"):
        load_model(bad, offload=True, tokenizer=False)


def test_offload_is_chosen_automatically_when_the_weights_exceed_available_memory(tiny_dir, monkeypatch):
    files = sorted(tiny_dir.glob("*.safetensors"))
    need = memory.weights_bytes(files, torch.float32)
    monkeypatch.setattr(memory, "available_memory", lambda: need)  # weights > 60% of what is available
    assert memory.choose_offload(files, torch.float32, None)[0] is True
    assert memory.choose_offload(files, torch.float32, False)[0] is False  # --no-offload wins
    monkeypatch.setattr(memory, "available_memory", lambda: 100 * need)
    streamed, why = memory.choose_offload(files, torch.float32, None)
    assert streamed is False and why.startswith("in RAM")
    assert memory.choose_offload(files, torch.float32, True)[0] is True  # --offload wins


def test_out_of_core_prune_writes_the_same_tensors_shard_by_shard(tiny_dir, tmp_path):
    from layerscope.actions.prune import prune

    for unit, units in (("block", "1"), ("mlp", "0,2")):
        a = prune(tiny_dir, out=tmp_path / f"ram-{unit}", units=units, unit=unit, offload=False)
        b = prune(tiny_dir, out=tmp_path / f"ooc-{unit}", units=units, unit=unit, offload=True)
        assert b.provenance.get("written", "").startswith("shard by shard")
        assert sorted(a.provenance["zeroed_parameters"] if unit != "block" else []) == \
            sorted(b.provenance["zeroed_parameters"] if unit != "block" else [])
        ta = {k: v for f in a.out.glob("*.safetensors") for k, v in load_file(str(f)).items()}
        tb = {k: v for f in b.out.glob("*.safetensors") for k, v in load_file(str(f)).items()}
        assert set(ta) == set(tb) and all(torch.equal(ta[k], tb[k]) for k in ta)
        idx = json.loads((b.out / "model.safetensors.index.json").read_text())
        assert len(set(idx["weight_map"].values())) == (4 if unit == "block" else 5)  # a shard per block + rest
        reloaded = load_model(b.out, tokenizer=False, offload=False).model
        assert find_parts(reloaded).num_layers == (3 if unit == "block" else 4)


# ------------------------------------------------------------------------------ device placement
def _placement_run(model, device: torch.device, act_device: torch.device | None = None):
    """Run every block and the head through a GPU-path streamer; record where everything is at each step."""
    s = offload.attach(model, device)
    parts = find_parts(model)
    batches, _ = make_batches(tm.sample_inputs("llama", n=2, seq=12), 2)
    runner = BlockRunner(parts, batches)
    if act_device is not None:
        s.act_device = act_device
    assert runner.device == device
    runner.capture()
    assert s.log == [("load", "block 0")]  # recording loads nothing but block 0 (its output type is checked once)
    batch = runner.batches[0]
    h = batch.first_hidden
    assert h.device.type == "cpu"  # embeddings run where they are stored
    steps = []
    for i in range(parts.num_layers):
        h = runner.forward_block(i, h, batch)
        steps.append({
            "out": h.device.type,
            "resident": s.resident_labels(),
            "blocks": [{p.device.type for p in b.parameters()} for b in parts.blocks],
            "head": parts.head.weight.device.type,
        })
    logits = runner.head_logits(h)
    after_head = (s.resident_labels(), parts.head.weight.device.type, model.model.embed_tokens.weight.device.type)
    s.release()
    return s, steps, logits, after_head


def test_gpu_path_places_only_the_running_block_and_the_head_on_the_device_meta():
    """No GPU here: the compute device is "meta", which checks placement without computing."""
    model = tm.build("llama")
    cpu_params = {n: p for n, p in model.named_parameters()}
    s, steps, logits, after_head = _placement_run(model, torch.device("meta"))
    for i, st in enumerate(steps):
        assert st["resident"] == [f"block {i}"]
        assert st["blocks"] == [{"meta"} if j == i else {"cpu"} for j in range(4)]
        assert st["head"] == "cpu"  # the head goes to the device only for scoring
        assert st["out"] == "meta"  # activations fit: they stay on the device
    assert logits.device.type == "meta"
    assert after_head == (["block 3", "head"], "meta", "cpu")  # untied head copy; embeddings stay in RAM
    assert s.resident_labels() == []
    assert all(p is cpu_params[n] for n, p in model.named_parameters())  # the RAM weights themselves are back


def test_gradient_metrics_on_the_gpu_path_get_the_whole_model_on_the_device_meta():
    model = tm.build("llama")
    offload.attach(model, "meta")
    assert "gradient metrics" in offload.unstream(model)
    assert offload.streamer_of(model) is None and {p.device.type for p in model.parameters()} == {"meta"}
    assert offload.unstream(model) is None  # nothing streamed any more


def test_activations_stay_on_cpu_when_they_do_not_fit_on_the_device():
    cuda = torch.device("cuda")
    assert memory.activation_device(10 << 20, cuda, free_bytes=100 << 20) == cuda
    assert memory.activation_device(80 << 20, cuda, free_bytes=100 << 20) == torch.device("cpu")
    assert memory.activation_device(1 << 40, torch.device("cpu")) == torch.device("cpu")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible to torch: the GPU placement checks "
                    "run only where one exists (the meta-device test covers the same code on CPU)")
def test_gpu_path_on_a_real_gpu_places_blocks_and_matches_cpu_numbers():
    model = tm.build("llama")
    ref_model = tm.build("llama")
    cuda = torch.device("cuda")
    for act in (cuda, torch.device("cpu")):
        s, steps, logits, after_head = _placement_run(model, cuda, act)
        for i, st in enumerate(steps):
            assert st["resident"] == [f"block {i}"]
            assert st["blocks"] == [{"cuda"} if j == i else {"cpu"} for j in range(4)]
            assert st["out"] == act.type
        assert after_head == (["block 3", "head"], "cuda", "cpu")
        s.detach()
        setattr(model, offload.STREAMER_ATTR, None)
        ids = tm.sample_inputs("llama", n=2, seq=12)
        with torch.no_grad():
            ref = ref_model(input_ids=ids).logits
        assert torch.allclose(logits.cpu(), ref, atol=1e-4, rtol=1e-4)
    from layerscope.evaluation.perplexity import PerplexityProtocol, perplexity

    offload.attach(model, cuda)  # a whole-model call (perplexity) on the GPU path
    stream = torch.randint(3, tm.V, (600,), generator=torch.Generator().manual_seed(0))
    proto = PerplexityProtocol(context_length=32, stride=32, max_tokens=512, batch_size=4)
    on_gpu = perplexity(model, ids=stream, protocol=proto).perplexity
    assert abs(on_gpu - perplexity(ref_model, ids=stream, protocol=proto).perplexity) < 1e-3


def _tensors(directory) -> dict:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize("sequential", [False, True])
def test_out_of_core_gptq_quantize_writes_and_measures_the_in_memory_model(tmp_path, sequential):
    """quantize --offload: blocks quantized (GPTQ), packed and written one at a time give the tensors,
    quantization_config and perplexities of the in-memory run; transformers loads the result."""
    from test_gptq import save_wordy_llama  # tiny Llama whose tokenizer reads the calibration text
    from transformers import AutoModelForCausalLM

    from layerscope.actions.quantize import quantize

    src = save_wordy_llama(tmp_path / "model")
    kw = dict(budget="5", bits="4", group="32", by="uniform", method="gptq", tokens=1024, eval_tokens=512,
              sequential=sequential)
    ram = quantize(str(src), out=tmp_path / "ram", offload=False, **kw).to_dict()
    ooc = quantize(str(src), out=tmp_path / "ooc", offload=True, **kw).to_dict()
    assert [r["perplexity"] for r in ooc["evaluations"]] == [r["perplexity"] for r in ram["evaluations"]]
    assert ooc["evaluations"][1]["perplexity"] != ooc["evaluations"][0]["perplexity"]  # the plan changed the model
    assert ooc["exported"]["compressed-tensors model"]["roundtrip_max_abs_diff"] == 0
    a, b = _tensors(tmp_path / "ram" / "model"), _tensors(tmp_path / "ooc" / "model")
    assert sorted(a) == sorted(b) and any(k.endswith("weight_packed") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    cfg = [json.loads((tmp_path / d / "model" / "config.json").read_text())["quantization_config"] for d in ("ram", "ooc")]
    assert cfg[0] == cfg[1] and cfg[0]["format"] == "pack-quantized"
    ids = torch.randint(4, 60, (1, 48), generator=torch.Generator().manual_seed(0))
    la, lb = (AutoModelForCausalLM.from_pretrained(tmp_path / d / "model")(input_ids=ids).logits for d in ("ram", "ooc"))
    assert torch.equal(la, lb)


def test_out_of_core_rtn_quantize_evaluation_equals_in_memory_and_measured_plans_need_the_whole_model(tmp_path):
    from test_gptq import save_wordy_llama

    from layerscope.actions.quantize import quantize

    src = save_wordy_llama(tmp_path / "model")
    kw = dict(budget="5", bits="3,4", group="32", by="uniform", method="rtn", eval_tokens=512)
    ram = quantize(str(src), out=tmp_path / "ram", offload=False, **kw).to_dict()
    ooc = quantize(str(src), out=tmp_path / "ooc", offload=True, **kw).to_dict()
    assert [r["perplexity"] for r in ooc["evaluations"]] == [r["perplexity"] for r in ram["evaluations"]]
    with pytest.raises(LayerscopeError, match="--by measured needs the whole model"):
        quantize(str(src), out=tmp_path / "m", offload=True, budget="4.5", bits="4", group="32", method="gptq")
    assert not (tmp_path / "m").exists()
