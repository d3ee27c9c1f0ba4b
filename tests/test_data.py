"""Data set-up, checksum errors and loaders (on the real files linked from ../shared/data)."""
from __future__ import annotations

import shutil

import pytest

from calm_utils import data
from calm_utils.data import DataError


@pytest.fixture(scope="module", autouse=True)
def _setup():
    data.setup_data(download=False)


@pytest.mark.parametrize("split,n", list(data.MULTI30K_SPLITS.items()))
def test_multi30k(split, n):
    ds = data.load_multi30k(split)
    assert len(ds) == n
    assert ds.column_names == ["en", "fr"]
    assert all(not s.endswith("\n") and s for s in ds[:50]["en"])


def test_multi30k_de():
    ds = data.load_multi30k("val", src="de", tgt="en")
    assert ds.column_names == ["de", "en"] and len(ds) == 1014


def test_squad():
    ds = data.load_squad()
    assert len(ds) == 10570
    assert ds.column_names == ["id", "title", "context", "question", "answers"]
    row = ds[0]
    assert row["answers"] and all(isinstance(a, str) for a in row["answers"])
    assert row["answers"][0] in row["context"]


@pytest.mark.parametrize("split,n", [("train", 1992), ("dev", 619), ("test", 618)])
def test_scitldr(split, n):
    ds = data.load_scitldr(split)
    assert len(ds) == n
    assert set(ds.column_names) == {"paper_id", "source", "targets"}
    assert isinstance(ds[0]["source"], str) and ds[0]["targets"]


def test_newstest2014():
    ds = data.load_newstest2014()
    assert len(ds) == 3003 and ds.column_names == ["en", "fr"]
    assert ds[0]["en"] == "Spectacular Wingsuit Jump Over Bogota"
    assert not any("<seg" in s or "&amp;" in s for s in ds["fr"])


@pytest.mark.parametrize("loader", [data.load_multi30k, data.load_scitldr])
def test_bad_split(loader):
    with pytest.raises(ValueError, match="valid"):
        loader("nope")


def test_missing_file(tmp_path):
    with pytest.raises(DataError) as e:
        data.load_squad(data_dir=tmp_path)
    msg = str(e.value)
    assert "squad/dev-v1.1.json" in msg and "python -m calm_utils.data setup" in msg


def test_corrupt_file(tmp_path):
    (tmp_path / "scitldr").mkdir()
    (tmp_path / "scitldr" / "dev.jsonl").write_text('{"source": ["x"], "target": ["y"]}\n')
    with pytest.raises(DataError) as e:
        data.load_scitldr("dev", data_dir=tmp_path)
    msg = str(e.value)
    assert "scitldr/dev.jsonl" in msg and "python -m calm_utils.data setup" in msg
    assert data.checksums()["scitldr/dev.jsonl"] in msg


def test_setup_links_into_empty_dir(tmp_path):
    actions = data.setup_data(download=False, data_dir=tmp_path)
    assert set(actions) == set(data.checksums())
    assert set(actions.values()) <= {"linked", "copied"}
    assert data.setup_data(download=False, data_dir=tmp_path)["squad/dev-v1.1.json"] == "kept"


def test_setup_replaces_corrupt(tmp_path):
    shared = tmp_path / "shared"
    (shared / "scitldr").mkdir(parents=True)
    shutil.copy(data.SHARED_DATA_DIR / "scitldr" / "dev.jsonl", shared / "scitldr" / "dev.jsonl")
    bad = tmp_path / "data" / "scitldr" / "dev.jsonl"
    bad.parent.mkdir(parents=True)
    bad.write_text("garbage")
    how = data._setup_file("scitldr/dev.jsonl", tmp_path / "data", shared, download=False)
    assert how in ("linked", "copied")
    assert data.load_scitldr("dev", data_dir=tmp_path / "data").num_rows == 619


def test_prompts_and_first_n():
    p = data.squad_prompt("Paris is in France.", "Where is Paris?")
    assert "Context: Paris is in France." in p and p.endswith("Answer:")
    assert data.scitldr_prompt("An abstract.").endswith("TLDR:")
    ds = data.load_multi30k("val")
    assert len(data.first_n(ds, 5)) == 5 and len(data.first_n(ds, None)) == 1014
