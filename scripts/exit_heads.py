"""Learned exit heads and linear maps on SmolLM2 (issue 4).

Collects per-layer states of the model's own greedy continuations (train: SQuAD dev rows
0..n and SciTLDR train rows 0..m; held-out: SQuAD dev rows from 5000 and SciTLDR train rows
from 1000), fits "Jump to Conclusions" linear maps, trains linear / MLP / attention exit heads,
and writes (to ``--out-dir``, default ``.cache/exit_heads/``; notebook 02 runs the same study, with the same cached
artefacts, and writes the study's tables to ``figures/``)

- ``figures/exit_heads_auc.csv``        model,measure,layer,auc   (held-out ROC-AUC of predicting the
                                        consistency label, layers 1..L-1)
- ``figures/layer_agreement_maps.csv``  model,layer,agreement,mapped (held-out)
- ``figures/exit_head_cost.csv``        model,head,params,us_per_call,decoder_layer_us

States, heads and maps are cached (``.cache/states``, ``.cache/heads``) and reused.
``--smoke``: tiny sizes (< 2 min). Full default: 60+30 train prompts, 20+10 held-out, 32 new tokens.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

torch.set_num_threads(1)

import pandas as pd  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

from calm_utils.collect import collect_states  # noqa: E402
from calm_utils.exit_study import state_cosine  # noqa: E402
from calm_utils.data import load_scitldr, load_squad, scitldr_prompt, squad_prompt  # noqa: E402
from calm_utils.heads import KINDS, predict, time_head_call, train_head  # noqa: E402
from calm_utils.confidence import ExitContext, SoftmaxDiff  # noqa: E402
from calm_utils.layerwise import LayerwiseLM  # noqa: E402
from calm_utils.linear_maps import fit_linear_maps, layer_agreement  # noqa: E402
from calm_utils.model import encode_chat, load_model  # noqa: E402
from calm_utils.utils import REPO_ROOT, atomic_write_text, cache_dir  # noqa: E402


def prompts(tok, squad, scitldr, sq_rows, sci_rows):
    out = [encode_chat(tok, squad_prompt(squad[i]["context"], squad[i]["question"])) for i in sq_rows]
    out += [encode_chat(tok, scitldr_prompt(scitldr[i]["source"])) for i in sci_rows]
    return out


def auc_rows(model, name, scores, labels, L):
    rows = []
    for l in range(1, L):
        y = labels[:, l - 1].numpy()
        auc = float("nan") if y.min() == y.max() else roc_auc_score(y, scores[:, l - 1].numpy())
        rows.append((model, name, l, auc))
    return rows


@torch.no_grad()
def decoder_layer_us(view, layer: int, repeats: int = 200) -> float:
    ids = torch.randint(100, 1000, (1, 32))
    cache = view.new_cache(64)
    view.prefill(ids, cache)
    h = view.embed(ids[:, :1])
    pos = view.positions(32)
    for _ in range(10):
        view.layer(layer, h, cache, pos)
        cache.lengths[layer] -= 1
    t0 = time.perf_counter()
    for _ in range(repeats):
        view.layer(layer, h, cache, pos)
        cache.lengths[layer] -= 1
    return (time.perf_counter() - t0) / repeats * 1e6


@torch.no_grad()
def softmax_diff_us(view, history, repeats: int = 20) -> float:
    m, ctx = SoftmaxDiff(), ExitContext(lambda layer, h, rows: view.logits(h, rows))
    ctx.history = history
    t0 = time.perf_counter()
    for _ in range(repeats):
        m(ctx.at(15, history[15]))
    return (time.perf_counter() - t0) / repeats * 1e6


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--squad", type=int, default=60)
    ap.add_argument("--scitldr", type=int, default=30)
    ap.add_argument("--held-squad", type=int, default=20)
    ap.add_argument("--held-scitldr", type=int, default=10)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--out-dir", default=None, help="where the tables go (default .cache/exit_heads/, smoke: "
                    "runs/exit_heads_smoke/; notebook 02 writes the study's copies to figures/)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.squad, args.scitldr, args.held_squad, args.held_scitldr = 4, 2, 2, 1
        args.max_new_tokens, args.epochs = 12, 3
    if args.out_dir is not None:
        out = Path(args.out_dir)
    else:
        out = REPO_ROOT / "runs" / "exit_heads_smoke" if args.smoke else cache_dir("exit_heads")
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    tag = "smoke_" if args.smoke else ""

    model, tok = load_model(args.model, device="cpu")
    view = LayerwiseLM(model, tok)
    L = view.num_layers
    squad, scitldr = load_squad(), load_scitldr("train")
    train_p = prompts(tok, squad, scitldr, range(args.squad), range(args.scitldr))
    held_p = prompts(tok, squad, scitldr, range(5000, 5000 + args.held_squad), range(1000, 1000 + args.held_scitldr))
    train = collect_states(view, train_p, args.max_new_tokens, name=f"{tag}exit_train")
    held = collect_states(view, held_p, args.max_new_tokens, name=f"{tag}exit_heldout")
    print(f"[states] train {train['meta']['tokens']} tokens, held-out {held['meta']['tokens']} tokens, "
          f"teacher-forced==generated {train['meta']['agree_with_generated']:.3f} "
          f"({time.time() - t_start:.0f}s)", flush=True)

    maps = fit_linear_maps(train, view, name=tag)
    print(f"[maps] alphas per layer: {maps.alphas} ({time.time() - t_start:.0f}s)", flush=True)
    agree = layer_agreement(view, held["states"], held["final_argmax"], maps, model=args.model,
                            labels=held["labels"], progress=True)
    agree.to_csv(out / "layer_agreement_maps.csv", index=False)
    print(f"[agreement] written ({time.time() - t_start:.0f}s)", flush=True)

    heads = {}
    for kind in KINDS:
        heads[kind] = train_head(kind, train, epochs=args.epochs, lr=args.lr, seed=0, name=tag)
        print(f"[head] {kind}: {heads[kind].num_params()} params ({time.time() - t_start:.0f}s)", flush=True)

    y = held["labels"]
    rows = auc_rows(args.model, "softmax_max", held["softmax_max"], y, L)
    rows += auc_rows(args.model, "softmax_diff", held["softmax_diff"], y, L)
    rows += auc_rows(args.model, "state", state_cosine(held["states"]), y, L)
    for kind, head in heads.items():
        rows += auc_rows(args.model, kind, predict(head, held["states"]), y, L)
    auc = pd.DataFrame(rows, columns=["model", "measure", "layer", "auc"])
    auc.to_csv(out / "exit_heads_auc.csv", index=False)

    history = list(held["states"][0].float())
    layer_us = decoder_layer_us(view, L // 2)
    cost = [(args.model, kind, head.num_params(), time_head_call(head, history), layer_us) for kind, head in heads.items()]
    cost.append((args.model, "softmax_diff", 0, softmax_diff_us(view, history), layer_us))
    cost = pd.DataFrame(cost, columns=["model", "head", "params", "us_per_call", "decoder_layer_us"])
    cost.to_csv(out / "exit_head_cost.csv", index=False)

    print("\nmean held-out AUC over layers 1..L-1:")
    print(auc.groupby("measure").auc.mean().round(3).to_string())
    pick = [l for l in (1, 5, 10, 15, 20, 25, 29) if l < L]
    print(auc[auc.layer.isin(pick)].pivot(index="layer", columns="measure", values="auc").round(3).to_string())
    print("\nagreement with the final prediction (held-out):")
    print(agree[agree.layer.isin(pick + [L])].pivot(index="layer", columns="mapped", values="agreement").round(3).to_string())
    print("\n" + cost.round(1).to_string(index=False))
    print(f"\ndone in {time.time() - t_start:.0f}s; outputs in {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
