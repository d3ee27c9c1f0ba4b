"""Train the Multi30k EN->FR T5 backbone with CALM's per-layer loss (or the last-layer ablation).

    python -m calm_utils.train --config full --loss calm --threads 1 --max-minutes 105  # -> checkpoints/t5_calm/
    python -m calm_utils.train --config full --loss last --threads 1 --max-minutes 45   # -> checkpoints/t5_last/
    python -m calm_utils.train --config smoke --loss calm --out /tmp/smoke               # < 1 min, used by tests

Rerunning the same command resumes from the last checkpoint (kept in the git-ignored cache,
see :func:`resume_dir`); a finished run just exits. Outputs in ``--out``:
``model.safetensors`` (best by val BLEU), ``config.json`` (HF T5 config; load with
``calm_utils.t5_model.load_t5``), tokenizer files, ``train_config.json``, ``train_log.csv``.

The step budget for the LR schedule is set from the time budget after ``calib_steps`` steps
(measured s/step, minus an eval allowance) unless ``max_steps`` is given; training stops at
whichever of time / steps / early stopping (``patience`` evals without a better val BLEU) comes first.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import sacrebleu
import torch
from safetensors import safe_open
from safetensors.torch import load_model, save_model
from tqdm import tqdm

from .t5_model import build_t5, calm_loss, greedy_translate, make_t5_config
from .tokenizer import load_tokenizer
from .utils import REPO_ROOT, atomic_write, atomic_write_text, cache_dir, config_hash, set_seed

WEIGHTING = {"calm": "linear", "last": "last"}


@dataclass
class TrainConfig:
    name: str = "t5_calm"
    loss: str = "calm"  # calm: CALM's weighted per-layer CE (w_i ~ i); last: last layer only
    # model (T5 v1.1 style, see t5_model.make_t5_config)
    d_model: int = 256
    d_ff: int = 1024
    num_heads: int = 4
    d_kv: int = 64
    num_layers: int = 3
    num_decoder_layers: int = 8
    vocab_size: int = 8000
    dropout_rate: float = 0.0
    # data (Multi30k task 1, EN -> FR)
    max_train_pairs: int | None = None
    max_len: int = 64  # tokens, incl. </s>
    batch_size: int = 64  # sentence pairs, bucketed by source length
    # optimisation
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 200
    min_lr_frac: float = 0.1  # cosine decay to lr * min_lr_frac
    grad_clip: float = 1.0
    max_minutes: float = 105.0
    max_steps: int | None = None  # None: derived from max_minutes after calib_steps
    calib_steps: int = 30
    eval_allowance: float = 0.08  # share of the time budget reserved for evaluation
    # evaluation / checkpoints
    eval_every_minutes: float = 10.0
    eval_every_steps: int | None = None
    ckpt_every_minutes: float = 5.0
    ckpt_every_steps: int | None = None
    log_every_steps: int = 100
    n_val_loss: int | None = None  # None: all 1014 val pairs
    n_val_bleu: int = 200
    max_new_tokens: int = 64
    patience: int = 5  # evals without a better val BLEU
    seed: int = 0
    threads: int = 1


CONFIGS = {
    "full": TrainConfig(),
    "smoke": TrainConfig(name="smoke", d_model=64, d_ff=256, num_heads=2, d_kv=32, num_layers=2,
                         num_decoder_layers=8, max_train_pairs=2000, batch_size=32, lr=3e-3,
                         warmup_steps=10, max_minutes=2.0, max_steps=60, eval_every_steps=30,
                         ckpt_every_steps=20, log_every_steps=10, n_val_loss=128, n_val_bleu=32,
                         max_new_tokens=32),
}


# ----------------------------------------------------------------------------- data
def load_pairs(split: str, n: int | None = None) -> tuple[list[str], list[str]]:
    from .data import load_multi30k
    ds = load_multi30k(split)
    if n is not None:
        ds = ds.select(range(min(n, len(ds))))
    return list(ds["en"]), list(ds["fr"])


def encode(tok, texts: list[str], max_len: int) -> list[list[int]]:
    return tok(texts, truncation=True, max_length=max_len)["input_ids"]  # each ends with </s>


def epoch_batches(lens: list[tuple[int, int]], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Shuffle, sort by (target, source) length within chunks of 50 batches, cut into batches, shuffle
    batches. Target length first: the 8-layer decoder and the per-layer heads dominate the cost."""
    rng = np.random.default_rng([seed, epoch])
    idx = rng.permutation(len(lens))
    chunk = batch_size * 50
    batches = []
    for c in range(0, len(idx), chunk):
        part = sorted(idx[c:c + chunk], key=lambda i: lens[i])
        batches += [part[b:b + batch_size] for b in range(0, len(part), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def collate(src: list[list[int]], tgt: list[list[int]]) -> dict[str, torch.Tensor]:
    S, T = max(map(len, src)), max(map(len, tgt))
    input_ids = torch.zeros(len(src), S, dtype=torch.long)  # (B, S), pad 0
    labels = torch.full((len(tgt), T), -100, dtype=torch.long)  # (B, T), ignored -100
    for b, (s, t) in enumerate(zip(src, tgt)):
        input_ids[b, :len(s)] = torch.tensor(s)
        labels[b, :len(t)] = torch.tensor(t)
    return {"input_ids": input_ids, "attention_mask": (input_ids != 0).long(), "labels": labels}


# ----------------------------------------------------------------------------- schedule / eval
def lr_at(step: int, total: int, cfg: TrainConfig, time_frac: float = 0.0) -> float:
    """Linear warmup, then cosine decay to lr*min_lr_frac. Progress is the larger of the step
    progress and ``time_frac`` (share of the time budget used; the machine is shared, so the
    measured s/step drifts and the decay must still finish when the time runs out)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    p = min(1.0, max(time_frac, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)))
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * p)))


@torch.no_grad()
def evaluate(model, tok, cfg: TrainConfig, val_src, val_tgt, val_en, val_fr) -> dict:
    """Teacher-forced per-layer val CE (all layers, whatever the training loss) + greedy BLEU."""
    model.eval()
    L = cfg.num_decoder_layers
    tot, ntok = torch.zeros(L), 0
    for b in range(0, len(val_src), 128):
        batch = collate(val_src[b:b + 128], val_tgt[b:b + 128])
        n = int((batch["labels"] != -100).sum())
        _, per_layer = calm_loss(model, batch, "linear")
        tot += per_layer * n
        ntok += n
    ce = tot / ntok
    hyps = greedy_translate(model, tok, val_en[:cfg.n_val_bleu], max_new_tokens=cfg.max_new_tokens)
    bleu = sacrebleu.corpus_bleu(hyps, [val_fr[:cfg.n_val_bleu]]).score
    model.train()
    return {"val_loss": float(ce[-1]), "val_bleu": bleu, **{f"val_ce_{i + 1}": float(ce[i]) for i in range(L)},
            "example": hyps[0]}


# ----------------------------------------------------------------------------- checkpoints
def resume_dir(out: Path) -> Path:
    """Resume state lives in the git-ignored cache (optimizer state is big), keyed by the output dir."""
    out = Path(out).resolve()
    return cache_dir("train_resume", f"{out.name}-{config_hash(str(out), 8)}")


def save_resume(rdir: Path, model, opt, state: dict) -> None:
    """model-<step>.safetensors, then state.pt naming it (each written atomically), then drop old models."""
    fname = f"model-{state['step']:07d}.safetensors"
    atomic_write(rdir / fname, lambda p: save_model(model, str(p), metadata={"step": str(state["step"])}))
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    blob = {**state, "model_file": fname, "optimizer": opt.state_dict(), "rng": rng}
    atomic_write(rdir / "state.pt", lambda p: torch.save(blob, p))
    for f in rdir.glob("model-*.safetensors"):
        if f.name != fname:
            f.unlink()


def load_resume(rdir: Path, model, opt) -> dict | None:
    if not (rdir / "state.pt").exists():
        return None
    blob = torch.load(rdir / "state.pt", weights_only=False)
    with safe_open(str(rdir / blob["model_file"]), "pt") as f:
        assert int(f.metadata()["step"]) == blob["step"]
    load_model(model, str(rdir / blob["model_file"]))
    opt.load_state_dict(blob.pop("optimizer"))
    rng = blob.pop("rng")
    random.setstate(rng["python"]); np.random.set_state(rng["numpy"]); torch.set_rng_state(rng["torch"])
    return blob


def write_log(path: Path, rows: list[dict]) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


# ----------------------------------------------------------------------------- main loop
def train(cfg: TrainConfig, out: Path, stop_after_steps: int | None = None) -> dict:
    torch.set_num_threads(cfg.threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rdir = resume_dir(out)
    set_seed(cfg.seed)
    tok = load_tokenizer()
    mcfg = make_t5_config(cfg.d_model, cfg.d_ff, cfg.num_heads, cfg.d_kv, cfg.num_layers,
                          cfg.num_decoder_layers, cfg.vocab_size, cfg.dropout_rate)
    model = build_t5(mcfg).train()
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))
    # artefacts usable while training runs (model.safetensors appears at the first eval)
    atomic_write_text(out / "train_config.json", json.dumps(asdict(cfg), indent=2))
    atomic_write_text(out / "config.json", mcfg.to_json_string())
    tok.save_pretrained(str(out))

    state = load_resume(rdir, model, opt)
    if state is not None:
        saved = json.loads(json.dumps(state["cfg"]))
        assert saved == asdict(cfg), f"resume dir {rdir} holds a run with a different config"
        print(f"resumed from step {state['step']} ({state['elapsed']:.0f}s) in {rdir}", flush=True)
        if state["done"]:
            print("run already finished", flush=True)
            return state
    else:
        state = {"cfg": asdict(cfg), "step": 0, "epoch": 0, "batch_in_epoch": 0, "elapsed": 0.0,
                 "total_steps": cfg.max_steps, "best_bleu": -1.0, "bad_evals": 0, "rows": [],
                 "tgt_tokens": 0, "done": False, "stop_reason": None}

    tr_en, tr_fr = load_pairs("train", cfg.max_train_pairs)
    va_en, va_fr = load_pairs("val", cfg.n_val_loss)
    tr_src, tr_tgt = encode(tok, tr_en, cfg.max_len), encode(tok, tr_fr, cfg.max_len)
    va_src, va_tgt = encode(tok, va_en, cfg.max_len), encode(tok, va_fr, cfg.max_len)
    lens = [(len(t), len(s)) for s, t in zip(tr_src, tr_tgt)]
    budget = cfg.max_minutes * 60

    t0, elapsed0 = time.time(), state["elapsed"]
    now = lambda: elapsed0 + time.time() - t0  # noqa: E731 (elapsed incl. previous runs)
    # time-based LR progress only when the step budget is itself derived from the time budget
    time_frac = (lambda: now() / budget) if cfg.max_steps is None else (lambda: 0.0)  # noqa: E731
    last_eval, last_ckpt, steps_here = now(), now(), 0
    acc_loss, acc_layers, acc_n, tok_window, t_window = 0.0, torch.zeros(cfg.num_decoder_layers), 0, 0, time.time()
    calib_t = None
    pbar = tqdm(total=state["total_steps"], initial=state["step"], desc=cfg.name, mininterval=5 if sys.stderr.isatty() else 60)

    def do_eval(reason: str) -> None:
        nonlocal last_eval
        ev = evaluate(model, tok, cfg, va_src, va_tgt, va_en, va_fr)
        row = {"step": state["step"], "elapsed_s": round(now(), 1), "epoch": state["epoch"],
               "lr": lr_at(state["step"], state["total_steps"] or 10**9, cfg, time_frac()), "train_loss": "",
               **{k: round(v, 4) for k, v in ev.items() if k != "example"}}
        improved = ev["val_bleu"] > state["best_bleu"]
        if improved:
            state["best_bleu"], state["bad_evals"], state["best_step"] = ev["val_bleu"], 0, state["step"]
            atomic_write(out / "model.safetensors", lambda p: save_model(model, str(p), metadata={"step": str(state["step"])}))
        else:
            state["bad_evals"] += 1
        state["rows"].append(row)
        write_log(out / "train_log.csv", state["rows"])
        tqdm.write(f"[eval {reason}] step {state['step']} t={now() / 60:.1f}min val_loss {ev['val_loss']:.3f} "
                   f"val_bleu {ev['val_bleu']:.2f}{' *best*' if improved else ''} "
                   f"layer CE {[round(ev[f'val_ce_{i + 1}'], 2) for i in range(cfg.num_decoder_layers)]} | {ev['example']}")
        sys.stdout.flush()
        last_eval = now()

    def checkpoint() -> None:
        nonlocal last_ckpt
        state["elapsed"] = now()
        save_resume(rdir, model, opt, state)
        last_ckpt = now()

    while state["stop_reason"] is None:
        batches = epoch_batches(lens, cfg.batch_size, cfg.seed, state["epoch"])
        for bi in range(state["batch_in_epoch"], len(batches)):
            ids = batches[bi]
            batch = collate([tr_src[i] for i in ids], [tr_tgt[i] for i in ids])
            lr = lr_at(state["step"], state["total_steps"] or 10**9, cfg, time_frac())
            for g in opt.param_groups:
                g["lr"] = lr
            loss, per_layer = calm_loss(model, batch, WEIGHTING[cfg.loss])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            ntgt = int((batch["labels"] != -100).sum())
            state["step"] += 1
            state["batch_in_epoch"] = bi + 1
            state["tgt_tokens"] += ntgt
            steps_here += 1
            acc_loss, acc_layers, acc_n, tok_window = acc_loss + loss.item(), acc_layers + per_layer, acc_n + 1, tok_window + ntgt
            pbar.update(1)
            pbar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.2e}", refresh=False)

            # step budget from the time budget, measured over steps 10..calib_steps of the first run
            if state["total_steps"] is None:
                if steps_here == 10:
                    calib_t = (now(), state["step"])
                elif calib_t and state["step"] - calib_t[1] >= cfg.calib_steps - 10:
                    sps = (now() - calib_t[0]) / (state["step"] - calib_t[1])
                    left = budget * (1 - cfg.eval_allowance) - now()
                    state["total_steps"] = max(cfg.warmup_steps + 1, state["step"] + int(left / sps))
                    pbar.total = state["total_steps"]
                    tqdm.write(f"{sps:.2f} s/step -> step budget {state['total_steps']}")

            if state["step"] % cfg.log_every_steps == 0:
                dt = time.time() - t_window
                state["rows"].append({"step": state["step"], "elapsed_s": round(now(), 1), "epoch": state["epoch"],
                                      "lr": lr, "train_loss": round(acc_loss / acc_n, 4),
                                      **{f"train_ce_{i + 1}": round(float(v), 4) for i, v in enumerate(acc_layers / acc_n)},
                                      "tgt_tok_per_s": round(tok_window / dt, 1)})
                acc_loss, acc_layers, acc_n, tok_window, t_window = 0.0, acc_layers * 0, 0, 0, time.time()

            if now() >= budget:
                state["stop_reason"] = "time budget"
            elif state["total_steps"] is not None and state["step"] >= state["total_steps"]:
                state["stop_reason"] = "step budget"
            eval_due = (state["step"] % cfg.eval_every_steps == 0) if cfg.eval_every_steps else \
                now() - last_eval >= cfg.eval_every_minutes * 60
            if eval_due or state["stop_reason"]:
                do_eval(state["stop_reason"] or "periodic")
                if state["bad_evals"] >= cfg.patience and not state["stop_reason"]:
                    state["stop_reason"] = f"early stopping (no better val BLEU in {cfg.patience} evals)"
            ckpt_due = (state["step"] % cfg.ckpt_every_steps == 0) if cfg.ckpt_every_steps else \
                now() - last_ckpt >= cfg.ckpt_every_minutes * 60
            if state["stop_reason"]:
                break
            if stop_after_steps is not None and steps_here >= stop_after_steps:  # simulated interruption
                checkpoint()
                pbar.close()
                return state
            if ckpt_due:
                checkpoint()
        else:
            state["epoch"] += 1
            state["batch_in_epoch"] = 0
    pbar.close()
    state["done"] = True
    checkpoint()
    write_log(out / "train_log.csv", state["rows"])
    tps = state["tgt_tokens"] / max(1e-9, state["elapsed"])
    print(f"done ({state['stop_reason']}): step {state['step']}, {state['elapsed'] / 60:.1f} min, "
          f"{tps:.0f} target tok/s, best val BLEU {state['best_bleu']:.2f} at step {state.get('best_step')}", flush=True)
    return state


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", choices=sorted(CONFIGS), default="full")
    ap.add_argument("--loss", choices=sorted(WEIGHTING), default="calm")
    ap.add_argument("--out", type=Path, default=None, help="default checkpoints/<t5_calm|t5_last|smoke_calm...>")
    ap.add_argument("--max-minutes", type=float, default=None)
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stop-after-steps", type=int, default=None, help="testing: checkpoint and exit after N steps")
    a = ap.parse_args(argv)
    base = asdict(CONFIGS[a.config])
    name = f"t5_{a.loss}" if a.config == "full" else f"{a.config}_{a.loss}"
    cfg = TrainConfig(**{**base, "name": name, "loss": a.loss, "threads": a.threads, "seed": a.seed,
                         **({"max_minutes": a.max_minutes} if a.max_minutes is not None else {}),
                         **({"max_steps": a.max_steps} if a.max_steps is not None else {})})
    train(cfg, a.out or REPO_ROOT / "checkpoints" / name, a.stop_after_steps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
