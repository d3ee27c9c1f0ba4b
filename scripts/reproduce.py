"""Reproduce the study: execute every notebook in its full setting, in order, saving outputs and figures/.

Usage: ``python scripts/reproduce.py [--smoke] [--only 01 03]`` (``make reproduce`` runs it after set-up).
Cached artefacts (converted weights, collected hidden states, trained heads) are reused, so a rerun
with nothing changed is fast. The trained T5 checkpoints are committed; ``scripts/train_t5.sh`` retrains them.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="run the smoke setting (CALM_SMOKE=1)")
    parser.add_argument("--only", nargs="*", default=None, help="notebook number prefixes to run, e.g. 01 03")
    args = parser.parse_args()
    os.environ["CALM_SMOKE"] = "1" if args.smoke else "0"
    books = [nb for nb in NOTEBOOKS if args.only is None or nb.name[:2] in args.only]
    timings = []
    for path in tqdm(books, desc="notebooks", unit="nb"):
        tqdm.write(f"executing {path.name} ({'smoke' if args.smoke else 'full'} setting) ...")
        nb = nbformat.read(path, as_version=4)
        start = time.time()
        NotebookClient(nb, timeout=None, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
        timings.append((path.name, time.time() - start))
        if not args.smoke:  # the committed notebooks carry the full setting's outputs
            nbformat.write(nb, path)
        tqdm.write(f"  {path.name}: {timings[-1][1] / 60:.1f} min")
    total = sum(t for _, t in timings)
    print("\n".join(f"{name}: {t / 60:.1f} min" for name, t in timings) + f"\ntotal: {total / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
