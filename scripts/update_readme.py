"""Regenerate the README's results block from the tables in figures/ (never typed by hand).

    python scripts/update_readme.py          # rewrites the text between the results markers in README.md

Each subsection is written only if its table exists; every number comes from a CSV that a notebook or
script of this repository wrote.
"""
from __future__ import annotations

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


def sections() -> list[str]:
    out = []
    if (agree := _read("layer_agreement")) is not None:
        piv = agree.pivot_table(index="layer", columns="text", values="agreement").reset_index()
        piv = piv[piv.layer.isin([1, 5, 10, 15, 20, 25, 28, 29, 30])]
        out.append("### CALM's premise on a frozen pretrained model (SmolLM2-135M)\n\nShare of tokens whose "
                   "layer-i prediction (final norm + shared head) equals the last layer's "
                   "(`figures/layer_agreement.csv`, notebook 01):\n\n" + _md(piv) + "\n\n" + _img("layer_agreement"))
    if (maps := _read("layer_agreement_maps")) is not None:
        piv = maps.pivot_table(index="layer", columns="mapped", values="agreement").reset_index()
        piv.columns = ["layer", "plain", "linear map"] if len(piv.columns) == 3 else piv.columns
        piv = piv[piv.layer.isin([5, 10, 15, 20, 25, 29])]
        out.append("With a ridge-regression linear map per layer (\"Jump to Conclusions\"; held-out tokens, "
                   "`figures/layer_agreement_maps.csv`):\n\n" + _md(piv))
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
