"""Figures of the study. Every ``save_*`` writes the PNG and PDF beside the table behind it."""
from __future__ import annotations

import html
from pathlib import Path

import matplotlib

matplotlib.use("Agg") if not matplotlib.get_backend().lower().startswith(("module://", "inline")) else None
import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from .utils import (DEFAULT_MODEL, REPO_ROOT, atomic_write, atomic_write_text, cache_dir, model_slug, smoke_mode,
                    study_model)

FIGURES = REPO_ROOT / "figures"


def figures_dir() -> Path:
    """``figures/`` for the full setting; in the smoke setting (``CALM_SMOKE=1``, CI) a git-ignored
    ``.cache/figures_smoke/``, so a local ``make test`` never overwrites the study's committed results.
    With another model than the default (``$CALM_MODEL``), a subfolder named after it."""
    base = cache_dir("figures_smoke") if smoke_mode() else FIGURES
    model = study_model()
    if model != DEFAULT_MODEL:
        base = base / model_slug(model)
        base.mkdir(parents=True, exist_ok=True)
    return base


def save_table(df: pd.DataFrame, name: str) -> Path:
    """Write ``<figures_dir>/<name>.csv`` atomically (the table behind a figure or a number)."""
    return atomic_write(figures_dir() / f"{name}.csv", lambda p: df.to_csv(p, index=False, float_format="%.6g"))


def read_table(name: str) -> pd.DataFrame:
    """Read ``<figures_dir>/<name>.csv`` (in the smoke setting falling back to the committed ``figures/``);
    a clear error says how to produce a missing table."""
    path = figures_dir() / f"{name}.csv"
    if not path.exists():
        path = FIGURES / f"{name}.csv"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run the notebook or script that writes it first "
                                "(see README.md, 'How to read it'), e.g. `python scripts/reproduce.py`")
    return pd.read_csv(path)


def save_figure(fig, name: str) -> None:
    """Write ``<figures_dir>/<name>.png`` and ``.pdf``."""
    for ext in ("png", "pdf"):
        atomic_write(figures_dir() / f"{name}.{ext}",
                     lambda p, e=ext: fig.savefig(p, format=e, bbox_inches="tight", dpi=120))


def plot_agreement(df: pd.DataFrame, ax=None, hue: str = "model", style: str | None = None):
    """Per-layer agreement with the last layer (columns ``layer, agreement`` + ``hue``)."""
    ax = ax or plt.subplots(figsize=(6, 3.5))[1]
    sns.lineplot(data=df, x="layer", y="agreement", hue=hue, style=style, marker="o", ax=ax)
    ax.set(ylabel="share of tokens = last layer's argmax", ylim=(0, 1.02))
    return ax


def plot_exit_histogram(exits: pd.DataFrame, num_layers: int, ax=None):
    """Histogram of per-token exit layers (columns ``setting, exit_layer``)."""
    ax = ax or plt.subplots(figsize=(7, 3.5))[1]
    sns.histplot(data=exits, x="exit_layer", hue="setting", discrete=True, stat="probability",
                 common_norm=False, element="step", ax=ax)
    ax.set(xlim=(0.5, num_layers + 0.5), xlabel="exit layer")
    return ax


def colored_passage_html(tokens: list[str], exit_layers: list[int], num_layers: int) -> str:
    """CALM Fig. 1 style: each token's background colour encodes its exit layer (dark = late)."""
    cmap = plt.get_cmap("viridis_r")
    spans = []
    for tok, layer in zip(tokens, exit_layers):
        r, g, b, _ = cmap((layer - 1) / max(num_layers - 1, 1))
        fg = "white" if layer > num_layers / 2 else "black"
        spans.append(f'<span title="layer {layer}" style="background: rgb({int(r*255)},{int(g*255)},{int(b*255)});'
                     f' color:{fg}; padding:1px 2px; margin:1px; border-radius:3px; white-space:pre">'
                     f"{html.escape(tok)}<sub>{layer}</sub></span>")
    return '<div style="line-height:2.0; font-family:monospace">' + "".join(spans) + "</div>"


def plot_colored_passage(tokens: list[str], exit_layers: list[int], num_layers: int, width: int = 70, title: str = ""):
    """The same passage as a matplotlib figure (for figures/): tokens laid out in lines, coloured by exit layer."""
    cmap = plt.get_cmap("viridis_r")
    lines, line, n = [], [], 0
    for tok, layer in zip(tokens, exit_layers):
        tok = tok.replace("\n", "⏎")
        if n + len(tok) > width and line:
            lines.append(line)
            line, n = [], 0
        line.append((tok, layer))
        n += len(tok) + 1
    lines.append(line)
    fig, ax = plt.subplots(figsize=(width * 0.12, 0.45 * len(lines) + 0.8))
    ax.set_axis_off()
    for row, items in enumerate(lines):
        x = 0.0
        for tok, layer in items:
            color = cmap((layer - 1) / max(num_layers - 1, 1))
            fg = "white" if layer > num_layers / 2 else "black"
            ax.text(x, -row, tok, fontsize=9, family="monospace", color=fg, va="center",
                    bbox=dict(facecolor=color, edgecolor="none", pad=1.5))
            x += (len(tok) + 1) / width
    ax.set(xlim=(0, 1.05), ylim=(-len(lines), 1), title=title)
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(1, num_layers))
    fig.colorbar(sm, ax=ax, orientation="horizontal", fraction=0.05, pad=0.02, label="exit layer")
    return fig


def plot_tradeoff(summary: pd.DataFrame, x: str = "speedup", y: str = "consistency", hue: str = "measure", ax=None):
    """Quality/consistency against speed-up (or average exit layer) per measure."""
    ax = ax or plt.subplots(figsize=(6, 4))[1]
    sns.lineplot(data=summary, x=x, y=y, hue=hue, marker="o", sort=True, ax=ax)
    if x == "speedup":
        ax.axvline(1.0, color="grey", lw=0.8, ls="--")
    return ax


def write_html(path: str | Path, body: str) -> Path:
    return atomic_write_text(path, f"<html><body>{body}</body></html>")
