"""Exit heads, state collection and linear maps on the tiny random Llama (fast)."""
from __future__ import annotations

import pytest
import torch
from sklearn.metrics import roc_auc_score

from calm_utils import collect as collect_mod
from calm_utils.collect import collect_states, split_by_group
from calm_utils.confidence import ExitContext
from calm_utils.decoding import EarlyExitDecoder, ExitConfig
from calm_utils.heads import (AttentionHead, HeadMeasure, load_head, make_head, predict, save_head,
                              time_head_call, train_head)
from calm_utils.linear_maps import LinearMaps, fit_linear_maps, layer_agreement, ridge_fit

PROMPTS = [[1, 5, 9, 33, 4], [1, 70], [1, 12, 12, 12, 50, 51, 52, 3, 8, 90, 11], [1, 40, 41], [1, 7, 7, 88]]


@pytest.fixture(autouse=True)
def _tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CALM_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def tiny_states(tiny_view):
    return collect_states(tiny_view, [torch.tensor([p]) for p in PROMPTS], max_new_tokens=8, name="t",
                          progress=False)


def test_collect_shapes_labels_and_cache(tiny_view, tiny_states, monkeypatch):
    d, L = tiny_view.hidden_size, tiny_view.num_layers
    data = tiny_states
    N = data["states"].shape[0]
    assert data["states"].shape == (N, L + 1, d)
    assert data["labels"].shape == (N, L) and data["labels"].dtype == torch.bool
    assert data["final_argmax"].shape == (N,) and data["group"].shape == (N,)
    assert data["labels"][:, L - 1].all()
    assert set(data["group"].tolist()) == set(range(len(PROMPTS)))
    # the teacher-forced last layer predicts the tokens greedy decoding emitted
    assert (data["final_argmax"] == data["generated"]).all()
    # states really are the teacher-forced ones at the kept positions
    g0 = data["group"] == 0
    n0 = int(g0.sum())
    seq = torch.tensor([PROMPTS[0] + data["generated"][g0].tolist()[:-1]])
    hs = tiny_view.hidden_states(seq)
    T = len(PROMPTS[0])
    torch.testing.assert_close(data["states"][g0].float(), hs[:, T - 1:T - 1 + n0].transpose(0, 1).to(data["states"].dtype).float())
    # second call loads the file without decoding
    monkeypatch.setattr(collect_mod, "early_exit_generate", lambda *a, **k: (_ for _ in ()).throw(AssertionError))
    again = collect_states(tiny_view, [torch.tensor([p]) for p in PROMPTS], max_new_tokens=8, name="t", progress=False)
    assert "loaded_from" in again["meta"]
    assert torch.equal(again["states"], data["states"]) and torch.equal(again["labels"], data["labels"])
    sub = split_by_group(data, [0, 1])
    assert set(sub["group"].tolist()) == {0, 1} and sub["states"].shape[0] == sub["labels"].shape[0]


