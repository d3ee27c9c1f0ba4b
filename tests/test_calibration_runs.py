"""Threshold sweeps and the calibration table on the tiny model (fast)."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from calm_utils.calibration_runs import calibration_table, sweep_table, threshold_sweep
from calm_utils.decoding import ExitConfig


def test_sweep_and_table(tiny_view):
    g = torch.Generator().manual_seed(0)
    prompts = [SimpleNamespace(ids=torch.randint(3, 97, (1, 6), generator=g)) for _ in range(12)]
    thresholds = [1.0, 0.6, 0.0]
    sweep = threshold_sweep(tiny_view, prompts, lambda lam: ExitConfig(measure="softmax_max", threshold=lam),
                            thresholds, quality=lambda text, p: 0.0, consistency_metric="token_f1",
                            max_new_tokens=6)
    assert sweep.textual_loss.shape == (3, 12)
    # threshold 1.0 can only exit when softmax is exactly 1: identical to the full model here
    assert np.all(sweep.textual_loss[0] == 0) and np.all(sweep.avg_exit_layer[0] == tiny_view.num_layers)
    # threshold 0 exits every token at layer 1 (but the first, from the prompt pass)
    assert np.all(sweep.avg_exit_layer[2] < tiny_view.num_layers)
    assert np.all((sweep.risk_loss >= 0) & (sweep.risk_loss <= 1))
    table = calibration_table(sweep, deltas=[0.2, 0.5], epsilon=0.1, n_splits=5, model="tiny")
    assert set(table.method) == {"ltt", "naive"} and set(table.constraint) == {"textual", "risk"}
    assert len(table) == 2 * 2 * 2 and table["valid_fraction"].between(0, 1).all()
    assert len(sweep_table(sweep, model="tiny")) == 3
