"""T5 backbone, CALM loss and the resumable trainer (smoke config, ~1 min on 1 CPU thread)."""
from __future__ import annotations

import csv
import json
from dataclasses import asdict

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_model

from calm_utils.t5_model import build_t5, calm_loss, layer_logits, layer_weights, load_t5, make_t5_config
from calm_utils.tokenizer import load_tokenizer
from calm_utils.train import CONFIGS, TrainConfig, main, resume_dir

torch.set_num_threads(1)


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    model = build_t5(make_t5_config(d_model=32, d_ff=64, num_heads=2, d_kv=16, num_layers=2,
                                    num_decoder_layers=4, vocab_size=50)).eval()
    with torch.no_grad():  # a non-trivial final norm: a norm applied twice / not at all would show
        model.decoder.final_layer_norm.weight.copy_(torch.rand(32) * 2 + 0.2)
    return model


def tiny_batch():
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, 50, (3, 7), generator=g)
    input_ids[0, 5:] = 0
    labels = torch.randint(3, 50, (3, 6), generator=g)
    labels[1, 4:] = -100
    return {"input_ids": input_ids, "attention_mask": (input_ids != 0).long(), "labels": labels}


def test_tokenizer_specials_and_roundtrip():
    tok = load_tokenizer()
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id, len(tok)) == (0, 1, 2, 8000)
    s = "Deux jeunes hommes blancs sont dehors près de buissons."
    ids = tok(s)["input_ids"]
    assert ids[-1] == 1 and tok.decode(ids, skip_special_tokens=True) == s


def test_untied_head_and_init():
    cfg = make_t5_config()
    model = build_t5(cfg)
    assert model.lm_head.weight.data_ptr() != model.shared.weight.data_ptr()
    assert abs(model.lm_head.weight.std().item() - 256 ** -0.5) < 2e-3


def test_layer_logits_match_model():
    model, batch = tiny_model(), tiny_batch()
    out = model(**batch, output_hidden_states=True)
    hs = out.decoder_hidden_states
    L = model.config.num_decoder_layers
    assert len(hs) == L + 1
    torch.testing.assert_close(layer_logits(model, hs, L), out.logits, rtol=0, atol=1e-5)
    # layer L's entry is already normed: applying the norm again would change the logits
    assert not torch.allclose(model.lm_head(model.decoder.final_layer_norm(hs[L])), out.logits, atol=1e-3)
    # an intermediate layer = final norm + head on the raw block output, captured independently
    raw = {}
    h = model.decoder.block[1].register_forward_hook(lambda m, i, o: raw.update(h=o[0]))  # returns None
    model(**batch)
    h.remove()
    torch.testing.assert_close(layer_logits(model, hs, 2), model.lm_head(model.decoder.final_layer_norm(raw["h"])))
    # calm_loss: last-layer CE equals HF's loss; weights proportional to i
    loss, per_layer = calm_loss(model, batch, "linear")
    torch.testing.assert_close(per_layer[-1], out.loss)
    ce2 = torch.nn.functional.cross_entropy(layer_logits(model, hs, 2).flatten(0, 1), batch["labels"].flatten())
    torch.testing.assert_close(per_layer[1], ce2)
    w = layer_weights(L, "linear")
    torch.testing.assert_close(w, torch.arange(1, L + 1) / (L * (L + 1) / 2))
    torch.testing.assert_close(loss.detach(), (w * per_layer).sum())
    loss_last, pl_last = calm_loss(model, batch, "last")
    torch.testing.assert_close(loss_last, out.loss)
    assert torch.isnan(pl_last[:-1]).all()


def test_load_t5_roundtrip(tmp_path):
    model, batch = tiny_model(), tiny_batch()
    (tmp_path / "config.json").write_text(model.config.to_json_string())
    save_model(model, str(tmp_path / "model.safetensors"))
    m2, tok = load_t5(tmp_path)
    assert not m2.training and m2.lm_head.weight.data_ptr() != m2.shared.weight.data_ptr()
    torch.testing.assert_close(m2(**batch).logits, model(**batch).logits)
    assert tok.pad_token_id == 0


def test_train_config_json_roundtrip():
    for cfg in CONFIGS.values():
        assert TrainConfig(**json.loads(json.dumps(asdict(cfg)))) == cfg


def _no_tmp_files(*dirs):
    return not [p for d in dirs for p in d.iterdir() if p.name.endswith(".tmp")]


def test_smoke_train_resume(tmp_path, monkeypatch):
    monkeypatch.setenv("CALM_CACHE_DIR", str(tmp_path / "cache"))
    args = ["--config", "smoke", "--max-steps", "16", "--threads", "1"]
    ref, res = tmp_path / "ref", tmp_path / "res"
    main(args + ["--out", str(ref)])
    # interrupted after 7 steps (checkpointed), then the same command resumes and finishes
    main(args + ["--out", str(res), "--stop-after-steps", "7"])
    rdir = resume_dir(res)
    state = torch.load(rdir / "state.pt", weights_only=False)
    assert state["step"] == 7 and not state["done"]
    with safe_open(str(rdir / state["model_file"]), "pt") as f:
        assert f.metadata()["step"] == "7"
    assert _no_tmp_files(res, rdir)
    main(args + ["--out", str(res)])
    state = torch.load(rdir / "state.pt", weights_only=False)
    assert state["step"] == 16 and state["done"]
    assert len(list(rdir.glob("model-*.safetensors"))) == 1 and _no_tmp_files(res, rdir)
    # the resumed run is identical to the uninterrupted one
    a, b = load_file(str(ref / "model.safetensors")), load_file(str(res / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    for d in (ref, res):
        assert {"model.safetensors", "config.json", "train_config.json", "train_log.csv",
                "tokenizer.json"} <= {p.name for p in d.iterdir()}
        cfg = TrainConfig(**json.loads((d / "train_config.json").read_text()))
        assert cfg.name == "smoke_calm" and cfg.max_steps == 16
        model, _ = load_t5(d)
        assert model.config.num_decoder_layers == 8 and not model.training
    log = (res / "train_log.csv").read_text().splitlines()
    steps = [int(r.split(",")[0]) for r in log[1:]]
    assert steps == sorted(steps) and steps[-1] == 16 and "val_bleu" in log[0]
    last = [list(csv.DictReader((d / "train_log.csv").open()))[-1] for d in (ref, res)]
    assert last[0]["val_loss"] == last[1]["val_loss"] and last[0]["val_bleu"] == last[1]["val_bleu"]
