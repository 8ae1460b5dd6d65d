"""Sweeps with the QA extraction test (--qa) and a bioR import (--bior): both end up in the
rows, the figure and results.md, and a sweep folder keeps the options it was started with."""
import pytest

from kcap.data.bior import SAMPLE_N, SAMPLE_PATH, SAMPLE_SEED
from kcap.data.bior_import import import_bior
from kcap.experiments import registry
from kcap.experiments.executors import LocalExecutor
from kcap.experiments.results import read_results
from kcap.experiments.runner import run_sweep


@pytest.fixture
def small_r2(monkeypatch):
    """r2 at smoke with one size and one N: one bioS run (and a bioR run per size)."""
    monkeypatch.setitem(registry.SIZES, "smoke", ("1-1",))
    monkeypatch.setitem(registry.PEOPLE, "smoke", (100,))


def test_r2_with_bior_and_qa_end_to_end(small_r2, tmp_path):
    bior = tmp_path / "bior"
    import_bior(SAMPLE_PATH, SAMPLE_N, SAMPLE_SEED, bior)
    out = tmp_path / "r2"
    with LocalExecutor(["cpu", "cpu"], threads=1) as ex:
        rows = run_sweep("r2", "smoke", out, ex, progress=False, qa=True, bior=bior)
    assert [r["status"] for r in rows] == ["done", "done"]
    variants = sorted(r["labels"]["variant"] for r in rows)
    assert variants == ["bioR", "simple"]
    for r in rows:
        qa = r["post"]["qa"]
        assert set(qa) >= {"bits", "R", "exact_match", "knowledge_bits_same_people"}
        assert (out / "runs" / r["run"] / "qa_report.json").is_file()
    assert read_results(out) == rows
    text = (out / "results.md").read_text()
    assert "peak R on bioR" in text and "stored / extractable bits (QA)" in text
    assert "| qa |" in text
    # the folder keeps its options: other ones are refused, the same ones run nothing again
    with LocalExecutor(["cpu"], threads=1) as ex:
        with pytest.raises(ValueError, match="started with --qa"):
            run_sweep("r2", "smoke", out, ex, progress=False, bior=bior)
        with pytest.raises(ValueError, match="started with --bior"):
            run_sweep("r2", "smoke", out, ex, progress=False, qa=True)
        assert run_sweep("r2", "smoke", out, ex, progress=False, qa=True, bior=bior) == rows


def test_bior_belongs_to_r2_only(tmp_path):
    with pytest.raises(ValueError, match="--bior adds bioR runs to r2 only, not r1"):
        run_sweep("r1", "smoke", tmp_path / "r1", None, progress=False, bior=tmp_path)
