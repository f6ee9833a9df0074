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
