"""Data sets of the study: Multi30k EN-FR, SQuAD v1.1 dev, SciTLDR-A, newstest2014 EN-FR.

The raw files live in ``<repo>/data/`` (git-ignored). :func:`setup_data` fills it:
for each file in the checksum list (``calm_utils/data_sha256sums.txt``, a copy of
``../shared/data/SHA256SUMS``) it keeps a verified existing file, else links (or
copies) it from the shared copy at ``../shared/data/``, else downloads it from its
public source. Every file is checked against its SHA256.

Command line::

    python -m calm_utils.data setup    # link / download, then verify everything
    python -m calm_utils.data verify   # verify only

Loaders return :class:`datasets.Dataset` objects and take a ``data_dir`` override
(used by the tests).
"""
from __future__ import annotations

import gzip
import hashlib
import html
import json
import os
import re
import shutil
import sys
import tarfile
import tempfile
from functools import lru_cache
from pathlib import Path

from datasets import Dataset

from .utils import REPO_ROOT

DATA_DIR = REPO_ROOT / "data"
SHARED_DATA_DIR = REPO_ROOT.parent / "shared" / "data"
SUMS_FILE = Path(__file__).with_name("data_sha256sums.txt")
SETUP_CMD = "python -m calm_utils.data setup"

MULTI30K_SPLITS = {"train": 29000, "val": 1014, "test_2016_flickr": 1000}
SCITLDR_SPLITS = ("train", "dev", "test")
NEWSTEST2014_ROWS = 3003

MULTI30K_URL = "https://raw.githubusercontent.com/multi30k/dataset/master/data/task1/raw/{name}"
SQUAD_URL = "https://rajpurkar.github.io/SQuAD-explorer/dataset/{name}"
SCITLDR_URL = "https://raw.githubusercontent.com/allenai/scitldr/master/SciTLDR-Data/SciTLDR-A/{name}"
# newstest2014 comes inside the WMT14 test package; this is the archive (and the
# member paths) that sacrebleu itself uses for ``-t wmt14 -l en-fr``.
WMT14_TGZ_URL = "https://statmt.org/wmt14/test-filtered.tgz"
WMT14_TGZ_MEMBER = "test/{name}"


class DataError(FileNotFoundError):
    """A data file is missing or does not match its SHA256; the message says how to fix it."""


# --------------------------------------------------------------------------- checksums

@lru_cache(maxsize=1)
def checksums() -> dict[str, str]:
    """``{relative path: sha256}`` for every data file, from ``data_sha256sums.txt``."""
    sums = {}
    for line in SUMS_FILE.read_text().splitlines():
        if line.strip():
            digest, rel = line.split(maxsplit=1)
            sums[rel.strip().lstrip("*")] = digest.lower()
    return sums


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA256 of a file's contents."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


_VERIFIED: set[tuple[str, int, int]] = set()  # (resolved path, size, mtime_ns) verified this process


def verify_file(path: Path, relpath: str) -> None:
    """Raise :class:`DataError` unless ``path`` exists and matches the SHA256 listed for ``relpath``.

    A success is cached per process (keyed by resolved path, size and mtime)."""
    if not path.exists():
        raise DataError(f"data file {path} (data/{relpath}) is missing; run `{SETUP_CMD}` to fetch it")
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key in _VERIFIED:
        return
    expected = checksums()[relpath]
    actual = sha256_file(path)
    if actual != expected:
        raise DataError(
            f"data file {path} (data/{relpath}) is corrupt: SHA256 {actual} != expected {expected}; "
            f"delete it and run `{SETUP_CMD}`"
        )
    _VERIFIED.add(key)


def _require(relpath: str, data_dir: str | os.PathLike | None = None) -> Path:
    """The verified path of ``data/<relpath>`` (or ``<data_dir>/<relpath>``); :class:`DataError` if missing or corrupt."""
    if relpath not in checksums():
        raise KeyError(f"{relpath!r} is not a known data file (see {SUMS_FILE.name})")
    path = Path(data_dir or DATA_DIR) / relpath
    if not path.exists():
        raise DataError(f"data/{relpath} is missing (looked at {path}); run `{SETUP_CMD}` to link or download it")
    verify_file(path, relpath)
    return path


# --------------------------------------------------------------------------- setup

