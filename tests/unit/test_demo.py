"""`make demo` runs mask2dit.demo: keep it working (a few steps, finite falling loss)."""

from __future__ import annotations

import math

from mask2dit import demo


def test_demo_trains_and_loss_falls(capsys):
    losses = demo.main(steps=30, batch_size=2)
    assert len(losses) == 30 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-6:]) < sum(losses[:6])
    assert "mean loss of the first 6 steps" in capsys.readouterr().out
