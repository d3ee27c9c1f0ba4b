"""Reproduce the study: every notebook in its full setting, the speed benchmarks, the README's results.

Usage: ``python scripts/reproduce.py [--smoke] [--only 01 03 bench] [--force]`` (``make reproduce`` runs it
after set-up). Steps, in order:

1. notebooks 01, 02, 03, 05 (executed in place, outputs saved; they write ``figures/``),
2. the wall-clock benchmarks (``python -m calm_utils.bench`` for the CALM-trained T5 and SmolLM2-135M,
   interleaved with HF ``generate``; they read the thresholds and heads that notebooks 01/02 chose),
3. notebook 04 (the result figures, drawn from ``figures/*.csv``),
4. ``scripts/update_readme.py`` (the README's results block, generated from the CSVs; always rerun).

Each step is skipped when its inputs (the notebook's code cells or the benchmark's settings, the
``calm_utils`` sources, the committed checkpoints and the step's upstream tables) are unchanged since its
last successful run, so a rerun with nothing changed finishes in seconds; ``--force`` reruns everything.
Cached artefacts (converted weights, collected hidden states, trained heads) are reused in any case.
The measured wall time of every step is written to ``figures/reproduce_time.json`` (``full_run``: the last run
in which every step executed; ``last_run``: the latest run).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = {p.name[:2]: p for p in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))}
STAMPS = ROOT / ".cache" / "reproduce"
sys.path.insert(0, str(ROOT))
from calm_utils.utils import study_model  # noqa: E402

BENCH = {  # model -> benchmark arguments (full setting); the decoder-only model follows $CALM_MODEL
    "t5_calm": ["--prompts", "60", "--max-new", "40", "--repeats", "2"],
    study_model(): ["--prompts", "6", "--max-new", "32", "--repeats", "2"],
}
BENCH_SMOKE = ["--smoke"]


def _digest(parts: list[bytes]) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(hashlib.sha256(p).digest())
    return h.hexdigest()


def code_inputs() -> list[bytes]:
    files = sorted((ROOT / "calm_utils").glob("*.py")) + sorted((ROOT / "checkpoints").rglob("*"))
    return [f.relative_to(ROOT).as_posix().encode() + f.read_bytes() for f in files if f.is_file()]


def notebook_inputs(path: Path) -> list[bytes]:
    nb = nbformat.read(path, as_version=4)
    return [c.source.encode() for c in nb.cells if c.cell_type == "code"]


def tables(names: list[str]) -> list[bytes]:
    return [(ROOT / "figures" / n).read_bytes() if (ROOT / "figures" / n).exists() else b"" for n in names]


def run_notebook(path: Path, smoke: bool) -> None:
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=None, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    if not smoke:  # the committed notebooks carry the full setting's outputs
        nbformat.write(nb, path)


def run_bench(model: str, smoke: bool) -> None:
    import torch
    args = BENCH_SMOKE if smoke else BENCH[model]
    device = "cuda" if torch.cuda.is_available() else "cpu"   # the notebooks follow CUDA too (load_model)
    subprocess.run([sys.executable, "-m", "calm_utils.bench", "--model", model, "--device", device, *args], cwd=ROOT,
                   check=True)


def steps(smoke: bool) -> list[tuple[str, str, callable, callable]]:
    """(id, label, inputs, action) in execution order; ``inputs()`` is read when the step's turn comes, since an
    earlier step may rewrite an upstream table."""
    out = []
    for key in ("01", "02", "03", "05"):
        if key in NOTEBOOKS:
            p = NOTEBOOKS[key]
            out.append((key, p.name, lambda p=p: notebook_inputs(p), lambda p=p: run_notebook(p, smoke)))
    for model in BENCH:
        upstream = ["exit_matched.csv", "calibration_t5.csv"]
        out.append((f"bench_{model}", f"benchmark {model}",
                    lambda m=model: [" ".join(BENCH[m]).encode()] + tables(upstream),
                    lambda m=model: run_bench(m, smoke)))
    if "04" in NOTEBOOKS:
        p = NOTEBOOKS["04"]
        out.append(("04", p.name,
                    lambda: notebook_inputs(p) + tables(sorted(f.name for f in (ROOT / "figures").glob("*.csv"))),
                    lambda: run_notebook(p, smoke)))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="run the smoke setting (CALM_SMOKE=1); saves nothing")
    parser.add_argument("--only", nargs="*", default=None, help="step ids to run, e.g. 01 03 bench 04")
    parser.add_argument("--force", action="store_true", help="rerun steps whose inputs did not change")
    args = parser.parse_args()
    os.environ["CALM_SMOKE"] = "1" if args.smoke else "0"
    code = code_inputs()
    timings, start_all = [], time.time()
    plan = [s for s in steps(args.smoke) if args.only is None or any(s[0].startswith(o) for o in args.only)]
    for sid, label, inputs, action in tqdm(plan, desc="reproduce", unit="step"):
        key = _digest(code + inputs() + [b"smoke" if args.smoke else b"full"])
        stamp = STAMPS / f"{sid}{'_smoke' if args.smoke else ''}.json"
        last = json.loads(stamp.read_text()) if stamp.exists() else {}
        if not args.force and last.get("inputs") == key:
            tqdm.write(f"{label}: up to date (inputs unchanged since {last['date']}), skipped")
            timings.append(dict(step=sid, label=label, minutes=0.0, skipped=True))
            continue
        tqdm.write(f"{label} ({'smoke' if args.smoke else 'full'} setting) ...")
        t0 = time.time()
        action()
        dt = time.time() - t0
        timings.append(dict(step=sid, label=label, minutes=round(dt / 60, 2), skipped=False))
        STAMPS.mkdir(parents=True, exist_ok=True)
        stamp.write_text(json.dumps({"inputs": key, "date": time.strftime("%F %T"), "seconds": dt}))
        tqdm.write(f"  {label}: {dt / 60:.1f} min")
    total = (time.time() - start_all) / 60
    print("\n".join(f"{t['label']}: " + ("skipped" if t["skipped"] else f"{t['minutes']:.1f} min") for t in timings)
          + f"\ntotal: {total:.1f} min")
    if not args.smoke and args.only is None:
        out = ROOT / "figures" / "reproduce_time.json"
        rec = json.loads(out.read_text()) if out.exists() else {}
        run = dict(total_minutes=round(total, 1), steps=timings, date=time.strftime("%F %T"),
                   cpu_count=os.cpu_count(), torch_threads_note="notebooks and benchmarks set 1 thread where they time",
                   loadavg_after=list(os.getloadavg()))
        rec["last_run"] = run
        if not any(t["skipped"] for t in timings):  # every step executed: the study's reproduction time
            rec["full_run"] = run
        out.write_text(json.dumps(rec, indent=1) + "\n")
        subprocess.run([sys.executable, "scripts/update_readme.py"], cwd=ROOT, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
