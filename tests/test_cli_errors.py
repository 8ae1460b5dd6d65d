"""The kcap command turns failures into one line on stderr and exit code 2: file system
errors (read-only or full disk, /proc), sizes that would not fit, out-of-range seeds; a
reader that leaves a pipe early ends it quietly. Tests run as root, where chmod does not stop
writes, so unwritable and full disks are simulated at kcap.atomic."""
import errno
import os
import subprocess
import sys
from contextlib import contextmanager

import numpy as np
import pytest

import kcap.atomic
from kcap.cli import _os_error_line, main
from kcap.data.labels import TokenLabels

TRAIN_TOML = """
model = "gpt2-1-1"
exposures = 2
window = 128
batch_size = 4
checkpoint_every = 0
eval_sample = 10
[data]
kind = "bioS"
n = 20
variant = "simple"
"""


@pytest.fixture(autouse=True)
def a_16_gib_machine(monkeypatch):
    """The refusals below must not depend on the host: with 1 TB free, a 64 GiB window would
    fit and be built. Every test here sees a machine with 16 GiB available."""
    from kcap.data import memory_budget

    monkeypatch.setattr(memory_budget, "available_bytes", lambda: 16 << 30)


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("kcap: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _failing_atomic_path(exc):
    @contextmanager
    def atomic_path(path):
        raise exc
        yield  # noqa: unreachable; makes this a generator
    return atomic_path


def test_data_out_on_a_full_disk(tmp_path, monkeypatch, capsys):
    # a failed write() carries no file name: the message must still name --out
    monkeypatch.setattr(kcap.atomic, "atomic_path",
                        _failing_atomic_path(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))))
    out = tmp_path / "bios.npz"
    assert main(["data", "bios", "--n", "20", "--show", "0", "--out", str(out)]) == 2
    assert _one_error_line(capsys) == f"kcap: error: {os.strerror(errno.ENOSPC)}: {out}"
    assert not out.exists()


def test_data_out_in_a_read_only_folder(tmp_path, monkeypatch, capsys):
    out = tmp_path / "ro" / "bios.npz"
    denied = PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(out.parent / ".x.tmp"))
    monkeypatch.setattr(kcap.atomic, "atomic_path", _failing_atomic_path(denied))
    assert main(["data", "biod", "--n", "20", "--show", "0", "--out", str(out), "--labels"]) == 2
    assert _one_error_line(capsys) == f"kcap: error: {os.strerror(errno.EACCES)}: {out}"


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc")
def test_data_out_under_proc(capsys):
    assert main(["data", "bios", "--n", "20", "--show", "0", "--out", "/proc/kcap.npz"]) == 2
    assert _one_error_line(capsys).endswith(": /proc/kcap.npz")


def test_train_out_on_a_full_disk(tmp_path, monkeypatch, capsys):
    config = tmp_path / "tiny.toml"
    config.write_text(TRAIN_TOML)

    def full(path, text):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(kcap.atomic, "write_text", full)
    run = tmp_path / "run"
    assert main(["train", str(config), "--out", str(run), "--no-progress"]) == 2
    assert _one_error_line(capsys) == f"kcap: error: {os.strerror(errno.ENOSPC)}: {run}"


def test_train_out_read_only_names_the_file_not_its_temporary(tmp_path, monkeypatch, capsys):
    config = tmp_path / "tiny.toml"
    config.write_text(TRAIN_TOML)
    run = tmp_path / "run"

    @contextmanager
    def denied(path):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES),
                              str(path.parent / f".{path.name}.ab12_xyz.tmp"))
        yield  # noqa: unreachable
    monkeypatch.setattr(kcap.atomic, "atomic_path", denied)
    assert main(["train", str(config), "--out", str(run), "--no-progress"]) == 2
    line = _one_error_line(capsys)
    assert line.startswith(f"kcap: error: {os.strerror(errno.EACCES)}: {run}{os.sep}")
    assert not line.endswith(".tmp")


@pytest.mark.parametrize("err, line", [
    (OSError(errno.ENOSPC, "No space left on device", "/r/.config.json.k2_9ab0c.tmp"),
     "kcap: error: No space left on device: /r/config.json"),
    (OSError(errno.EROFS, "Read-only file system", "/r/log.jsonl"),
     "kcap: error: Read-only file system: /r/log.jsonl"),
    (OSError(errno.ENOSPC, "No space left on device"), "kcap: error: No space left on device: runs/x"),
    (OSError("odd"), "kcap: error: odd: runs/x"),
])
def test_os_error_line(err, line):
    assert _os_error_line(err, type("Args", (), {"out": "runs/x"})()) == line


