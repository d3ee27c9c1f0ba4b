"""Notebook 02's helpers (calm_utils/exit_study.py) and T5 support in collect_states (tiny random models)."""
from __future__ import annotations

import pandas as pd
import pytest
import torch

from calm_utils import exit_study as es
from calm_utils.collect import collect_states
from calm_utils.confidence import ConfidenceMeasure, StateCosine
from calm_utils.decoding import EarlyExitDecoder, ExitConfig
from calm_utils.experiments import Prompt
from calm_utils.heads import train_head
from calm_utils.t5_layerwise import LayerwiseT5
from calm_utils.t5_model import build_t5, make_t5_config

torch.set_num_threads(1)

PROMPTS = [[1, 5, 9, 33, 4], [1, 70, 3], [1, 12, 12, 50, 51, 8, 90], [1, 40, 41]]
SOURCES = [[5, 9, 33, 4, 1], [7, 3, 1], [12, 12, 12, 49, 3, 8, 11, 2, 30, 1], [44, 21, 17, 6, 1]]


@pytest.fixture(autouse=True)
def _tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CALM_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def t5_view():
    torch.manual_seed(0)
    cfg = make_t5_config(d_model=32, d_ff=64, num_heads=4, d_kv=8, num_layers=2, num_decoder_layers=4, vocab_size=50)
    model = build_t5(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return LayerwiseT5(model.eval())


def test_collect_states_t5(t5_view):
    data = collect_states(t5_view, [torch.tensor([s]) for s in SOURCES], max_new_tokens=6, name="t5", progress=False)
    L, d = t5_view.num_layers, t5_view.hidden_size
    N = data["states"].shape[0]
    assert data["states"].shape == (N, L + 1, d) and data["labels"].shape == (N, L)
    assert data["labels"][:, -1].all()
    # teacher-forced decoder states reproduce what incremental decoding emitted, token for token
    assert (data["final_argmax"] == data["generated"]).all()
    assert set(data["group"].tolist()) == set(range(len(SOURCES)))
    # row 0 of each prompt is the decoder-start position: embedding of decoder_start_token_id
    first = data["step"] == 0
    start = t5_view.embed(torch.tensor([[t5_view.decoder_start_token_id]]))[0, 0]
    assert torch.allclose(data["states"][first, 0].float(), start.expand(int(first.sum()), -1), atol=1e-3)


class _Recorder(ConfidenceMeasure):
    """Never exits; records StateCosine at every layer."""
    name = "rec"

    def __init__(self):
        self.inner, self.rows, self.cur = StateCosine(), [], None

    def start_token(self):
        self.cur = []
        self.rows.append(self.cur)

    def __call__(self, ctx):
        self.cur.append(self.inner(ctx)[0])
        return -1.0, None


def test_offline_state_cosine_matches_decoder_measure(tiny_view):
    """The offline ``state`` score used for AUC is the decoder's StateCosine (not a bug behind AUC ~ 0.5)."""
    ids = torch.tensor([PROMPTS[2]])
    data = collect_states(tiny_view, [ids], max_new_tokens=6, name="s", progress=False)
    rec = _Recorder()
    EarlyExitDecoder(tiny_view, ExitConfig(threshold=0.0, max_new_tokens=6), measure=rec).generate(ids)
    offline = es.state_cosine(data["states"])[:, :-1]           # layers 1..L-1 (the checked ones)
    online = torch.tensor(rec.rows)                             # tokens 1.. (token 0 comes from the prompt pass)
    n = online.shape[0]
    assert torch.allclose(offline[-n:], online, atol=2e-3)


def test_offline_exit_and_thresholds():
    # 3 layers; token 0 consistent from layer 1, token 1 from layer 2, token 2 only at the last layer
    labels = torch.tensor([[1, 1, 1], [0, 1, 1], [0, 0, 1]], dtype=torch.bool)
    scores = torch.tensor([[0.9, 0.9, 0.0], [0.2, 0.8, 0.0], [0.5, 0.3, 0.0]])
    assert es.offline_exit(scores, labels, 0.95) == (1.0, 3.0)
    c, a = es.offline_exit(scores, labels, 0.85)
    assert c == 1.0 and a == pytest.approx((1 + 3 + 3) / 3)
    c, a = es.offline_exit(scores, labels, 0.45)                 # token 2 exits wrongly at layer 1
    assert c == pytest.approx(2 / 3) and a == pytest.approx((1 + 2 + 1) / 3)
    mask = torch.tensor([False, True])                           # only layer 2 checked
    c, a = es.offline_exit(scores, labels, 0.45, mask)
    assert c == 1.0 and a == pytest.approx((2 + 2 + 3) / 3)
    grid = es.pick_thresholds(scores, labels, targets=(1.0, 0.6))
    assert grid == sorted(grid, reverse=True)
    assert es.offline_exit(scores, labels, grid[0])[0] == 1.0
    assert torch.equal(es.checked_mask(6, 2, 2), torch.tensor([False, True, False, True, False]))


def test_matched_table_picks_lowest_exit_meeting_level():
    trade = pd.DataFrame({
        "model": "m", "maps": False, "measure": ["linear"] * 3 + ["attention"] * 2,
        "threshold": [0.9, 0.8, 0.7, 0.9, 0.8], "avg_exit_layer": [5.0, 4.0, 3.0, 6.0, 5.5],
        "consistency": [0.95, 0.91, 0.7, 0.85, 0.6], "quality": 0.5, "speedup": [1.1, 1.2, 1.3, 1.0, 1.05]})
    m = es.matched_table(trade, levels=(0.9,), num_layers={"m": 8}).set_index("measure")
    assert m.loc["linear", "threshold"] == 0.8 and m.loc["linear", "avg_exit_layer"] == 4.0 and m.loc["linear", "reached"]
    assert not m.loc["attention", "reached"] and m.loc["attention", "avg_exit_layer"] == 8 and m.loc["attention", "speedup"] == 1.0
    assert "softmax_diff" not in m.index


def test_auc_and_tradeoff_runs_on_tiny_model(tiny_view):
    data = collect_states(tiny_view, [torch.tensor([p]) for p in PROMPTS], max_new_tokens=6, name="t", progress=False)
    heads = {k: train_head(k, data, epochs=1, progress=False, use_cache=False) for k in ("linear", "attention")}
    scores = es.offline_scores(data, heads)
    assert set(scores) == {"softmax_max", "softmax_diff", "state", "linear", "attention"}
    auc = es.auc_table("tiny", data, scores)
    assert list(auc.columns) == ["model", "measure", "layer", "auc"]
    assert auc.layer.max() == tiny_view.num_layers - 1
    prompts = [Prompt("squad", "p0", torch.tensor([PROMPTS[0]]), ["x"])]
    grids = {"softmax_diff": [0.5], "state": [0.99], "linear": [0.5], "attention": [0.5]}
    trade, runs = es.tradeoff_runs("tiny", tiny_view, prompts, grids, heads, max_new_tokens=4, min_exit_layer=2)
    assert len(trade) == 4 and set(runs.setting) >= {"full"}
    assert {"model", "measure", "maps", "threshold", "avg_exit_layer", "consistency", "quality", "speedup",
            "ideal_speedup"} <= set(trade.columns)
    assert (trade.avg_exit_layer >= 1).all() and (trade.avg_exit_layer <= tiny_view.num_layers).all()