def public_url(relpath: str) -> str:
    """Where ``relpath`` is downloaded from when no shared copy exists (a tgz for ``wmt14/``)."""
    folder, name = relpath.split("/", 1)
    if folder == "multi30k":
        return MULTI30K_URL.format(name=name)
    if folder == "squad":
        return SQUAD_URL.format(name=name)
    if folder == "scitldr":
        return SCITLDR_URL.format(name=name)
    if folder == "wmt14":
        return WMT14_TGZ_URL
    raise KeyError(f"no public source known for {relpath!r}")


def _download(url: str, dest: Path) -> None:
    """Stream ``url`` into ``dest`` with a tqdm progress bar."""
    import requests
    from tqdm.auto import tqdm

    with requests.get(url, stream=True, timeout=60) as r:
        r.raise_for_status()
        total = int(r.headers.get("content-length", 0)) or None
        with open(dest, "wb") as f, tqdm(total=total, unit="B", unit_scale=True, desc=url.rsplit("/", 1)[-1]) as bar:
            for block in r.iter_content(1 << 16):
                f.write(block)
                bar.update(len(block))


def _fetch(relpath: str, target: Path) -> None:
    """Download ``relpath`` from its public source and atomically move it to ``target``."""
    url = public_url(relpath)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp)
    try:
        if relpath.startswith("wmt14/"):
            tgz = tmp.with_suffix(".tgz")
            try:
                _download(url, tgz)
                member = WMT14_TGZ_MEMBER.format(name=relpath.split("/", 1)[1])
                with tarfile.open(tgz) as tar, tar.extractfile(member) as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst)
            finally:
                tgz.unlink(missing_ok=True)
        else:
            _download(url, tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _setup_file(relpath: str, data_dir: Path, shared_dir: Path, download: bool) -> str:
    """Make ``data_dir/relpath`` present and verified; returns how: 'kept', 'linked', 'copied' or 'downloaded'."""
    target = data_dir / relpath
    if target.exists() or target.is_symlink():
        try:
            verify_file(target, relpath)
            return "kept"
        except DataError:
            target.unlink()  # broken link or corrupt file: replace it
    shared = shared_dir / relpath
    target.parent.mkdir(parents=True, exist_ok=True)
    if shared.exists():
        try:
            # relative link, so it survives moving the checkout together with ../shared
            target.symlink_to(os.path.relpath(shared.resolve(), target.parent.resolve()))
            how = "linked"
        except OSError:
            shutil.copy2(shared, target)
            how = "copied"
    elif download:
        _fetch(relpath, target)
        how = "downloaded"
    else:
        raise DataError(f"data/{relpath} is missing, no shared copy at {shared}, and downloads are off")
    verify_file(target, relpath)
    return how


def setup_data(download: bool | None = None, data_dir: str | os.PathLike | None = None,
               shared_dir: str | os.PathLike | None = None) -> dict[str, str]:
    """Make every listed data file present and verified in ``data/``.

    Keeps verified files, links (or copies) from ``../shared/data/`` when present,
    otherwise downloads from the public source. ``download=None`` (default) or
    ``True`` allows downloads; ``False`` forbids them. Raises :class:`DataError`
    on a checksum mismatch. Returns ``{relpath: 'kept'|'linked'|'copied'|'downloaded'}``.
    """
    data_dir = Path(data_dir or DATA_DIR)
    shared_dir = Path(shared_dir or SHARED_DATA_DIR)
    allow = download is not False
    return {rel: _setup_file(rel, data_dir, shared_dir, allow) for rel in checksums()}


def verify_data(data_dir: str | os.PathLike | None = None) -> None:
    """Verify every listed file in ``data/``; raises :class:`DataError` on the first problem."""
    for rel in checksums():
        _require(rel, data_dir)


def _summary(actions: dict[str, str] | None = None) -> list[str]:
    """One line per data set: files and how they were obtained."""
    by_set: dict[str, list[str]] = {}
    for rel in checksums():
        by_set.setdefault(rel.split("/", 1)[0], []).append(rel)
    lines = []
    for name, rels in by_set.items():
        hows = sorted({actions[r] for r in rels}) if actions else ["verified"]
        lines.append(f"{name:9s} {len(rels):2d} file(s) OK ({', '.join(hows)})")
    return lines


# --------------------------------------------------------------------------- loaders

def load_multi30k(split: str, src: str = "en", tgt: str = "fr", data_dir: str | os.PathLike | None = None) -> Dataset:
    """Multi30k task 1 ``split`` ('train', 'val', 'test_2016_flickr') with columns named by language, e.g. ``en``, ``fr``."""
    if split not in MULTI30K_SPLITS:
        raise ValueError(f"unknown Multi30k split {split!r}; valid: {', '.join(MULTI30K_SPLITS)}")
    cols = {}
    for lang in (src, tgt):
        path = _require(f"multi30k/{split}.{lang}.gz", data_dir)
        with gzip.open(path, "rt", encoding="utf-8") as f:
            cols[lang] = [line.rstrip("\r\n") for line in f]
        if len(cols[lang]) != MULTI30K_SPLITS[split]:
            raise DataError(f"{path} has {len(cols[lang])} lines, expected {MULTI30K_SPLITS[split]}; run `{SETUP_CMD}`")
    return Dataset.from_dict(cols)


def load_squad(data_dir: str | os.PathLike | None = None) -> Dataset:
    """SQuAD v1.1 dev, one row per question: ``id, title, context, question, answers`` (list of gold texts)."""
    data = json.loads(_require("squad/dev-v1.1.json", data_dir).read_text(encoding="utf-8"))["data"]
    rows = {k: [] for k in ("id", "title", "context", "question", "answers")}
    for article in data:
        for para in article["paragraphs"]:
            for qa in para["qas"]:
                rows["id"].append(qa["id"])
                rows["title"].append(article["title"])
                rows["context"].append(para["context"])
                rows["question"].append(qa["question"])
                rows["answers"].append([a["text"] for a in qa["answers"]])
    return Dataset.from_dict(rows)


def load_scitldr(split: str, data_dir: str | os.PathLike | None = None) -> Dataset:
    """SciTLDR-A ``split`` ('train', 'dev', 'test'): ``source`` (abstract, sentences joined by spaces), ``targets`` (list), ``paper_id``."""
    if split not in SCITLDR_SPLITS:
        raise ValueError(f"unknown SciTLDR split {split!r}; valid: {', '.join(SCITLDR_SPLITS)}")
    rows = {"paper_id": [], "source": [], "targets": []}
    with open(_require(f"scitldr/{split}.jsonl", data_dir), encoding="utf-8") as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                rows["paper_id"].append(r.get("paper_id", ""))
                rows["source"].append(" ".join(s.strip() for s in r["source"]))
                rows["targets"].append(list(r["target"]))
    return Dataset.from_dict(rows)


_SEG = re.compile(r"<seg[^>]*>(.*?)</seg>", re.IGNORECASE)


def _read_sgm(path: Path) -> list[str]:
    """The ``<seg>`` texts of an sgm file, XML entities unescaped."""
    return [html.unescape(m.group(1)).strip() for m in _SEG.finditer(path.read_text(encoding="utf-8"))]


def load_newstest2014(data_dir: str | os.PathLike | None = None) -> Dataset:
    """WMT14 newstest2014 EN-FR: columns ``en``, ``fr`` (3003 rows)."""
    en = _read_sgm(_require("wmt14/newstest2014-fren-src.en.sgm", data_dir))
    fr = _read_sgm(_require("wmt14/newstest2014-fren-ref.fr.sgm", data_dir))
    if len(en) != len(fr) or len(en) != NEWSTEST2014_ROWS:
        raise DataError(f"newstest2014 has {len(en)} en / {len(fr)} fr segments, expected {NEWSTEST2014_ROWS}")
    return Dataset.from_dict({"en": en, "fr": fr})


def first_n(ds: Dataset, n: int | None) -> Dataset:
    """The first ``n`` rows of ``ds`` (all rows if ``n`` is None or larger than ``ds``)."""
    return ds if n is None or n >= len(ds) else ds.select(range(n))


# --------------------------------------------------------------------------- prompts

def squad_prompt(context: str, question: str) -> str:
    """Plain-text extractive QA instruction for a decoder-only instruct model."""
    return (
        "Answer the question with a short span copied from the context.\n\n"
        f"Context: {context.strip()}\nQuestion: {question.strip()}\nAnswer:"
    )


def scitldr_prompt(source: str) -> str:
    """Plain-text one-sentence summary (TLDR) instruction for a decoder-only instruct model."""
    return (
        "Summarize the following scientific abstract in one sentence.\n\n"
        f"Abstract: {source.strip()}\nTLDR:"
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cmd = argv[0] if argv else "setup"
    try:
        if cmd == "setup":
            actions = setup_data()
        elif cmd == "verify":
            verify_data()
            actions = None
        else:
            print(f"usage: python -m calm_utils.data [setup|verify] (got {cmd!r})", file=sys.stderr)
            return 2
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for line in _summary(actions):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