@pytest.mark.parametrize("args, message", [
    (["bios", "--n", "10", "--window", str(10 ** 9)], "lower window"),
    (["bios", "--n", "10", "--variant", "multi99999999999"], "multiM needs M <= 1,000,000,000"),
    (["bios", "--n", "10", "--seed", str(2 ** 64 + 5)], "seed must be >= 0 and <= "),
    (["biod", "--n", "10", "--d", str(10 ** 9), "--l", "8"], "lower K, D or L"),
    (["biod", "--n", "10", "--t", str(10 ** 9)], "lower T"),
    (["bios", "--n", "100000000", "--exposures", "10"], "lower --max-windows, --exposures or --n"),
    (["junk", "--n", "1000", "--exposures", "10000000"], "lower --max-windows, --exposures or --n"),
])
def test_sizes_and_seeds_refused_before_any_work(tmp_path, capsys, args, message):
    out = tmp_path / "x.npz"
    assert main(["data", *args, "--show", "0", "--out", str(out)]) == 2
    line = _one_error_line(capsys)
    assert message in line
    assert not list(tmp_path.iterdir())


def test_out_writes_the_smallest_dtypes_and_reads_back(tmp_path, capsys):
    small, big = tmp_path / "small.npz", tmp_path / "big.npz"
    assert main(["data", "biod", "--n", "30", "--k", "3", "--show", "0", "--out", str(small),
                 "--labels", "--exposures", "2"]) == 0
    assert main(["data", "bios", "--n", "300", "--show", "0", "--out", str(big), "--labels",
                 "--max-windows", "3"]) == 0
    z = np.load(small)
    assert {k: z[k].dtype for k in z.files} == {"tokens": np.uint16, "field": np.uint8,
                                                "chunk": np.uint8, "person": np.uint8}
    labels = TokenLabels(z["field"], z["chunk"], z["person"]).expand()
    assert set(np.unique(labels.person)) == set(range(-1, 30))  # padding at the end
    assert set(np.unique(labels.chunk)) == {-1, 0, 1}
    z = np.load(big)
    assert z["tokens"].shape == (3, 512) and z["person"].dtype == np.uint16


def test_max_windows_beyond_the_stream_writes_the_stream(tmp_path, capsys):
    out = tmp_path / "x.npz"
    assert main(["data", "bios", "--n", "20", "--show", "0", "--out", str(out),
                 "--max-windows", str(10 ** 15)]) == 0
    assert 1 <= len(np.load(out)["tokens"]) <= 4  # 20 biographies of ~60 tokens


def test_closed_pipe_ends_quietly():
    # `kcap data bios --n 2000 --show 2000 | head -1`: ~700 KB of output, far beyond a pipe's
    # buffer, so kcap is still writing when the reader closes its end
    proc = subprocess.Popen([sys.executable, "-m", "kcap", "data", "bios", "--n", "2000",
                             "--show", "2000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 1
    assert first.startswith(b"bioS: 2,000 people")
    assert err == "", err  # no traceback, no "Exception ignored ... BrokenPipeError"


def test_checkpoint_write_error_from_safetensors_is_one_line(monkeypatch, capsys):
    # safetensors raises its own error type, not OSError, when a checkpoint write fails
    from safetensors import SafetensorError

    import kcap.cli

    def full_disk(args):
        raise SafetensorError('Error while serializing: I/O error: No space left on device '
                              '(os error 28) at path "runs/x/checkpoints/.tmp1/model.safetensors"')
    monkeypatch.setattr(kcap.cli, "cmd_train", full_disk)
    assert main(["train", "any.toml", "--out", "runs/x"]) == 2
    line = _one_error_line(capsys)
    assert "No space left on device" in line and "runs/x/checkpoints" in line


def test_ctrl_c_is_one_line_not_a_traceback(monkeypatch, capsys):
    import kcap.experiments.catalog

    def interrupted():
        raise KeyboardInterrupt
    monkeypatch.setattr(kcap.experiments.catalog, "list_text", interrupted)
    assert main(["experiment", "list"]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
