import math

import numpy as np
import pytest

from kcap.budget import count_tokens, learning_rate, paper_recipe, steps_for
from kcap.data.bios import BioS, BioSConfig
from kcap.data.stream import ExposureStream


def test_schedule_warmup_then_cosine_to_a_tenth():
    peak, steps, warm = 1e-3, 1000, 100
    lrs = [learning_rate(s, steps, peak, warm) for s in range(steps + 1)]
    assert lrs[0] == pytest.approx(peak / warm) and lrs[warm - 1] == pytest.approx(peak)
    assert max(lrs) == pytest.approx(peak)
    assert lrs[steps] == pytest.approx(0.1 * peak)
    mid = warm + (steps - warm) // 2
    assert lrs[mid] == pytest.approx(peak * (0.1 + 0.9 * 0.5))
    assert all(a >= b for a, b in zip(lrs[warm:], lrs[warm + 1:]))


def test_steps_come_from_the_tokens_of_the_exposures():
    ds = BioS(BioSConfig(n=50))
    stream = ExposureStream(ds, 4, window=129)
    tokens = count_tokens(stream, chunk=37)
    assert tokens == int(ds.lengths(*stream.bios(np.arange(200))).sum())
    assert steps_for(tokens, 8, 129) == math.ceil(tokens / (8 * 129))
    assert steps_for(tokens, 8, 129, useful_fraction=1 / 8) == math.ceil(tokens * 8 / (8 * 129))
    with pytest.raises(ValueError):
        steps_for(tokens, 0, 129)


def test_paper_recipe_rows():
    assert paper_recipe(10_000, 1000) == {"weight_decay": 0.02, "lr": 1e-3, "batch_size": 24}
    assert paper_recipe(1_000_000, 1000) == {"weight_decay": 0.01, "lr": 5e-4, "batch_size": 192}
    assert paper_recipe(10_000_000, 1000)["batch_size"] == 1536
    assert paper_recipe(50_000, 100) == {"weight_decay": 0.01, "lr": 1e-3, "batch_size": 12}
    assert paper_recipe(100_000, 100)["batch_size"] == 24
    assert paper_recipe(1000, 100, "bioD") == {"weight_decay": 0.01, "lr": 5e-4, "batch_size": 192}
