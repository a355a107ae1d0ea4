"""What the training loop tells its progress view besides steps: the test-set evaluations
and end-of-run measurements still due (for the ETA), and the words for those phases."""
from __future__ import annotations

from dataclasses import dataclass, field


def evaluations_due_after(cfg, epochs_done: int) -> int:
    """Test-set evaluations in the epochs after ``epochs_done``: every ``train.eval_every``
    epochs, and after the last one."""
    last, every = cfg.train.epochs, cfg.train.eval_every
    return sum(1 for e in range(epochs_done + 1, last + 1) if e % every == 0 or e == last)


def has_running_stats(model) -> bool:
    """Whether precise BN has statistics to recompute: the rule of
    :func:`normbench.analysis.batch_stats.running_stat_layers`, which the measurement uses."""
    from normbench.analysis.batch_stats import running_stat_layers
    from normbench.analysis.common import unwrap

    return bool(running_stat_layers(unwrap(model)))


@dataclass
class FinalWork:
    """The end-of-run measurements of some runs: ``passes`` test-set evaluations' worth of
    eval-mode forwards (precise BN: its recalibration images, then the test set),
    ``forward_images`` train-mode forwards at the run's batch (the train-mode evaluation),
    and what they are, for people."""

    passes: float = 0.0
    forward_images: int = 0
    parts: list[str] = field(default_factory=list)
    runs: int = 0

    def text(self) -> str:
        whose = f" of {self.runs} runs" if self.runs > 1 else ""
        return f"end-of-run measurements{whose}: " + ", ".join(self.parts)


def final_work(runs) -> FinalWork:
    """What the end-of-run measurements (normbench.analysis.hooks.Analysis.on_finish) of
    ``runs`` will do; empty when none applies."""
    work = FinalWork()
    for r in runs:
        a = r.analysis
        if a is None or not a.main:
            continue
        n_test = len(r.data.test_y)
        parts = []
        if a.gap:
            b = r.cfg.train.batch_size
            from normbench.evaluation import images_evaluated

            usable = images_evaluated(n_test, b, train_mode=True)
            work.forward_images += usable
            parts.append(f"train-mode evaluation ({usable:,} test images at batch {b})")
        if r.cfg.analysis.precise_bn and has_running_stats(r.model):
            images = min(r.cfg.analysis.precise_bn_images, len(r.data.train_y))
            work.passes += 1 + images / max(1, n_test)
            parts.append(f"precise BN ({images:,} training images, then the test set)")
        if a.dead and a.last_dead is None:
            parts.append("dead units")
        if parts:
            work.runs += 1
            work.parts.extend(p for p in parts if p not in work.parts)
    return work
