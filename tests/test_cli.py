"""The kcap command: help, data generation, clear errors, no partial files."""
import subprocess
import sys

import numpy as np
import pytest

from kcap.cli import main
from kcap.data.labels import TokenLabels


def run(*args):
    return subprocess.run([sys.executable, "-m", "kcap", *args], capture_output=True, text=True)


def test_help_lists_subcommands():
    out = run("--help")
    assert out.returncode == 0
    assert "demo" in out.stdout and "data" in out.stdout


def test_data_bios_prints_bits_and_writes_windows(tmp_path, capsys):
    path = tmp_path / "bios.npz"
    assert main(["data", "bios", "--n", "50", "--exposures", "3", "--out", str(path),
                 "--labels", "--show", "1"]) == 0
    out = capsys.readouterr().out
    assert "bits" in out and "<|endoftext|>" in out
    z = np.load(path)
    assert z["tokens"].shape[1] == 512 and z["field"].shape == z["tokens"].shape
    labels = TokenLabels(z["field"], z["chunk"], z["person"]).expand()
    people = labels.person[labels.person >= 0]
    assert np.bincount(people).min() > 0  # everyone appears


@pytest.mark.parametrize("args, message", [
    (["data", "bios", "--n", "0"], "n must be >= 1"),
    (["data", "bios", "--n", "10", "--variant", "multi0"], "unknown bioS variant"),
    (["data", "biod", "--n", "10", "--d", "5000", "--l", "2", "--t", "50"], "d must be"),
    (["data", "bios", "--n", "10", "--window", "16"], "window (16) is shorter"),
    (["data", "junk", "--n", "10", "--ratio", "0:7"], "ratio[0]"),
])
def test_bad_input_is_a_clear_error_and_writes_nothing(tmp_path, args, message):
    path = tmp_path / "out.npz"
    out = run(*args, "--out", str(path))
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr
    assert not path.exists() and not list(tmp_path.iterdir())


def test_demo_writes_report_and_plot(tmp_path):
    out = run("demo", "--preset", "tiny", "--out", str(tmp_path / "demo"))
    assert out.returncode == 0, out.stderr
    assert "bits learned" in out.stdout and "R_max(F)" in out.stdout
    report = __import__("json").loads((tmp_path / "demo" / "report.json").read_text())
    for key in ("people", "bits_in_data", "params_counted", "bits_learned", "capacity_ratio",
                "capacity_ratio_max"):
        assert key in report
    assert report["capacity_ratio_max"] == pytest.approx(report["bits_in_data"] / report["params_counted"])
    assert (tmp_path / "demo" / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = run("demo", "--preset", "tiny", "--out", str(tmp_path / "demo"))  # finished: resumes
    assert again.returncode == 0 and "bits learned" in again.stdout