def _synthetic(n=1200, d=16, L=5, seed=0):
    """Labels learnable by a linear rule on the normalised state: label = <u, ln(h_l)> > c_l."""
    g = torch.Generator().manual_seed(seed)
    states = torch.randn(n, L + 1, d, generator=g) * torch.linspace(1, 4, L + 1)[None, :, None]
    u = torch.randn(d, generator=g)
    xn = torch.nn.functional.layer_norm(states[:, 1:], (d,))
    labels = (xn @ u) > torch.linspace(0.8, -0.8, L)
    labels[:, -1] = True
    return {"states": states, "labels": labels, "group": torch.arange(n) // 10}


@pytest.mark.parametrize("kind", ["linear", "mlp", "attention"])
def test_heads_learn_synthetic_labels(kind):
    data = _synthetic()
    train = {k: v[:900] for k, v in data.items()}
    head = train_head(kind, train, epochs=25, lr=1e-2, seed=0, progress=False)
    p = predict(head, data["states"][900:])
    y = data["labels"][900:]
    for layer in range(1, 5):
        assert roc_auc_score(y[:, layer - 1].numpy(), p[:, layer - 1].numpy()) > 0.8
    # cached: the same call returns an identical head from disk
    again = train_head(kind, train, epochs=25, lr=1e-2, seed=0, progress=False)
    assert torch.equal(predict(again, data["states"][900:]), p)


@pytest.mark.parametrize("kind", ["linear", "mlp", "attention"])
def test_save_load_roundtrip(kind, tmp_path):
    torch.manual_seed(1)
    head = make_head(kind, 16, 5)
    x = torch.randn(7, 6, 16)
    save_head(head, tmp_path / f"h_{kind}")
    loaded = load_head(tmp_path / f"h_{kind}")
    assert loaded.config() == head.config()
    assert torch.equal(predict(loaded, x), predict(head, x))


def test_attention_head_is_causal_and_incremental_matches():
    torch.manual_seed(0)
    head = AttentionHead(16, 6, d_attn=8, n_heads=2).eval()
    x = torch.randn(3, 7, 16)
    with torch.no_grad():
        base = head(x)
    for j in range(1, 7):
        y = x.clone()
        y[:, j] += torch.randn(3, 16) * 5
        with torch.no_grad():
            out = head(y)
        torch.testing.assert_close(out[:, : j - 1], base[:, : j - 1])   # layers < j unchanged
        assert not torch.allclose(out[:, j - 1], base[:, j - 1])
    # decode-time incremental path equals the training-time forward
    m = HeadMeasure(head)
    ctx = ExitContext(lambda *a: None)
    ctx.history = list(x[0])
    m.start_token()
    for i in range(1, 7):
        conf, tok = m(ctx.at(i, x[0, i]))
        assert tok is None
        assert conf == pytest.approx(float(torch.sigmoid(base[0, i - 1])), abs=1e-5)


@pytest.mark.parametrize("kind", ["linear", "mlp", "attention"])
def test_head_measure_in_decoder(tiny_view, kind):
    head = make_head(kind, tiny_view.hidden_size, tiny_view.num_layers)
    with torch.no_grad():
        last = head.out if kind == "attention" else (head.linear[-1] if kind == "mlp" else head.linear)
        last.bias.fill_(20.0)                     # always confident -> exit at the first checked layer
    dec = EarlyExitDecoder(tiny_view, ExitConfig(policy="confidence", threshold=0.5, max_new_tokens=6),
                           measure=HeadMeasure(head))
    res = dec.generate(PROMPTS[0])
    assert res.exit_layers[0] == tiny_view.num_layers and all(l == 1 for l in res.exit_layers[1:])
    assert res.config["measure"]["name"] == kind
    # registered by name too
    res2 = EarlyExitDecoder(tiny_view, ExitConfig(policy="confidence", measure=kind, threshold=0.5, max_new_tokens=6,
                                                  measure_kwargs={"head": head})).generate(PROMPTS[0])
    assert res2.tokens == res.tokens
    assert time_head_call(head, [torch.randn(tiny_view.hidden_size) for _ in range(7)], repeats=2) > 0


def test_identity_maps_reproduce_plain_logits(tiny_view):
    maps = LinearMaps.identity(tiny_view.num_layers, tiny_view.hidden_size, tiny_view)
    h = torch.randn(4, tiny_view.hidden_size)
    for layer in (1, 3, tiny_view.num_layers):
        torch.testing.assert_close(maps.project(layer, h, None), tiny_view.logits(h))
    rows = torch.tensor([3, 5, 7])
    torch.testing.assert_close(maps.project(2, h[0], rows), tiny_view.logits(h[0], rows))
    res = EarlyExitDecoder(tiny_view, ExitConfig(policy="static", static_layer=3, max_new_tokens=6),
                           project=maps.project).generate(PROMPTS[0])
    plain = EarlyExitDecoder(tiny_view, ExitConfig(policy="static", static_layer=3, max_new_tokens=6)).generate(PROMPTS[0])
    assert res.tokens == plain.tokens


def test_ridge_recovers_linear_map():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(500, 8, generator=g)
    A = torch.randn(8, 8, generator=g)
    b = torch.randn(8, generator=g)
    W = ridge_fit(X, X @ A + b, 1e-8)
    torch.testing.assert_close(W[:-1].float(), A, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(W[-1].float(), b, atol=1e-5, rtol=1e-5)
    # and through fit_linear_maps on states whose last layer is a linear map of each layer
    L, d = 3, 8
    states = torch.randn(400, L + 1, d, generator=g)
    states[:, L] = states[:, 1] @ A + b
    maps = fit_linear_maps({"states": states, "group": torch.arange(400) // 4}, alphas=(1e-9,), progress=False)
    torch.testing.assert_close(maps.map(1, states[:, 1]), states[:, L], atol=1e-4, rtol=1e-4)


def test_maps_agreement_not_below_plain_on_training_data(tiny_view, tiny_states):
    data = tiny_states
    maps = fit_linear_maps(data, tiny_view, progress=False)
    df = layer_agreement(tiny_view, data["states"], data["final_argmax"], maps, model="tiny")
    plain = df[~df.mapped].set_index("layer").agreement
    mapped = df[df.mapped].set_index("layer").agreement
    L = tiny_view.num_layers
    assert plain[L] == 1.0 and mapped[L] == 1.0
    assert mapped.mean() >= plain.mean()
    # labels shortcut gives the same unmapped numbers
    df2 = layer_agreement(tiny_view, data["states"], data["final_argmax"], labels=data["labels"])
    assert df2.agreement.tolist() == pytest.approx(plain.tolist())
