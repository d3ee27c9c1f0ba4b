"""Regenerate the README's results block from the tables in figures/ (never typed by hand).

    python scripts/update_readme.py          # rewrites the text between the results markers in README.md

Each subsection is written only if its table exists; every number comes from a CSV that a notebook or
script of this repository wrote.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
FIG = ROOT / "figures"
START, END = "<!-- results:start -->", "<!-- results:end -->"


def _md(df: pd.DataFrame, digits: int = 2) -> str:
    df = df.copy()
    for c in df.select_dtypes("number").columns:
        df[c] = df[c].map(lambda v: "" if pd.isna(v) else f"{v:.{digits}f}" if isinstance(v, float) else str(v))
    head = "| " + " | ".join(map(str, df.columns)) + " |"
    sep = "|" + "---|" * len(df.columns)
    rows = ["| " + " | ".join(map(str, r)) + " |" for r in df.itertuples(index=False)]
    return "\n".join([head, sep, *rows])


def _read(name: str) -> pd.DataFrame | None:
    path = FIG / f"{name}.csv"
    return pd.read_csv(path) if path.exists() else None


def _img(name: str) -> str:
    return f"![{name}](figures/{name}.png)" if (FIG / f"{name}.png").exists() else ""


def _best_speed(speed: pd.DataFrame, model: str, level: float, adaptive: bool = False) -> tuple[str, str]:
    """Best wall-clock speed-up over HF generate among configs of ``model`` with consistency >= level
    (T5: also BLEU within 1.0 of the full model's); ``adaptive``: per-token exits only (no static layer)."""
    d = speed[(speed.model == model) & ~speed.config.isin(["hf_generate", "oracle", "full"])]
    if adaptive:
        d = d[~d.config.str.startswith("static")]
    ok = d[d.consistency >= level]
    if model.startswith("t5") and "task_metric" in d:
        full = float(speed.loc[(speed.model == model) & (speed.config == "full"), "task_metric"].iloc[0])
        ok = ok[ok.task_metric >= full - 1.0]
    if not len(ok):
        return "no early-exit configuration reached it", ""
    r = ok.sort_values("speedup").iloc[-1]
    return (f"{r.speedup:.2f}x ({r.config}; over our full decoder {r.speedup_vs_full:.2f}x, ideal {r.ideal_speedup:.2f}x; "
            f"consistency {r.consistency:.2f})"), r.config


def headline() -> str:
    """One table of the study's key measurements, each read from its CSV (rows whose table is missing are left out)."""
    rows = []
    if (a := _read("layer_agreement")) is not None:
        g = a[a.text == "generated"].set_index("layer").agreement if "generated" in set(a.text) else a.set_index("layer").agreement
        L = int(g.index.max())
        rows.append(("SmolLM2: share of generated tokens whose layer-15 / layer-(L-1) prediction is final",
                     f"{g.get(15, float('nan')):.2f} / {g.get(L - 1, float('nan')):.2f}", "layer_agreement.csv"))
    if (tl := _read("translation_layers")) is not None:
        p = tl.pivot_table(index="layer", columns="loss", values="bleu")
        if {"calm", "last"} <= set(p.columns):
            rows.append(("T5 BLEU exiting every token at layer 2 / full depth: CALM loss vs last-layer loss",
                         f"{p.calm.get(2):.1f} vs {p['last'].get(2):.1f} / {p.calm.iloc[-1]:.1f} vs {p['last'].iloc[-1]:.1f}",
                         "translation_layers.csv"))
    if (auc := _read("exit_heads_auc")) is not None:
        m = auc.groupby(["model", "measure"]).auc.mean()
        for model in dict.fromkeys(auc.model):
            if (model, "attention") in m and (model, "linear") in m:
                rows.append((f"{model}: mean held-out AUC, attention head vs linear head vs softmax_diff",
                             f"{m[model, 'attention']:.3f} vs {m[model, 'linear']:.3f} vs {m.get((model, 'softmax_diff'), float('nan')):.3f}",
                             "exit_heads_auc.csv"))
    if (tk := _read("topk_cost")) is not None and "conf_frac_layer" in tk:
        for model, g in tk.groupby("model", sort=False):
            small = g[g.k <= 128]
            full = g[g.k == g.V]
            if len(small) and len(full):
                rows.append((f"{model}: confidence call / decoder layer, k <= 128 vs full vocabulary",
                             f"{small.conf_frac_layer.min():.1%}-{small.conf_frac_layer.max():.1%} vs "
                             f"{full.conf_frac_layer.iloc[0]:.0%}", "topk_cost.csv"))
    if (cal := _read("calibration_t5")) is not None:
        c = cal[(cal.constraint == "textual") & (cal.delta == 0.3)]
        for measure, g in c.groupby("measure"):
            lt, nv = g[g.method == "ltt"], g[g.method == "naive"]
            if len(lt) and len(nv):
                rows.append((f"T5 {measure}, δ = 0.3: valid-split fraction, LTT vs naive threshold",
                             f"{lt.valid_fraction.iloc[0]:.2f} vs {nv.valid_fraction.iloc[0]:.2f}", "calibration_t5.csv"))
    if (speed := _read("speed")) is not None:
        for model in dict.fromkeys(speed.model):
            d = speed[speed.model == model].set_index("config")
            if "full" in d.index:
                rows.append((f"{model}: our decoder with exits off vs HF generate (same tokens: "
                             f"{d.loc['full', 'same_tokens_as_hf']:.0%})", f"{d.loc['full', 'speedup']:.2f}x", "speed.csv"))
            if model.startswith("t5"):
                for adaptive in (False, True):
                    txt, _ = _best_speed(speed, model, 0.0, adaptive)
                    kind = "per-token (confidence) exit" if adaptive else "early-exit"
                    rows.append((f"{model}: best {kind} speed-up over HF generate at BLEU within 1.0 of full depth",
                                 txt, "speed.csv"))
            else:
                for level in (0.9, 0.8, 0.6):
                    txt, _ = _best_speed(speed, model, level)
                    rows.append((f"{model}: best early-exit speed-up over HF generate at consistency >= {level}",
                                 txt, "speed.csv"))
    if (ll := _read("lossless")) is not None:
        g = ll[ll.method == "lossless"]
        for model, d in g.groupby("model", sort=False):
            r = d.sort_values("speedup").iloc[-1]
            rows.append((f"{model}: lossless CALM (exits verified by the full model), best speed-up over HF generate",
                         f"{r.speedup:.2f}x ({r.setting}; identical output: {bool(r.identical)})", "lossless.csv"))
    if speed is not None and "realized_over_ideal" in speed:
        r = speed.dropna(subset=["realized_over_ideal"])
        r = r[r.config != "full"]
        if len(r):
            rows.append(("benchmark: realized / ideal speed-up over all early-exit configurations (min-max)",
                         f"{r.realized_over_ideal.min():.2f}-{r.realized_over_ideal.max():.2f}", "speed.csv"))
    if not rows:
        return ""
    df = pd.DataFrame(rows, columns=["measurement", "value", "table (figures/)"])
    return "### Headline numbers\n\n" + _md(df)


def reproduce_time() -> str:
    path = FIG / "reproduce_time.json"
    if not path.exists():
        return ""
    rec = json.loads(path.read_text())
    run = rec.get("full_run")
    if run is None:
        return ""
    steps = ", ".join(f"{s['label']} {s['minutes']:.1f}" for s in run["steps"])
    return (f"The last full reproduction (`make reproduce`, every step executed, {run['cpu_count']} CPU cores) took "
            f"**{run['total_minutes']:.0f} minutes** on {run['date'][:10]} (minutes per step: {steps}; "
            "`figures/reproduce_time.json`).")


def sections() -> list[str]:
    out = [s for s in (headline(), reproduce_time()) if s]
    if (agree := _read("layer_agreement")) is not None:
        piv = agree.pivot_table(index="layer", columns="text", values="agreement").reset_index()
        piv = piv[piv.layer.isin([1, 5, 10, 15, 20, 25, 28, 29, 30])]
        out.append("### CALM's premise on a frozen pretrained model (SmolLM2-135M)\n\nShare of tokens whose "
                   "layer-i prediction (final norm + shared head) equals the last layer's "
                   "(`figures/layer_agreement.csv`, notebook 01):\n\n" + _md(piv) + "\n\n" + _img("layer_agreement"))
    if (maps := _read("exit_agreement")) is not None:
        maps = maps[maps.model == maps.model.iloc[0]]   # the decoder-only model (notebook 02 lists it first)
        piv = maps.pivot_table(index="layer", columns="mapped", values="agreement").reset_index()
        piv.columns = ["layer", "plain", "linear map"] if len(piv.columns) == 3 else piv.columns
        piv = piv[piv.layer.isin([5, 10, 15, 20, 25, 29])]
        out.append("With a ridge-regression linear map per layer (\"Jump to Conclusions\"; held-out tokens, "
                   "`figures/exit_agreement.csv`, notebook 02):\n\n" + _md(piv))
    if (tl := _read("translation_layers")) is not None:
        piv = tl.pivot_table(index="layer", columns="loss", values="bleu").reset_index()
        out.append("### The CALM-trained T5 (Multi30k EN→FR)\n\nBLEU (sacrebleu, test_2016_flickr subset) when every "
                   "token exits at layer i, for CALM's weighted per-layer loss and the last-layer-loss ablation "
                   "(`figures/translation_layers.csv`):\n\n" + _md(piv) + "\n\n" + _img("translation_layers"))
    if (te := _read("translation_exits")) is not None:
        cols = ["setting", "avg_exit_layer", "bleu", "consistency", "ms_per_token", "speedup", "ideal_speedup"]
        out.append("Oracle and confidence-based exits on the CALM-trained T5, speed-up over the full model measured in "
                   "the same run (`figures/translation_exits.csv`):\n\n" + _md(te[cols]) + "\n\n" + _img("translation_exits"))
    if (cal := _read("calibration")) is not None:
        sel = cal[(cal.method == "ltt") & (cal.constraint == "textual") & (cal.delta.isin([0.1, 0.2]))]
        cols = ["model", "task", "measure", "delta", "threshold", "avg_layers", "speedup", "test_risk", "valid_fraction"]
        out.append("### Learn-then-Test calibration (ε = 0.05, 50 random 80/20 splits)\n\nTextual consistency "
                   "constraint, δ ∈ {0.1, 0.2} (`figures/calibration.csv`; all δ, the risk constraint and naive tuning "
                   "are in the file and notebook 01):\n\n" + _md(sel[cols]))
    if (auc := _read("exit_heads_auc")) is not None:
        piv = auc.groupby(["model", "measure"])["auc"].mean().unstack("model").reset_index()
        out.append("### Exit heads: does the layer history help?\n\nMean held-out ROC-AUC over layers of predicting "
                   "consistency with the last layer (`figures/exit_heads_auc.csv`, notebook 02):\n\n" + _md(piv, 3))
    if (cost := _read("exit_head_cost")) is not None:
        out.append("Cost per call (`figures/exit_head_cost.csv`):\n\n" + _md(cost))
    if (topk := _read("topk_cost")) is not None:
        cols = [c for c in ["model", "k", "conf_us", "full_conf_us", "layer_us", "miss_rate", "token_ms",
                            "consistency", "speedup", "ideal_speedup"] if c in topk.columns]
        out.append("### Top-k vocabulary restriction\n\n(`figures/topk_cost.csv`, notebook 03):\n\n" + _md(topk[cols]))
    if (speed := _read("speed")) is not None:
        cols = [c for c in ["model", "config", "ms_per_token", "speedup", "ideal_speedup", "realized_over_ideal",
                            "avg_exit_layer", "quality"] if c in speed.columns]
        out.append("### Wall-clock speed (benchmark, `python -m calm_utils.bench`)\n\nSpeed-up over HF `generate` "
                   "measured interleaved in one run, beside the ideal speed-up predicted from measured component costs "
                   "(`figures/speed.csv`):\n\n" + _md(speed[cols]) + "\n\n" + _img("speed"))
    return out


def main() -> int:
    readme = ROOT / "README.md"
    text = readme.read_text()
    block = START + "\n<!-- generated by scripts/update_readme.py from figures/*.csv; do not edit by hand -->\n\n" \
        + "\n\n".join(sections()) + "\n\n" + END
    if START in text:
        text = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    readme.write_text(text)
    print(f"README results block: {len(sections())} sections")
    return 0


if __name__ == "__main__":
    sys.exit(main())
