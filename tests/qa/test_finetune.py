"""The QA extraction test end to end (kcap/qa/finetune.py), on models trained here.

A tiny model pretrained on bioS with the QA pairs of half the people mixed in answers the
other half's questions far above chance after LoRA fine-tuning (a real learning test: the
held-out people's answers were never trained on); a model that never saw the people stays
at chance. The fine-tune resumes after a kill to the same report, refuses other options
over a finished one, and works over a quantized model."""
import json
import math

import pytest
import torch

from kcap.qa.finetune import QA_FOLDER, REPORT_NAME, QAConfig, run_qa
from kcap.train import DataConfig, TrainConfig, train
from stop_training import Stop, stop_at

N = 200
PRETRAIN = TrainConfig(model="gpt2-2-2", data=DataConfig(n=N, variant="online+fullname",
                                                         qa_fraction=0.5),
                       exposures=30, window=256, batch_size=8, lr=5e-3, eval_sample=None,
                       log_every=50, checkpoint_every=10_000)
QUICK = QAConfig(epochs=2, log_every=5, checkpoint_every=10)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    run = tmp_path_factory.mktemp("qa") / "run"
    train(PRETRAIN, run, progress=False)
    return run


def copy_run(run, dest):
    """A copy of a trained run folder without its QA work (each test's own)."""
    import shutil

    shutil.copytree(run, dest, ignore=shutil.ignore_patterns(QA_FOLDER, REPORT_NAME, ".kcap.lock"))
    return dest


def test_mixed_pretraining_makes_held_out_people_extractable(pretrained, tmp_path):
    run = copy_run(pretrained, tmp_path / "run")
    report = run_qa(run, QAConfig(), progress=False)
    assert report == json.loads((run / REPORT_NAME).read_text())
    assert report["people"] == {"fine_tuned": N // 2, "test_half": N - N // 2, "tested": N - N // 2}
    # Measured on the project machine: 35% exact match on the held-out half, 13-56% per
    # attribute; chance is at most 1% (major). The bounds leave room for another host's
    # float rounding to train a somewhat different model, and none for a chance-level one.
    chance = max(a["chance"] for a in report["attributes"].values())
    assert report["exact_match"] > 0.15, report["exact_match"]
    for name, a in report["attributes"].items():
        assert a["exact_match"] <= a["first_token"], name  # exact needs the first token
        assert a["exact_match_ci95"][0] > 3 * chance, (name, a)
    assert report["extractable_bits"] > 0.3 * report["stored_bits"] > 0
    assert report["stored_over_extractable"] == pytest.approx(
        report["stored_bits"] / report["extractable_bits"])
    assert report["fine_tune_half_exact_match"] >= report["exact_match"]


def test_a_model_that_never_saw_the_people_stays_at_chance(tmp_path):
    run = tmp_path / "untrained"
    cfg = TrainConfig(model="gpt2-2-2", data=DataConfig(n=N, variant="online+fullname"), steps=1,
                      lr=1e-6, exposures=1, window=256, batch_size=8, eval_sample=None)
    train(cfg, run, progress=False)
    report = run_qa(run, QAConfig(), progress=False)
    assert report["exact_match"] < 0.03, report["exact_match"]
    assert report["extractable_bits"] < 0.05 * report["stored"]["bits_max"]


def test_a_killed_fine_tune_resumes_to_the_same_report(pretrained, tmp_path, monkeypatch):
    import kcap.budget

    whole = run_qa(copy_run(pretrained, tmp_path / "whole"), QUICK, progress=False)
    run = copy_run(pretrained, tmp_path / "killed")
    stop_at(monkeypatch, kcap.budget, 17)  # after the checkpoint of step 10
    with pytest.raises(Stop):
        run_qa(run, QUICK, progress=False)
    assert not (run / REPORT_NAME).exists()
    monkeypatch.undo()
    resumed = run_qa(run, QUICK, progress=False)
    for key in ("exact_match", "extractable_bits", "stored_bits", "first_token"):
        assert resumed[key] == whole[key], key
    assert resumed["attributes"] == whole["attributes"]
    assert run_qa(run, QUICK, progress=False) == resumed  # finished: nothing redone
    with pytest.raises(ValueError, match="made with other options .*rank"):
        run_qa(run, QAConfig(rank=4, epochs=2), progress=False)


def test_qa_over_a_quantized_model(pretrained, tmp_path):
    from kcap.quantize_run import quantize_run

    out = tmp_path / "int8"
    quantize_run(copy_run(pretrained, tmp_path / "run"), out, bits=8, method="rtn")
    report = run_qa(out, QUICK, progress=False)
    assert (out / REPORT_NAME).is_file() and math.isfinite(report["extractable_bits"])
    assert report["exact_match"] > 0.1  # int8 keeps what was stored; two epochs find some


def test_qa_needs_bios_people(tmp_path):
    run = tmp_path / "biod"
    train(TrainConfig(model="gpt2-1-1", data=DataConfig(kind="bioD", n=10), steps=1, exposures=1,
                      window=64, batch_size=2, eval_sample=None), run, progress=False)
    with pytest.raises(ValueError, match="QA pairs are defined for bioS and bioR people; this "
                                         "model was trained on bioD"):
        run_qa(run, QUICK, progress=False)


def test_config_and_command_line_errors(pretrained, capsys):
    from kcap.cli import main

    for bad, message in ((dict(rank=0), "rank must be"), (dict(where=("q", "k")), "where must"),
                         (dict(lr=0.0), "lr must be > 0"), (dict(epochs=1.5), "epochs")):
        with pytest.raises((ValueError, TypeError), match=message):
            QAConfig(**bad)
    assert main(["qa", str(pretrained / "missing"), "--no-progress"]) == 2
    assert main(["qa", str(pretrained), "--where", "q,x", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("kcap: error:") for line in err)
    assert torch.get_num_threads() >= 1
