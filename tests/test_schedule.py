import math

import pytest

from merv.schedule import warmup_cosine


def test_warmup_cosine():
    total, warm = 10, 2
    lrs = [warmup_cosine(s, total, warm) for s in range(total)]
    assert lrs[0] == 0.5 and lrs[1] == 1.0
    assert lrs[2] == pytest.approx(1.0)
    assert lrs[6] == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 8)))
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:], strict=False)), "monotone decay after warmup"
