"""The report does not mislead (issue 10): the consensus counts votes weighted by measured agreement
(or says which metrics it counts alike), and the heatmap offers a rank scale."""
from __future__ import annotations

import numpy as np
import pytest

from layerscope.metrics.table import Provenance, ScoreColumn, ScoreTable


def _table(cols: dict[str, tuple[list, str]], agreement: dict | None = None) -> ScoreTable:
    t = ScoreTable(provenance=Provenance(model_id="m", model_family="llama", num_layers=8, calibration_tokens=1,
                                         layerscope_version="test"))
    for name, (vals, direction) in cols.items():
        t.add(ScoreColumn(name=name, metric=name, unit="block", direction=direction, definition="", reference="",
                          values=vals))
    if agreement is not None:
        t.extras["agreement"] = agreement
    return t


GOOD = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]  # layers 0..4 least important
BAD = [0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]   # anti-correlated: layers 7..3 least important


def test_consensus_without_agreement_counts_every_metric_alike_and_names_them():
    from layerscope.report.sections.ranking import consensus

    t = _table({"a": (GOOD, "higher"), "b": (BAD, "higher"), "c": (BAD, "higher")})
    top, basis = consensus(t, list(t.columns.values()), 5)
    assert basis["weighted_by"] is None and basis["counted"] == ["a", "b", "c"]
    assert top[0] == (3, 3.0) and top[1] == (4, 3.0)  # the layers all three put in their 5 least


def test_consensus_with_agreement_gives_anti_correlated_metrics_no_vote():
    from layerscope.report.sections.ranking import consensus

    agreement = {"primary_truth": "ablation_kl", "rows": [
        {"column": "b", "vs": {"ablation_kl": {"spearman": -0.9}}},
        {"column": "c", "vs": {"ablation_kl": {"spearman": -0.5}}},
        {"column": "a", "vs": {"ablation_kl": {"spearman": 0.5}}}]}
    t = _table({"ablation_kl": (GOOD, "higher"), "a": (GOOD, "higher"), "b": (BAD, "higher"), "c": (BAD, "higher")},
               agreement)
    top, basis = consensus(t, list(t.columns.values()), 5)
    assert "ablation_kl" in basis["weighted_by"] and basis["left_out"] == ["b", "c"]
    assert [layer for layer, _ in top] == [0, 1, 2, 3, 4] and top[0][1] == pytest.approx(1.5)
    from layerscope.report.sections.ranking import render

    html = render(t)
    assert "weighted by its Spearman agreement with ablation_kl" in html and "No vote" in html


def test_heatmap_rank_scale_is_not_washed_out_by_one_extreme_layer():
    from layerscope.report.figures import heatmap_figure, importance_normalise, rank_normalise

    v = np.array([100.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])  # block 0 dwarfs the rest
    assert importance_normalise(v, "higher")[1:].max() < 0.07  # min-max: the rest look alike
    np.testing.assert_allclose(rank_normalise(v, "higher"), [1.0] + [i / 7 for i in range(7)])
    np.testing.assert_allclose(rank_normalise(v, "lower"), [0.0] + [1 - i / 7 for i in range(7)])
    assert (rank_normalise(np.full(8, 3.0), "higher") == 0.5).all()
    fig, _ = heatmap_figure(_table({"x": (v.tolist(), "higher")}))
    assert [tr.name for tr in fig.data] == ["min-max", "rank"] and fig.data[1].visible is False
    assert [b.label for b in fig.layout.updatemenus[0].buttons] == ["scale: min-max per row", "scale: rank"]
