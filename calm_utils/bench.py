"""Wall-clock benchmark of early-exit decoding against HF ``generate`` (issue 7).

    python -m calm_utils.bench --model smollm2-135m|t5_calm [--device cpu|cuda] [--prompts N]
        [--max-new M] [--repeats R] [--threads T] [--smoke] [--out figures/speed]

Besides the defaults, the full setting benchmarks the study's own choices, read from the notebooks' tables
(``study_configs``): the learned exit heads and linear maps of notebook 02 at their matched-consistency
thresholds, and the Learn-then-Test thresholds of notebook 01 (T5); ``--no-study`` leaves them out.

Or from a notebook: ``run_bench(load_subject("smollm2-135m"), default_configs("smollm2-135m"))``.

What is timed (batch size 1, greedy):

- ``hf_generate``: ``model.generate`` (T5: with ``EncoderDecoderCache(DynamicCache(), DynamicCache())``).
  ms/token = wall time of the whole call (prompt/encoder pass included) / generated tokens.
- ``full`` and every early-exit configuration: ``EarlyExitDecoder.generate``; ms/token = wall time of
  the whole call *including the prompt (decoder-only) or encoder (T5) pass* / generated tokens, so both
  sides pay for the same work and the comparison is fair.

The timed runs are INTERLEAVED: for every repeat and prompt, HF generate and every configuration run
back to back, so all of them see the same machine load. Per configuration we report the median ms/token
over (prompt, repeat) runs with its IQR, and the speed-up as the median of the paired ratios
``ms_hf / ms_config`` (same prompt, same repeat).

A separate profiling pass (never mixed with the timed runs) wraps the view, its session and the
confidence measure with synchronised timers and counts every call: decoder layers, LM head
(full-vocabulary or restricted rows, also inside a measure), confidence (the measure's own work, the
nested LM head excluded), state propagation, prompt pass, and the rest (embedding, Python loop).
Exclusive times give the breakdown ``t_prompt, t_layers, t_head, t_conf, t_prop, t_other`` (ms per
generated token; they sum to the profiled total by construction, ``t_other`` = remainder).

Ideal speed-up: the predicted time of a configuration is ``prompt + sum_k count_k * unit_k + other``
where ``count_k`` are the calls it made (from the exits it took) and ``unit_k`` the calibrated cost of
one call of component ``k`` (median over the profiling pass of all configurations; confidence cost per
measure); ``ideal_speedup = predicted(full) / predicted(config)`` (1 for ``full`` by definition) and
``realized_over_ideal = speedup_vs_full / ideal_speedup``, where ``speedup_vs_full`` is the realized
speed-up over our own decoder with exits off (median of paired ratios); below 1 means overhead that the
component costs do not explain. ``speedup`` (over HF generate) = ``speedup_vs_full`` x (HF / our full). ``bound_speedup`` is the speed-up if only the exit layers, one head call
and the propagation were paid (free confidence): the headroom of the exits themselves.

Outputs: ``<out>.csv`` (one row per configuration), ``<out>_runs.csv`` (every timed run), ``<out>.json``
(sidecar: threads, device, load average before/after, unit costs, settings) and ``<out>.png/.pdf``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch

from .confidence import ConfidenceMeasure
from .decoding import EarlyExitDecoder, ExitConfig
from .utils import REPO_ROOT, cache_dir, scale_layer

COMPONENTS = ("prompt", "layers", "head", "conf", "prop", "other")
COUNTS = ("n_layers", "n_head", "n_head_batch", "n_head_rows", "n_conf", "n_prop")


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


# ---- what is benchmarked ------------------------------------------------------------------------
@dataclass
class BenchPrompt:
    ids: torch.Tensor            # (1, T)
    references: list[str]
    task: str


@dataclass
class Subject:
    """A model under test: its layer-wise view, an HF generate function and the prompts."""
    name: str
    view: object
    hf_generate: Callable[[torch.Tensor, int], list[int]]   # (ids, max_new) -> generated ids
    prompts: list[BenchPrompt]
    consistency_metric: str       # 'rouge_l' (SmolLM2) or 'bleu' (T5)
    device: torch.device
    decode: Callable[[list[int]], str] = None
    extra: dict = field(default_factory=dict)


def _strip_eos(tokens: list[int], eos: set[int]) -> list[int]:
    for j, t in enumerate(tokens):
        if t in eos:
            return tokens[:j + 1]
    return tokens


def subject_from_causal_lm(model, tokenizer, prompts: list[BenchPrompt], name: str = "model",
                           consistency_metric: str = "rouge_l") -> Subject:
    from .layerwise import LayerwiseLM
    view = LayerwiseLM(model, tokenizer)
    pad = getattr(model.generation_config, "pad_token_id", None)
    if pad is None:
        pad = next(iter(view.eos_ids), 0)

    def hf(ids, n):
        out = model.generate(ids, max_new_tokens=n, do_sample=False, num_beams=1, min_new_tokens=0,
                             pad_token_id=pad, attention_mask=torch.ones_like(ids))
        return _strip_eos(out[0, ids.shape[1]:].tolist(), view.eos_ids)

    dec = (lambda t: tokenizer.decode(t, skip_special_tokens=True)) if tokenizer is not None else (lambda t: " ".join(map(str, t)))
    return Subject(name, view, hf, prompts, consistency_metric, view.device, dec)


def subject_from_t5(model, tokenizer, prompts: list[BenchPrompt], name: str = "t5") -> Subject:
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache
    from .t5_layerwise import LayerwiseT5
    view = LayerwiseT5(model, tokenizer)

    def hf(ids, n):
        out = model.generate(ids, do_sample=False, num_beams=1, max_new_tokens=n, min_new_tokens=0,
                             cache=EncoderDecoderCache(DynamicCache(), DynamicCache()))
        return _strip_eos(out[0, 1:].tolist(), view.eos_ids)

    dec = (lambda t: tokenizer.decode(t, skip_special_tokens=True)) if tokenizer is not None else (lambda t: " ".join(map(str, t)))
    return Subject(name, view, hf, prompts, "bleu", view.device, dec)


def load_subject(model: str, device: str = "cpu", n_prompts: int = 6) -> Subject:
    """``smollm2-135m``: n/2 SQuAD + n/2 SciTLDR chat prompts (``task_prompts``);
    ``t5_calm`` (or a checkpoint folder): the first n Multi30k test_2016_flickr sentences (en -> fr)."""
    dev = torch.device(device)
    if model.startswith("t5"):
        from .data import load_multi30k
        from .t5_model import load_t5
        path = Path(model) if Path(model).exists() else REPO_ROOT / "checkpoints" / model
        m, tok = load_t5(path)
        m.to(dev)
        ds = load_multi30k("test_2016_flickr")
        prompts = [BenchPrompt(tok(ds[i]["en"], return_tensors="pt", truncation=True, max_length=128)["input_ids"].to(dev),
                               [ds[i]["fr"]], "multi30k") for i in range(min(n_prompts, len(ds)))]
        s = subject_from_t5(m, tok, prompts, name=path.name)
        s.extra["checkpoint"] = str(path)
        return s
    from .experiments import task_prompts
    from .model import load_model
    m, tok = load_model(model, device=dev)
    n1 = (n_prompts + 1) // 2
    ps = [BenchPrompt(p.ids.to(dev), p.references, p.task) for p in task_prompts("squad", n1, tok)]
    ps += [BenchPrompt(p.ids.to(dev), p.references, p.task) for p in task_prompts("scitldr", n_prompts - n1, tok)]
    return subject_from_causal_lm(m, tok, ps, name=model)


def default_configs(model: str, num_layers: int, smoke: bool = False) -> dict[str, dict]:
    """Named ``ExitConfig`` keyword sets (``max_new_tokens`` is added by the runner)."""
    L = num_layers
    if smoke:
        return {"full": dict(policy="full"),
                f"static_{max(1, L // 2)}": dict(policy="static", static_layer=max(1, L // 2)),
                "oracle": dict(policy="oracle"),
                "softmax_diff_0.5": dict(policy="confidence", measure="softmax_diff", threshold=0.5),
                "state_0.9": dict(policy="confidence", measure="state", threshold=0.9),
                "topk_diff_0.5": dict(policy="confidence", measure="topk_diff", threshold=0.5,
                                      measure_kwargs={"k": 8}, min_exit_layer=2)}
    if model.startswith("t5"):
        c = {"full": dict(policy="full"), "oracle": dict(policy="oracle")}
        for s in (2, 3, 4, 5, 6):
            if s < L:
                c[f"static_{s}"] = dict(policy="static", static_layer=s)
        for th in (0.9, 0.7, 0.5):
            c[f"softmax_diff_{th}"] = dict(policy="confidence", measure="softmax_diff", threshold=th)
        for th in (0.9, 0.7):
            c[f"softmax_max_{th}"] = dict(policy="confidence", measure="softmax_max", threshold=th)
        for th in (0.9, 0.7):
            c[f"topk_diff_{th}"] = dict(policy="confidence", measure="topk_diff", threshold=th, measure_kwargs={"k": 16})
        for th, m in ((0.7, 4), (0.5, 3)):   # CALM's minimum exit layer: no exits from the weakest layers
            c[f"topk_diff_{th}_min{m}"] = dict(policy="confidence", measure="topk_diff", threshold=th,
                                               measure_kwargs={"k": 16}, min_exit_layer=m)
        c["state_0.99"] = dict(policy="confidence", measure="state", threshold=0.99)
        return c
    # SmolLM2 (frozen, L=30): few early layers agree with the last one; check late layers only
    # (layer numbers chosen for 30 layers, moved to the same relative depth for another model)
    s = {n: scale_layer(n, L) for n in (16, 20, 22, 27)}
    return {"full": dict(policy="full"),
            "oracle": dict(policy="oracle"),
            f"static_{s[20]}": dict(policy="static", static_layer=s[20]),
            f"static_{s[27]}": dict(policy="static", static_layer=s[27]),
            f"softmax_diff_0.9_min{s[20]}": dict(policy="confidence", measure="softmax_diff", threshold=0.9,
                                                 min_exit_layer=s[20]),
            f"softmax_diff_0.7_min{s[22]}": dict(policy="confidence", measure="softmax_diff", threshold=0.7,
                                                 min_exit_layer=s[22], exit_interval=2),
            f"softmax_max_0.9_min{s[20]}": dict(policy="confidence", measure="softmax_max", threshold=0.9,
                                                min_exit_layer=s[20]),
            f"topk_diff_0.9_min{s[16]}": dict(policy="confidence", measure="topk_diff", threshold=0.9,
                                              min_exit_layer=s[16], measure_kwargs={"k": 64}),
            f"topk_diff_0.7_min{s[16]}": dict(policy="confidence", measure="topk_diff", threshold=0.7,
                                              min_exit_layer=s[16], measure_kwargs={"k": 64}),
            f"state_0.99_min{s[16]}": dict(policy="confidence", measure="state", threshold=0.99, min_exit_layer=s[16])}


# exit settings of the study's notebooks, read from their tables (name in figures/*.csv -> bench model)
_STUDY_MODEL = {"smollm2-135m": "smollm2-135m", "t5_calm": "t5-calm"}
SMOL_HEAD_CHECKS = dict(min_exit_layer=14, exit_interval=3)   # as notebook 02 (SMOL_MIN_EXIT, SMOL_INTERVAL)


def study_configs(model: str, figures: Path | None = None, log: Callable[[str], None] = print) -> dict[str, dict]:
    """Configurations whose thresholds the study's notebooks chose, read from ``figures/``:

    - learned exit heads (notebook 02, ``exit_matched.csv``): the linear and attention heads, without and with
      linear maps, at the lowest-exit threshold whose measured consistency reached each level;
    - Learn-then-Test thresholds (notebook 01, ``calibration_t5.csv``; T5 only: on SmolLM2 LTT certified no
      threshold below 1 at the study's calibration sizes): textual consistency, every delta with a threshold < 1.

    A head config carries ``head`` (kind) and ``maps`` (bool); ``run_bench`` needs ``extras`` with the trained
    heads and maps then (:func:`study_extras`). Missing tables are skipped with a message."""
    figures = Path(figures) if figures is not None else REPO_ROOT / "figures"
    key = _STUDY_MODEL.get(model)
    out: dict[str, dict] = {}
    if key is None:
        return out
    matched = figures / "exit_matched.csv"
    if matched.exists():
        m = pd.read_csv(matched)
        m = m[(m.model == key) & m.reached.astype(bool) & m.measure.isin(["linear", "attention"])]
        for (measure, maps, th), g in m.groupby(["measure", "maps", "threshold"], sort=True):
            lvl = g.level.max()
            name = f"{measure}{'+maps' if maps else ''}_{th:.3g}(c>={lvl:g})"
            kw = dict(policy="confidence", threshold=float(th), head=measure, maps=bool(maps))
            if key == "smollm2-135m":
                kw.update(SMOL_HEAD_CHECKS)
            out[name] = kw
    else:
        log(f"study_configs: {matched} missing (run notebook 02): no learned-head configurations")
    cal = figures / "calibration_t5.csv"
    if key == "t5-calm":
        if cal.exists():
            c = pd.read_csv(cal)
            c = c[(c.method == "ltt") & (c.constraint == "textual") & (c.threshold < 1)]
            for _, r in c.iterrows():
                measure, kwargs = r.measure, {}
                if "(k=" in measure:
                    kwargs = {"k": int(measure.split("(k=")[1].rstrip(")"))}
                    measure = measure.split("(")[0]
                out[f"ltt_{r.measure}_d{r.delta:g}"] = dict(policy="confidence", measure=measure,
                                                         threshold=float(r.threshold), measure_kwargs=kwargs)
        else:
            log(f"study_configs: {cal} missing (run notebook 01): no LTT configurations")
    return out


def study_extras(model: str, view, tokenizer, smoke: bool = False) -> dict:
    """The trained exit heads and linear maps of notebook 02 (cached artefacts; computed if absent)."""
    from . import exit_study as es
    art = (es.t5_artefacts(view, tokenizer, smoke) if model.startswith("t5")
           else es.smollm2_artefacts(view, tokenizer, smoke))
    return {"heads": art["heads"], "maps": art["maps"]}


# ---- profiling wrappers (profiling pass only) ---------------------------------------------------
class Profiler:
    """Exclusive-time accumulator with a stack: time spent in a nested region counts to that region only."""

    def __init__(self, device):
        self.device = device
        self.times = {c: 0.0 for c in COMPONENTS}
        self.counts: dict[str, int] = {}
        self._stack: list[list] = []  # [category, start, child_time]

    def call(self, cat: str, fn, *args, count: str | None = None, **kwargs):
        _sync(self.device)
        self._stack.append([cat, time.perf_counter(), 0.0])
        try:
            return fn(*args, **kwargs)
        finally:
            _sync(self.device)
            c, t0, child = self._stack.pop()
            dt = time.perf_counter() - t0
            self.times[c] += dt - child
            if self._stack:
                self._stack[-1][2] += dt
            key = count or cat
            self.counts[key] = self.counts.get(key, 0) + 1


class ProfiledSession:
    def __init__(self, inner, prof: Profiler):
        self._s, self._p = inner, prof

    def embed(self, token):
        return self._p.call("other", self._s.embed, token, count="embed")

    def layer(self, i, h):
        return self._p.call("layers", self._s.layer, i, h)

    def propagate(self, i, h):
        return self._p.call("prop", self._s.propagate, i, h)

    def rewind(self, i):
        return self._s.rewind(i)

    def __getattr__(self, a):
        return getattr(self._s, a)


class ProfiledView:
    """Delegates to a layer-wise view; times ``start`` (prompt/encoder pass), ``logits`` (LM head, full or
    restricted rows) and wraps the session it returns."""

    def __init__(self, inner, prof: Profiler):
        self._v, self._p = inner, prof

    def start(self, ids, max_new_tokens):
        s, h = self._p.call("prompt", self._v.start, ids, max_new_tokens)
        return ProfiledSession(s, self._p), h

    def logits(self, h, rows=None):
        # one (n, d) call with n > 1 (the oracle's every-layer check) is costed on its own: memory-bound,
        # it costs neither one single-vector call nor n of them
        batched = rows is None and h.dim() == 2 and h.shape[0] > 1
        count = "head_batch" if batched else ("head" if rows is None else "head_rows")
        return self._p.call("head", self._v.logits, h, rows, count=count)

    def __getattr__(self, a):
        return getattr(self._v, a)


class ProfiledMeasure(ConfidenceMeasure):
    def __init__(self, inner: ConfidenceMeasure, prof: Profiler):
        self._m, self._p = inner, prof
        self.name = inner.name

    def start_token(self):
        self._m.start_token()

    def __call__(self, ctx):
        return self._p.call("conf", self._m, ctx)

    def describe(self):
        return self._m.describe()


# ---- runner ---------------------------------------------------------------------------------------
def _iqr(x) -> float:
    q1, q3 = np.percentile(x, [25, 75])
    return float(q3 - q1)


def _decoder(view, kwargs: dict, max_new: int, extras: dict | None = None) -> EarlyExitDecoder:
    """``kwargs``: ``ExitConfig`` fields, plus ``head`` (a trained head's kind) and ``maps`` (project through the
    linear maps), resolved from ``extras`` (:func:`study_extras`)."""
    kw = dict(kwargs)
    head, maps = kw.pop("head", None), kw.pop("maps", False)
    measure = project = None
    if head is not None or maps:
        if not extras:
            raise ValueError(f"configuration {kwargs} needs the trained heads/maps: pass extras=study_extras(...)")
        if head is not None:
            from .heads import HeadMeasure
            measure = HeadMeasure(extras["heads"][head])
        if maps:  # the study's maps, projecting through this (possibly profiled) view
            from .linear_maps import LinearMaps
            lm = extras["maps"]
            project = LinearMaps(lm.W, view, lm.alphas).project
    return EarlyExitDecoder(view, ExitConfig(max_new_tokens=max_new, **kw), measure, project)


def timed_runs(subject: Subject, configs: dict[str, dict], max_new: int, repeats: int,
               log: Callable[[str], None] = print) -> tuple[pd.DataFrame, dict]:
    """Interleaved timed runs; returns (one row per run, {config: [tokens per prompt]} from repeat 0)."""
    view, dev = subject.view, subject.device
    decs = {name: _decoder(view, kw, max_new, subject.extra.get("study")) for name, kw in configs.items()}
    rows, outputs = [], {"hf_generate": [], **{n: [] for n in configs}}
    with torch.inference_mode():
        # warm-up (allocator, rotary/bias tables, lazy inits) on the first prompt, untimed
        subject.hf_generate(subject.prompts[0].ids, 2)
        for d in decs.values():
            d.generate(subject.prompts[0].ids)
        for r in range(repeats):
            for p_i, p in enumerate(subject.prompts):
                _sync(dev)
                t0 = time.perf_counter()
                toks = subject.hf_generate(p.ids, max_new)
                _sync(dev)
                dt = time.perf_counter() - t0
                rows.append(dict(config="hf_generate", prompt=p_i, repeat=r, tokens=len(toks), total_ms=dt * 1e3))
                if r == 0:
                    outputs["hf_generate"].append(toks)
                for name, d in decs.items():
                    _sync(dev)
                    t0 = time.perf_counter()
                    res = d.generate(p.ids)
                    _sync(dev)
                    dt = time.perf_counter() - t0
                    rows.append(dict(config=name, prompt=p_i, repeat=r, tokens=len(res.tokens), total_ms=dt * 1e3,
                                     prompt_ms=res.prompt_ms, avg_exit_layer=res.avg_exit_layer))
                    if r == 0:
                        outputs[name].append(res.tokens)
            log(f"repeat {r + 1}/{repeats} done, load {os.getloadavg()[0]:.2f}")
    df = pd.DataFrame(rows)
    df["ms_per_token"] = df.total_ms / df.tokens.clip(lower=1)
    return df, outputs


def profile_pass(subject: Subject, configs: dict[str, dict], max_new: int) -> pd.DataFrame:
    """One untimed-for-speed pass per (config, prompt) with the profiling wrappers: exclusive ms per
    component and call counts."""
    rows = []
    with torch.inference_mode():
        for name, kw in configs.items():
            for p_i, p in enumerate(subject.prompts):
                prof = Profiler(subject.device)
                pv = ProfiledView(subject.view, prof)
                d = _decoder(pv, kw, max_new, subject.extra.get("study"))
                if d.measure is not None:
                    d.measure = ProfiledMeasure(d.measure, prof)
                _sync(subject.device)
                t0 = time.perf_counter()
                res = d.generate(p.ids)
                _sync(subject.device)
                total = (time.perf_counter() - t0) * 1e3
                ms = {f"t_{c}": v * 1e3 for c, v in prof.times.items()}
                ms["t_other"] = total - sum(v for k, v in ms.items() if k != "t_other")  # remainder (incl. embed)
                rows.append(dict(config=name, prompt=p_i, tokens=len(res.tokens), profiled_ms=total,
                                 measure=(d.measure.name if d.measure is not None else ""),
                                 exit_layers=list(res.exit_layers), **ms,
                                 **{f"n_{k}": v for k, v in prof.counts.items()}))
    df = pd.DataFrame(rows)
    for k in COUNTS + ("n_embed",):
        if k not in df:
            df[k] = 0
    return df.fillna({k: 0 for k in df.columns if k.startswith("n_")})


def unit_costs(prof: pd.DataFrame) -> dict:
    """Calibrated cost (ms) of one call of each component, from the profiling pass (ratios of sums)."""
    s = prof.sum(numeric_only=True)
    u = {"layer": s.t_layers / max(s.n_layers, 1), "prop": s.t_prop / max(s.n_prop, 1) if s.n_prop else 0.0}
    # head: full-vocabulary calls dominate; restricted-row calls get their own cost from configs with rows
    full_only = prof[(prof.n_head_rows == 0) & (prof.n_head_batch == 0)]
    u["head"] = full_only.t_head.sum() / max(full_only.n_head.sum(), 1)
    for kind in ("head_rows", "head_batch"):   # restricted rows (top-k); one (L-1)-vector call (oracle)
        g = prof[prof[f"n_{kind}"] > 0]
        u[kind] = (max(0.0, (g.t_head.sum() - u["head"] * g.n_head.sum()) / g[f"n_{kind}"].sum())
                   if len(g) else 0.0)
    u["conf"] = {m: g.t_conf.sum() / max(g.n_conf.sum(), 1) for m, g in prof[prof.n_conf > 0].groupby("measure")}
    full = prof[prof.config == "full"]
    u["other_per_token"] = (full.t_other.sum() / full.tokens.sum()) if len(full) else 0.0
    u["prompt_per_prompt"] = {int(p): float(t) for p, t in zip(full.prompt, full.t_prompt)}
    return u


def _predicted_ms(row, u: dict, counts: dict) -> float:
    conf_u = u["conf"].get(row["measure"], 0.0) if row["measure"] else 0.0
    return (u["prompt_per_prompt"].get(int(row["prompt"]), row["t_prompt"]) + counts["n_layers"] * u["layer"]
            + counts["n_head"] * u["head"] + counts["n_head_rows"] * u["head_rows"]
            + counts["n_head_batch"] * u["head_batch"] + counts["n_conf"] * conf_u
            + counts["n_prop"] * u["prop"] + row["tokens"] * u["other_per_token"])


def _bound_counts(row, L: int, first_is_prompt: bool) -> dict:
    """Calls if only the exit layers were paid: exit layers + one head + propagation, no confidence."""
    ex = row["exit_layers"][1:] if first_is_prompt else row["exit_layers"]
    return dict(n_layers=sum(ex), n_head=len(ex), n_head_batch=0, n_head_rows=0, n_conf=0,
                n_prop=sum(L - e for e in ex))


def decode_columns(runs: pd.DataFrame, first_is_prompt: bool) -> pd.DataFrame:
    """Per configuration of ours: ``decode_ms_per_token`` (median of (total - prompt pass) / decoded steps) and
    ``speedup_decode_vs_full`` (median paired ratio with ``full``). ms/token *including* the prompt pass
    favours configurations whose (different) outputs are longer, since the prompt cost is spread over more
    tokens; these columns remove that confound."""
    g = runs[runs.config != "hf_generate"].copy()
    steps = (g.tokens - (1 if first_is_prompt else 0)).clip(lower=1)
    g["decode_ms"] = (g.total_ms - g.prompt_ms) / steps
    full = g[g.config == "full"].set_index(["prompt", "repeat"]).decode_ms
    out = []
    for name, d in g.groupby("config", sort=False):
        ratio = full.loc[list(zip(d.prompt, d["repeat"]))].to_numpy() / d.decode_ms.to_numpy()
        out.append(dict(config=name, decode_ms_per_token=float(d.decode_ms.median()),
                        speedup_decode_vs_full=float(np.median(ratio))))
    return pd.DataFrame(out)


def summarize(subject: Subject, runs: pd.DataFrame, outputs: dict, prof: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    from .metrics import bleu, textual_consistency
    from .experiments import quality as task_quality
    L = subject.view.num_layers
    first_is_prompt = not hasattr(subject.view, "decoder_start_token_id")
    u = unit_costs(prof)
    hf = runs[runs.config == "hf_generate"].set_index(["prompt", "repeat"]).ms_per_token
    full_ms = runs[runs.config == "full"].set_index(["prompt", "repeat"]).ms_per_token
    texts = {n: [subject.decode(t) for t in toks] for n, toks in outputs.items()}
    full_texts = texts["full"]
    pred = {}
    for _, row in prof.iterrows():
        counts = {k: row[k] for k in COUNTS}
        pred.setdefault(row.config, []).append((_predicted_ms(row, u, counts),
                                                _predicted_ms(row, u, _bound_counts(row, L, first_is_prompt)),
                                                row.tokens))
    full_pred = sum(p for p, _, _ in pred["full"]) / sum(t for _, _, t in pred["full"])
    out = []
    for name in ["hf_generate"] + [c for c in outputs if c != "hf_generate"]:
        g = runs[runs.config == name]
        ms = g.ms_per_token.to_numpy()
        paired = (hf.loc[list(zip(g.prompt, g["repeat"]))].to_numpy() / ms)
        paired_full = (full_ms.loc[list(zip(g.prompt, g["repeat"]))].to_numpy() / ms)
        row = dict(model=subject.name, config=name, ms_per_token=float(np.median(ms)), ms_iqr=_iqr(ms),
                   speedup=float(np.median(paired)), speedup_iqr=_iqr(paired),
                   speedup_vs_full=float(np.median(paired_full)), tokens=float(g.tokens.mean()))
        if subject.consistency_metric == "bleu":
            row["consistency"] = bleu(texts[name], full_texts) / 100.0
            row["task_metric"] = bleu(texts[name], [p.references[0] for p in subject.prompts])
            row["task_metric_name"] = "bleu"
        else:
            row["consistency"] = float(np.mean([textual_consistency(a, b, subject.consistency_metric)
                                                for a, b in zip(texts[name], full_texts)]))
            row["task_metric"] = float(np.mean([task_quality(p.task, t, p.references)
                                                for p, t in zip(subject.prompts, texts[name])]))
            row["task_metric_name"] = "squad_f1|rouge_l"
        row["quality"] = row["consistency"]
        row["same_tokens_as_hf"] = float(np.mean([a == b for a, b in zip(outputs[name], outputs["hf_generate"])]))
        if name in pred:
            pg = prof[prof.config == name]
            ntok = pg.tokens.sum()
            p_ms = sum(p for p, _, _ in pred[name]) / ntok
            b_ms = sum(b for _, b, _ in pred[name]) / ntok
            row["ideal_speedup"] = full_pred / p_ms
            row["bound_speedup"] = full_pred / b_ms
            row["realized_over_ideal"] = row["speedup_vs_full"] / row["ideal_speedup"]
            ex = [e for lst in pg.exit_layers for e in (lst[1:] if first_is_prompt else lst)]
            row["avg_exit_layer"] = float(np.mean(ex)) if ex else float(L)
            row["profiled_ms_per_token"] = pg.profiled_ms.sum() / ntok
            for c in COMPONENTS:
                row[f"t_{c}"] = pg[f"t_{c}"].sum() / ntok
            for k in COUNTS:
                row[k + "_per_token"] = pg[k].sum() / ntok
        else:
            row.update(ideal_speedup=np.nan, realized_over_ideal=np.nan, avg_exit_layer=float(L))
        out.append(row)
    df = pd.DataFrame(out).merge(decode_columns(runs, first_is_prompt), on="config", how="left")
    cols = ["model", "config", "ms_per_token", "speedup", "ideal_speedup", "quality", "realized_over_ideal",
            "avg_exit_layer", "consistency", "ms_iqr", "t_layers", "t_head", "t_conf", "t_prop", "t_other", "t_prompt"]
    df = df[cols + [c for c in df.columns if c not in cols]]
    u_json = {k: v for k, v in u.items() if k != "prompt_per_prompt"}
    return df, u_json


def plot(df: pd.DataFrame, path: Path) -> None:
    """Per model (one row each): stacked breakdown bars and realized vs ideal speed-up."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    models = list(dict.fromkeys(df.model))
    fig, axes = plt.subplots(len(models), 2, figsize=(13, 4.8 * len(models)), squeeze=False)
    for m, ax_row in zip(models, axes):
        _plot_model(df[df.model == m].reset_index(drop=True), ax_row)
    fig.tight_layout()
    for ext in ("png", "pdf"):
        fig.savefig(path.with_suffix(f".{ext}"), dpi=120, bbox_inches="tight")
    plt.close(fig)


def _plot_model(df: pd.DataFrame, axes) -> None:
    d = df[df.config != "hf_generate"].reset_index(drop=True)
    ax = axes[0]
    bottom = np.zeros(len(d))
    for c, col in zip(COMPONENTS, ["#999999", "#4c72b0", "#dd8452", "#c44e52", "#8172b3", "#55a868"]):
        v = d[f"t_{c}"].fillna(0).to_numpy()
        ax.bar(d.config, v, bottom=bottom, label=c, color=col)
        bottom += v
    hf_ms = df.loc[df.config == "hf_generate", "ms_per_token"]
    if len(hf_ms):
        ax.axhline(float(hf_ms.iloc[0]), color="k", ls="--", lw=1, label="HF generate (timed)")
    ax.set_ylabel("ms per generated token (profiling pass)")
    ax.set_title(f"{df.model.iloc[0]}: time breakdown")
    ax.tick_params(axis="x", rotation=60)
    ax.legend(fontsize=8)
    ax = axes[1]
    ax.scatter(d.ideal_speedup, d.speedup_vs_full, c=d.consistency, cmap="viridis", vmin=0, vmax=1, label="vs our full")
    ax.scatter(d.ideal_speedup, d.speedup, marker="x", c="grey", s=18, label="vs HF generate")
    for _, r in d.iterrows():
        ax.annotate(f"{r.config} ({r.consistency:.2f})", (r.ideal_speedup, r.speedup_vs_full), fontsize=7)
    lim = [0, max(1.2, float(np.nanmax(d[["ideal_speedup", "speedup", "speedup_vs_full"]].to_numpy())) * 1.1)]
    ax.plot(lim, lim, "k:", lw=1)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_xlabel("ideal speed-up over our full decoder (component costs x calls)")
    ax.set_ylabel("realized speed-up (dots: over our full; x: over HF)")
    ax.set_title(f"{df.model.iloc[0]}: realized vs ideal (label: consistency)")


def combine(figures: Path = REPO_ROOT / "figures") -> pd.DataFrame | None:
    """``figures/speed.csv`` + ``speed.png/.pdf``: every per-model ``speed_<model>.csv`` (not smoke) together."""
    parts = [pd.read_csv(p) for p in sorted(figures.glob("speed_*.csv"))
             if not p.stem.endswith(("_runs", "_profile", "_smoke"))]
    if not parts:
        return None
    df = pd.concat(parts, ignore_index=True)
    df.to_csv(figures / "speed.csv", index=False, float_format="%.6g")
    plot(df, figures / "speed")
    return df


def run_bench(subject: Subject, configs: dict[str, dict], max_new: int = 32, repeats: int = 3,
              out: str | Path | None = None, log: Callable[[str], None] = print, settings: dict | None = None):
    """Timed interleaved runs + profiling pass + summary; writes ``out``.csv/_runs.csv/.json/.png/.pdf when
    ``out`` is given. Returns (summary DataFrame, sidecar dict)."""
    if "full" not in configs:
        raise ValueError("configs must include 'full' (the reference for consistency and ideal speed-up)")
    load0 = os.getloadavg()
    t0 = time.time()
    runs, outputs = timed_runs(subject, configs, max_new, repeats, log)
    log(f"timed runs: {time.time() - t0:.0f} s; profiling pass")
    prof = profile_pass(subject, configs, max_new)
    df, units = summarize(subject, runs, outputs, prof)
    side = dict(model=subject.name, device=str(subject.device), torch_threads=torch.get_num_threads(),
                torch_version=torch.__version__, platform=platform.platform(), cpu_count=os.cpu_count(),
                loadavg_before=load0, loadavg_after=os.getloadavg(), wall_s=time.time() - t0,
                n_prompts=len(subject.prompts), prompt_lens=[int(p.ids.shape[1]) for p in subject.prompts],
                max_new=max_new, repeats=repeats, unit_costs_ms=units, configs=configs,
                date=time.strftime("%Y-%m-%d %H:%M:%S"),
                **{k: v for k, v in subject.extra.items() if k != "study"}, **(settings or {}))
    if subject.device.type == "cuda":
        side["gpu"] = torch.cuda.get_device_name(subject.device)
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        df.to_csv(out.with_suffix(".csv"), index=False, float_format="%.6g")
        runs.to_csv(out.parent / f"{out.name}_runs.csv", index=False, float_format="%.6g")
        prof.assign(exit_layers=prof.exit_layers.map(lambda x: " ".join(map(str, x)))).to_csv(out.parent / f"{out.name}_profile.csv", index=False, float_format="%.6g")
        out.with_suffix(".json").write_text(json.dumps(side, indent=2, default=str))
        plot(df, out)
    return df, side


def hotpath_compare(n_prompts: int = 4, max_new: int = 24, repeats: int = 3, out: str | Path | None = None) -> dict:
    """Before/after of the lean layer path on SmolLM2: HF generate, our decoder calling the HF layer modules
    (``LayerwiseLM(lean=False)``, the old path) and the lean path, interleaved; plus one layer call at
    position ~200. Medians (ms)."""
    import statistics as st
    from .experiments import task_prompts
    from .layerwise import LayerwiseLM
    from .model import load_model
    m, tok = load_model("smollm2-135m", device="cpu")
    views = {"hf_layer_call": LayerwiseLM(m, tok, lean=False), "lean": LayerwiseLM(m, tok, lean=True)}
    n1 = (n_prompts + 1) // 2
    ps = task_prompts("squad", n1, tok) + task_prompts("scitldr", n_prompts - n1, tok)
    res = {k: {"total_ms_per_tok": [], "step_ms": []} for k in ["hf_generate", *views]}
    load0 = os.getloadavg()
    with torch.inference_mode():
        for _ in range(repeats):
            for p in ps:
                t = time.perf_counter()
                o = m.generate(p.ids, max_new_tokens=max_new, do_sample=False, pad_token_id=2)
                n = o.shape[1] - p.ids.shape[1]
                res["hf_generate"]["total_ms_per_tok"].append((time.perf_counter() - t) * 1e3 / n)
                for k, v in views.items():
                    t = time.perf_counter()
                    r = _decoder(v, dict(policy="full"), max_new).generate(p.ids)
                    res[k]["total_ms_per_tok"].append((time.perf_counter() - t) * 1e3 / len(r.tokens))
                    res[k]["step_ms"].extend(r.token_ms[1:])
                    if r.tokens != o[0, p.ids.shape[1]:].tolist()[:len(r.tokens)]:
                        raise AssertionError(f"{k}: tokens differ from HF generate")
        lay = {k: [] for k in views}
        s, _ = views["lean"].start(ps[0].ids, 8)
        h = s.embed(5)
        for _ in range(5):
            for k, v in views.items():
                for _ in range(100):
                    t = time.perf_counter()
                    v.layer(3, h, s.cache, s._p)
                    lay[k].append((time.perf_counter() - t) * 1e3)
                    s.cache.lengths[3] -= 1
    summary = {k: {"total_ms_per_tok_median": st.median(d["total_ms_per_tok"]),
                   "decode_step_ms_median": st.median(d["step_ms"]) if d["step_ms"] else None} for k, d in res.items()}
    for k in views:
        summary[k]["layer_ms_median"] = st.median(lay[k])
    summary["meta"] = dict(threads=torch.get_num_threads(), loadavg_before=load0, loadavg_after=os.getloadavg(),
                           prompts=len(ps), repeats=repeats, max_new=max_new, date=time.strftime("%F %T"))
    if out is not None:
        Path(out).write_text(json.dumps(summary, indent=1))
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="smollm2-135m | t5_calm | a T5 checkpoint folder")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--max-new", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--smoke", action="store_true", help="2 prompts, 8 tokens, 1 repeat, few configs")
    ap.add_argument("--no-study", action="store_true", help="only the default configurations (no learned heads "
                    "or thresholds read from the notebooks' tables)")
    ap.add_argument("--out", default=None, help="output stem (default figures/speed_<model>)")
    ap.add_argument("--hotpath", action="store_true", help="only the lean-path before/after (SmolLM2) -> "
                    "figures/speed_hotpath.json")
    a = ap.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available on this machine")
    torch.set_num_threads(a.threads)
    if a.hotpath:
        print(json.dumps(hotpath_compare(out=REPO_ROOT / "figures" / "speed_hotpath.json"), indent=1))
        return 0
    if a.smoke:
        a.prompts, a.max_new, a.repeats = 2, 8, 1
    subject = load_subject(a.model, a.device, a.prompts)
    configs = default_configs(a.model, subject.view.num_layers, a.smoke)
    if not a.smoke and not a.no_study:
        extra = study_configs(a.model)
        if extra:
            configs.update(extra)
            if any("head" in kw or kw.get("maps") for kw in extra.values()):
                subject.extra["study"] = study_extras(a.model, subject.view, subject.view.tokenizer)
    tag = Path(a.model).name.replace("-", "").replace(".", "")
    # smoke runs never touch the committed figures/ (the same folder as plotting.figures_dir in the notebooks)
    out = a.out or str((cache_dir("figures_smoke") if a.smoke else REPO_ROOT / "figures")
                       / (f"speed_{tag}" + ("_smoke" if a.smoke else "")))
    df, side = run_bench(subject, configs, a.max_new, a.repeats, out, settings=dict(threads_arg=a.threads, smoke=a.smoke))
    if not a.smoke and a.out is None:
        combine()
    with pd.option_context("display.width", 200, "display.max_columns", 30):
        print(df[["config", "ms_per_token", "ms_iqr", "speedup", "speedup_vs_full", "speedup_decode_vs_full", "ideal_speedup", "realized_over_ideal",
                  "bound_speedup", "consistency", "task_metric", "avg_exit_layer", "t_prompt", "t_layers", "t_head",
                  "t_conf", "t_prop", "t_other"]].round(3).to_string(index=False))
    print(json.dumps({k: side[k] for k in ("torch_threads", "device", "loadavg_before", "loadavg_after", "wall_s")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
