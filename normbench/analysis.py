"""The lecture's questions, measured in a run: loss smoothness, BN's train/eval gap, dead units.

(Stub: the analysis issue fills this in.) ``make_analysis(cfg, trainer)`` returns None when
no ``analysis.*`` option is on, so the training step pays nothing for it.
"""
from __future__ import annotations


class Analysis:
    """Hooks the engine calls; every method is optional work driven by ``cfg.analysis``."""

    def __init__(self, cfg, trainer):
        self.cfg = cfg

    def after_backward(self, trainer, x, y, loss) -> None:
        """Gradients of this step are in ``.grad`` (before clipping); must not change them."""

    def on_epoch_end(self, trainer, epoch: int, tb) -> None:
        """After the epoch's evaluation, before its checkpoint."""

    def on_finish(self, trainer, tb) -> dict:
        """Extra summary fields for a completed run."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def make_analysis(cfg, trainer):
    return None
