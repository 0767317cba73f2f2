"""cli/uncertainty.py: error bars and comparisons read back from saved partials, when models lack some sequences."""

from __future__ import annotations

import numpy as np
import torch
from stats_fixtures import pooled, sequence_sums

from fused_stream.cli.partials import PartialStore
from fused_stream.cli.uncertainty import BootstrapSettings, ModelSequences, bootstrap_models
from fused_stream.metrics import compute_metrics


def test_a_model_missing_a_sequence_keeps_its_own_errors_and_is_compared_on_the_common_ones(tmp_path):
    rng = np.random.default_rng(0)
    data = [{"index": i, "name": f"s{i}", "sources": []} for i in range(6)]
    models = []
    for label, shift, skip in (("a", 0.0, None), ("b", -0.2, 5)):  # b failed on s5
        store = PartialStore(tmp_path, label, {"label": label}, resume=False)
        seqs = []
        for d in data:
            sums = sequence_sums(np.random.default_rng(d["index"]), 40, unit_effect=shift + rng.normal(0, 0.05))
            if d["index"] != skip:
                store.save(d["name"], torch.full((2, 40), d["index"]), sums, {})
                seqs.append(sums)
        metrics = compute_metrics(pooled(seqs), context=16, window=10)
        models.append(ModelSequences(label, store.dir, metrics))
    info = bootstrap_models(models, data, BootstrapSettings(B=200))
    assert info["sequences_dropped"] == {"a": 1, "b": 0} and info["sequences_compared"] == 5
    assert models[0].metrics["uncertainty"]["loss_combined"]["n_units"] == 6  # a's own error bars: all its data
    assert models[1].metrics["uncertainty"]["loss_combined"]["n_units"] == 5
    loss = next(c for c in info["comparisons"] if c["metric"] == "loss_combined")
    assert loss["n_units"] == 5 and loss["wins"] == 5 and loss["delta"] < 0 and loss["ci95"][1] < 0
    # the comparison's values are the pooled metrics of the 5 common sequences, not a's reported ones
    assert loss["baseline_value"] != models[0].metrics["overall"]["combined"]
