"""Batches rendered ahead by a child process (kcap/prefetch.py): the same batches in the same
order, checkpoints that record the batches consumed (not those rendered ahead), training
that is byte for byte the same with and without it (forced on here: on a CPU it is off),
and a child that never outlives its use: it stops on close, leaves when its parent is
gone, and its death is an error in the training loop, not a hang."""
import gc
import os
import queue
import signal
from dataclasses import replace

import numpy as np
import pytest
import torch

import kcap.prefetch
from kcap import checkpoint
from kcap.data.bios import BioS, BioSConfig
from kcap.data.stream import ExposureStream
from kcap.pack.trainer import train_pack
from kcap.prefetch import PrefetchedStream, tokens_on
from kcap.train import DataConfig, TrainConfig, read_log, train
from stop_training import Stop, stop_at

TINY = TrainConfig(model="gpt2-1-1", data=DataConfig(n=40, variant="online"), exposures=3,
                   window=128, batch_size=3, lr=3e-3, eval_sample=10, log_every=2,
                   checkpoint_every=5, keep_checkpoints=10)


def stream():
    return ExposureStream(BioS(BioSConfig(n=30, seed=1)), 2, 129, seed=0)


def test_same_batches_and_the_consumed_position():
    plain, ahead = stream(), PrefetchedStream(stream(), 4, depth=3)
    try:
        for _ in range(200):
            a, b = plain.next_windows(4), ahead.next_windows(4)
            assert np.array_equal(a.tokens, b.tokens)
            assert torch.equal(tokens_on(ahead, b, torch.device("cpu")),
                               torch.from_numpy(a.tokens.astype(np.int64)))
            # what a checkpoint would record: here, not up to 3 batches further
            assert ahead.state_dict() == plain.state_dict()
            assert ahead.exposures_done == plain.exposures_done
            if len(a) == 0:
                # asked again after the end: empty again, as the stream itself answers
                assert len(plain.next_windows(4)) == len(ahead.next_windows(4)) == 0
                break
        else:
            pytest.fail("the finite stream never ended")
    finally:
        ahead.close()
    with pytest.raises(ValueError, match="batches of 4"):
        PrefetchedStream(stream(), 4).next_windows(5)


def test_an_error_while_rendering_reaches_the_training_loop():
    class Broken:
        def state_dict(self):
            return {}
        exposures_done = 0.0

        def next_windows(self, count):
            raise MemoryError("rendering failed")
    ahead = PrefetchedStream(Broken(), 2)
    with pytest.raises(MemoryError, match="rendering failed"):
        ahead.next_windows(2)
    ahead.close()


class _Slow:
    """A stream that takes a long time per batch; its errors can be made unpicklable."""
    exposures_done = 0.0

    def __init__(self, error=None):
        self.error = error

    def state_dict(self):
        return {}

    def next_windows(self, count):
        if self.error is not None:
            raise self.error
        import time

        time.sleep(30)


def test_an_error_that_cannot_be_pickled_arrives_as_its_text():
    class Unpicklable(Exception):
        def __reduce__(self):
            raise TypeError("no pickling")
    ahead = PrefetchedStream(_Slow(Unpicklable("the disk vanished")), 2)
    with pytest.raises(RuntimeError, match="Unpicklable: the disk vanished"):
        ahead.next_windows(2)
    ahead.close()


def test_a_dead_child_is_an_error_not_a_hang():
    ahead = PrefetchedStream(_Slow(), 2)
    ahead._process.kill()
    with pytest.raises(RuntimeError, match="prefetch process died"):
        ahead.next_windows(2)
    ahead.close()


def test_close_stops_the_child_itself():
    """A child with batches waiting in a full queue leaves on close by itself (exit code 0,
    not the terminate that close falls back on)."""
    ahead = PrefetchedStream(ExposureStream(BioS(BioSConfig(n=300, seed=1)), 50, 513, seed=0), 64,
                             depth=2)
    ahead.next_windows(64)
    ahead.close()
    assert not ahead._process.is_alive() and ahead._process.exitcode == 0


