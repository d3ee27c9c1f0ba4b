"""Experiment runners shared by the notebooks: real task prompts, per-layer agreement, and
side-by-side decoding of many exit configurations against the full model.

Every configuration is run on the same prompts in one interleaved loop (full model first, then
each configuration, prompt by prompt), so speed ratios compare runs made under the same machine load.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .data import load_multi30k, load_scitldr, load_squad, scitldr_prompt, squad_prompt
from .decoding import EarlyExitDecoder, ExitConfig
from .metrics import rouge_l, sentence_bleu, squad_f1, textual_consistency
from .model import encode_chat

TASKS = ("squad", "scitldr", "multi30k")


@dataclass
class Prompt:
    """One real task prompt: its id, token ids (1, T) and reference answers/summaries."""
    task: str
    id: str
    ids: torch.Tensor
    references: list[str]


def task_prompts(task: str, n: int, tokenizer, seed: int = 0, max_prompt_tokens: int = 768) -> list[Prompt]:
    """``n`` prompts of ``task`` ('squad': SQuAD v1.1 dev; 'scitldr': SciTLDR-A test), drawn with ``seed``.

    Prompts longer than ``max_prompt_tokens`` are skipped (not truncated) to keep CPU runs bounded.
    """
    if task not in TASKS[:2]:
        raise ValueError(f"unknown task {task!r}; choose one of {TASKS[:2]} (translation: translation_prompts)")
    if task == "squad":
        ds = load_squad()
        make = lambda r: (r["id"], squad_prompt(r["context"], r["question"]), list(r["answers"]))
    else:
        ds = load_scitldr("test")
        make = lambda r: (str(r["paper_id"]), scitldr_prompt(r["source"]), list(r["targets"]))
    if n < 1:
        return []
    order = np.random.default_rng(seed).permutation(len(ds))
    out = []
    for idx in order:
        pid, text, refs = make(ds[int(idx)])
        ids = encode_chat(tokenizer, text)
        if ids.shape[1] <= max_prompt_tokens:
            out.append(Prompt(task, pid, ids, refs))
        if len(out) == n:
            break
    return out


def translation_prompts(tokenizer, n: int | None, split: str = "test_2016_flickr") -> list[Prompt]:
    """The first ``n`` Multi30k EN->FR sentences of ``split`` as encoder inputs (with ``</s>``)."""
    ds = load_multi30k(split)
    n = len(ds) if n is None else min(n, len(ds))
    return [Prompt("multi30k", f"{split}:{i}", tokenizer(ds[i]["en"], return_tensors="pt")["input_ids"],
                   [ds[i]["fr"]]) for i in range(n)]


def quality(task: str, text: str, references: list[str]) -> float:
    """The task's standard metric in [0, 1]: SQuAD F1, ROUGE-L F, or sentence BLEU/100 (multi30k;
    report corpus BLEU with :func:`calm_utils.metrics.bleu` over a whole set)."""
    if task == "squad":
        return squad_f1(text, references)
    if task == "multi30k":
        return sentence_bleu(text, references) / 100.0
    return rouge_l(text, references)


@torch.inference_mode()
def layer_agreement(view, sequences: list[torch.Tensor], model_name: str, starts: list[int] | None = None,
                    text: str = "teacher_forced", max_positions: int | None = 128) -> pd.DataFrame:
    """Share of positions whose layer-i argmax (final norm + shared head) equals the last layer's.

    Teacher-forced over the token sequences (1, T) (CALM's motivation, Sec. 2); with ``starts``,
    only positions ``>= starts[j] - 1`` of sequence j count (those predicting tokens from
    ``starts[j]`` on, e.g. the model's own continuation of a prompt); at most the last ``max_positions``
    positions of each sequence count (the L x T x V head projection is the cost). Columns:
    ``model, text, layer, agreement, n_tokens``; layers 1..L.
    """
    hits = torch.zeros(view.num_layers)
    total = 0
    for j, ids in enumerate(tqdm(sequences, desc=f"layer agreement ({text})")):
        first = 0 if starts is None else starts[j] - 1
        if max_positions is not None:  # the LM head over L x T positions dominates: bound T per sequence
            first = max(first, ids.shape[1] - 1 - max_positions)
        states = view.hidden_states(ids)[1:, first:-1] if starts is not None else view.hidden_states(ids)[1:, first:]
        preds = view.logits(states).argmax(-1)                # (L, T')
        hits += (preds == preds[-1:]).float().sum(-1)
        total += preds.shape[1]
    return pd.DataFrame({"model": model_name, "text": text, "layer": np.arange(1, view.num_layers + 1),
                         "agreement": (hits / max(total, 1)).numpy(), "n_tokens": total})


@dataclass
class Setting:
    """A named decoding configuration: an ExitConfig plus optional measure instance / exit projection."""
    name: str
    config: ExitConfig
    measure: object | None = None
    project: Callable | None = None


def compare_settings(view, prompts: list[Prompt], settings: list[Setting], max_new_tokens: int,
                     consistency_metric: str = "rouge_l", desc: str = "decoding") -> pd.DataFrame:
    """Decode every prompt with the full model and with every setting, interleaved.

    Returns one row per (setting, prompt): ``setting, task, prompt_id, text, n_tokens, avg_exit_layer,
    ms_per_token, prompt_ms, quality, consistency`` (textual consistency with the full model's output),
    plus the per-token ``exit_layers`` list. The full model appears as setting ``'full'``.
    """
    full_setting = Setting("full", ExitConfig(policy="full", max_new_tokens=max_new_tokens))
    decoders = []
    for s in [full_setting, *settings]:
        s.config.max_new_tokens = max_new_tokens
        decoders.append((s.name, EarlyExitDecoder(view, s.config, s.measure, s.project)))
    rows = []
    for p in tqdm(prompts, desc=desc):
        full_text = None
        for name, dec in decoders:
            res = dec.generate(p.ids)
            if name == "full":
                full_text = res.text
            rows.append({
                "setting": name, "task": p.task, "prompt_id": p.id, "text": res.text,
                "n_tokens": len(res.tokens), "avg_exit_layer": res.avg_exit_layer,
                "ms_per_token": res.ms_per_token, "prompt_ms": res.prompt_ms,
                "quality": quality(p.task, res.text, p.references),
                "consistency": textual_consistency(res.text, full_text, consistency_metric),
                "exit_layers": res.exit_layers, "tokens": res.tokens,
            })
    return pd.DataFrame(rows)


def summarize(df: pd.DataFrame, num_layers: int) -> pd.DataFrame:
    """Per setting: mean quality, consistency, average exit layer, token-weighted ms/token, and the
    wall-clock speed-up over the full model in the same run beside the ideal (layer-count) one."""
    g = df.groupby("setting", sort=False)
    out = pd.DataFrame({
        "quality": g["quality"].mean(),
        "consistency": g["consistency"].mean(),
        "avg_exit_layer": g.apply(lambda x: np.average(x["avg_exit_layer"], weights=x["n_tokens"])),
        "ms_per_token": g.apply(lambda x: np.average(x["ms_per_token"], weights=x["n_tokens"])),
        "tokens": g["n_tokens"].sum(),
    })
    full_ms = out.loc["full", "ms_per_token"]
    out["speedup"] = full_ms / out["ms_per_token"]
    out["ideal_speedup"] = num_layers / out["avg_exit_layer"]
    return out.reset_index()
