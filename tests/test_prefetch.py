"""Batches rendered ahead by a thread (kcap/prefetch.py): the same batches in the same order,
checkpoints that record the batches consumed (not those rendered ahead), and training that
is byte for byte the same with and without it (forced on here: on a CPU it is off)."""
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