def test_the_child_leaves_when_its_parent_is_gone():
    import multiprocessing

    from kcap.prefetch import _render

    ctx = multiprocessing.get_context("fork")
    out, stop = ctx.Queue(maxsize=1), ctx.Event()
    # run in this process, with a parent that is not this process's: as an orphan sees it
    # (and give this process back what the child's setup changes)
    handler = signal.getsignal(signal.SIGINT)
    try:
        _render(stream(), 4, out, stop, parent=-1)
    finally:
        signal.signal(signal.SIGINT, handler)
        gc.unfreeze()
    with pytest.raises(queue.Empty):  # nothing was sent
        out.get(timeout=0.5)


def test_no_prefetch_in_a_daemonic_worker(monkeypatch):
    """A multiprocessing.Pool worker may not start children: the trainers render in line."""
    import multiprocessing

    from kcap.prefetch import use_prefetch

    assert use_prefetch(torch.device("cuda"))  # the device alone decides, elsewhere
    monkeypatch.setattr(multiprocessing.current_process(), "daemon", True)
    assert not use_prefetch(torch.device("cuda"))


def test_ctrl_c_is_left_to_the_trainer():
    """The child ignores SIGINT (the terminal sends it to the whole process group): the
    trainer raises KeyboardInterrupt and closes it, and no traceback comes from the child."""
    plain, ahead = stream(), PrefetchedStream(stream(), 4)
    try:
        ahead.next_windows(4)  # the child has rendered: its handler is in place
        os.kill(ahead._process.pid, signal.SIGINT)
        ahead._process.join(timeout=1)
        assert ahead._process.is_alive()
        plain.next_windows(4)
        assert np.array_equal(ahead.next_windows(4).tokens, plain.next_windows(4).tokens)
    finally:
        ahead.close()
    assert ahead._process.exitcode == 0


def files(run):
    latest = checkpoint.latest(run)
    return {p.name: p.read_bytes() for p in latest.iterdir() if p.name != "state.json"}


def test_training_is_the_same_with_batches_rendered_ahead(tmp_path, monkeypatch):
    plain = tmp_path / "plain"
    train(TINY, plain, progress=False)
    monkeypatch.setattr(kcap.prefetch, "PREFETCH_ON_CPU", True)
    ahead = tmp_path / "ahead"
    train(TINY, ahead, progress=False)
    assert files(ahead) == files(plain)
    assert [r.get("loss") for r in read_log(ahead)] == [r.get("loss") for r in read_log(plain)]
    assert (checkpoint.read_state(checkpoint.latest(ahead))["streams"]
            == checkpoint.read_state(checkpoint.latest(plain))["streams"])
    # stopped half-way (as a kill would: after the checkpoint of step 5, at step 7) and
    # resumed with prefetching: the same end again
    import kcap.train as kt

    half = tmp_path / "half"
    real = stop_at(monkeypatch, kt, 7)
    with pytest.raises(Stop):
        train(TINY, half, progress=False)
    monkeypatch.setattr(kt, "learning_rate", real)
    assert checkpoint.latest(half).name == "step-00000005"
    train(TINY, half, resume=True, progress=False)
    assert files(half) == files(plain)


def test_a_pack_is_the_same_with_batches_rendered_ahead(tmp_path, monkeypatch):
    cfgs = [TINY, replace(TINY, seed=1, lr=2e-3, batch_size=2)]
    plain = [tmp_path / "p0", tmp_path / "p1"]
    train_pack(cfgs, plain, progress=False)
    monkeypatch.setattr(kcap.prefetch, "PREFETCH_ON_CPU", True)
    ahead = [tmp_path / "a0", tmp_path / "a1"]
    train_pack(cfgs, ahead, progress=False)
    for a, p in zip(ahead, plain):
        assert files(a) == files(p)
