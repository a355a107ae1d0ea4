"""The measurements' hooks into training: what runs before a step, after a backward, at the end
of an epoch and at the end of a run, and what travels in the checkpoint.

The training loop hands a hook a :class:`RunView`: the run's model, data, normalizer, device,
step counters, learning rate, last evaluation and metrics file, and nothing else of the
run. Every hook measures on a copy of the model and restores the RNG states, so the
training trajectory is the same with the measurements on or off.
"""
from __future__ import annotations

import math
from typing import Optional, Protocol, Sequence

import torch

from normbench.analysis.activations import activation_stats, dead_units, probe_images
from normbench.analysis.batch_stats import precise_bn_eval, train_eval_gap
from normbench.analysis.probes import (PROBE_TAGS, fixed_probe_tags, probe_batch, probe_model, probe_model_fixed,
                                       probe_schedule, snapshot_buffers)


class RunView(Protocol):
    """What a measurement may read of a run (normbench.training.run.Run provides it)."""

    cfg: object
    model: torch.nn.Module
    data: object  # normbench.data.CIFAR10 on the run's device
    normalize: object  # normbench.data.Normalizer
    device: torch.device
    dist: object  # normbench.distributed.DistContext
    steps_per_epoch: int
    total_steps: int

    @property
    def step(self) -> int: ...  # optimizer steps taken
    @property
    def lr(self) -> float: ...  # the learning rate of the step being taken
    @property
    def last_eval(self) -> dict: ...  # the last test evaluation ({} before the first)
    def append_metrics(self, record: dict) -> None: ...


def median(values: Sequence[float]) -> Optional[float]:
    """The median (mean of the middle two for an even count), None when empty."""
    v = sorted(values)
    n = len(v)
    if not n:
        return None
    return v[n // 2] if n % 2 else 0.5 * (v[n // 2 - 1] + v[n // 2])


class Analysis:
    """Hooks the training loop calls; every method is optional work driven by ``cfg.analysis``.

    ``wants_steps`` is False unless the lr-mode probe or the histograms are on (and this is the
    main process): the training loop then does not call :meth:`after_backward` at all, so a run with
    only the end-of-run measurements pays nothing per step. The fixed-mode probe needs no
    hook inside the step: the training loop compares its step with ``next_probe_step`` before each.
    Histograms wait on the device until the epoch ends (2 C floats per norm layer per
    histogram step): keep ``hist_every`` coarse.
    """

    def __init__(self, cfg, run: RunView):
        from normbench.norms import get_scheme

        a = cfg.analysis
        self.cfg = cfg
        self.fixed = a.probe and a.probe_mode == "fixed"  # fixed-distance probe on the held-out batch
        self.probe_every = a.probe_every if (a.probe and not self.fixed) else None
        self.multipliers = [float(s) for s in a.probe_multipliers]
        self.distances = sorted(float(t) for t in a.probe_distances)
        self.probe_tags = fixed_probe_tags(self.distances) if self.fixed else list(PROBE_TAGS)
        self.hist_every = a.hist_every
        self.dead = a.dead_units
        self.dead_images = a.dead_units_images
        self.gap = a.train_mode_eval and get_scheme(cfg.norm.kind).batch_dependent
        dist = getattr(run, "dist", None)
        self.main = getattr(dist, "is_main", True)  # under torchrun only rank 0 measures and writes
        self.distributed = getattr(dist, "enabled", False)
        self.wants_steps = self.main and (self.probe_every is not None or self.hist_every is not None)
        self.device = getattr(run, "device", None)
        self.pending_probes: list[tuple[int, torch.Tensor]] = []
        self.pending_hists: list[tuple[int, torch.Tensor]] = []
        self.pre_step_buffers: Optional[list[torch.Tensor]] = None  # see before_forward
        self.hist_layers: list[str] = []
        self.hist_sizes: list[int] = []
        self.probe_sums = [0.0, 0.0, 0.0]  # loss_range, grad_pred, beta over flushed probes
        self.probe_count = 0
        self.probe_betas: list[float] = []  # every flushed finite beta (for the median)
        self.probe_linearities: list[float] = []  # fixed mode
        self.last_dead: Optional[dict] = None
        # fixed mode: the steps whose parameters are probed; the training loop compares its step with
        # next_probe_step before every step (and at epoch ends), so the probe costs nothing else
        self.probe_steps = (probe_schedule(run.total_steps, a.probes_per_run)
                            if self.fixed and self.main and getattr(run, "total_steps", None) else [])
        self.last_probe_step = -1
        self.next_probe_step: Optional[int] = None
        self._advance_probe()

    # -- fixed probe ---------------------------------------------------------------------
    def _advance_probe(self) -> None:
        later = [k for k in self.probe_steps if k > self.last_probe_step]
        self.next_probe_step = later[0] if later else None

    def probe_if_due(self, run: RunView) -> None:
        """Fixed mode: probe the parameters as they are now (after ``run.step``
        steps) when that step is on the schedule and not yet probed. Called before every step,
        at every epoch end and at the end; a resumed run probes each step once (the last
        probed step travels in the checkpoint). Packed members call it with their own model,
        unpacked from the packed network just before."""
        step = run.step
        if self.next_probe_step is None or step != self.next_probe_step:
            return
        x, y = probe_batch(run.data, run.normalize, self.cfg.analysis.probe_images)
        result = probe_model_fixed(run.model, x, y, self.distances, self.device)
        self.pending_probes.append((step, result.vector()))
        self.last_probe_step = step
        self._advance_probe()

    # -- per step --------------------------------------------------------------------------
    def _probes_at(self, step: int) -> bool:
        return self.probe_every is not None and step % self.probe_every == 0

    def before_forward(self, run: RunView) -> None:
        """On a probe step, keep the buffers the step's forward is about to update."""
        self.pre_step_buffers = snapshot_buffers(run.model) if self._probes_at(run.step) else None

    def after_backward(self, run: RunView, x, y, loss, autocast=None) -> None:
        """Gradients of this step are in ``.grad`` (before clipping); they are only read."""
        if not self.wants_steps:
            return
        step = run.step
        if self._probes_at(step):
            lr = run.lr
            result = probe_model(run.model, x, y, lr, self.multipliers, loss=loss, device=self.device,
                                 use_model_grads=not self.distributed, autocast=autocast,
                                 buffers=self.pre_step_buffers)
            self.pre_step_buffers = None
            self.pending_probes.append((step, result.vector()))
        if self.hist_every is not None and step % self.hist_every == 0:
            names, sizes, flat = activation_stats(run.model, x.detach(), self.device)
            self.hist_layers, self.hist_sizes = names, sizes
            self.pending_hists.append((step, flat))

    # -- logging ---------------------------------------------------------------------------
    def _flush(self, run: RunView, tb) -> None:
        spe = max(1, run.steps_per_epoch)
        if self.pending_probes:
            values = torch.stack([v for _, v in self.pending_probes]).cpu().tolist()  # one host read
            for (step, _), row in zip(self.pending_probes, values):
                record = {"step": step, "epoch": round(step / spe, 4), **dict(zip(self.probe_tags, row))}
                run.append_metrics(record)
                if tb is not None:
                    tb.scalars(step, {k: v for k, v in record.items() if "/" in k})
                if all(math.isfinite(v) for v in row[:3]):
                    self.probe_count += 1
                    for i in range(3):
                        self.probe_sums[i] += row[i]
                    self.probe_betas.append(row[2])
                    if self.fixed and math.isfinite(row[6]):
                        self.probe_linearities.append(row[6])
            self.pending_probes = []
        if self.pending_hists:
            for step, flat in self.pending_hists:
                flat = flat.cpu()
                offset = 0
                for name, c in zip(self.hist_layers, self.hist_sizes):
                    if tb is not None:
                        tb.histogram(f"act/{name}/mean", flat[offset:offset + c], step)
                        tb.histogram(f"act/{name}/std", flat[offset + c:offset + 2 * c], step)
                    offset += 2 * c
            self.pending_hists = []

    def on_epoch_end(self, run: RunView, epoch: int, tb) -> None:
        """After the epoch's evaluation, before its checkpoint: write pending probes and
        histograms, then measure dead units when enabled. Fixed mode: a probe due at this
        step (the epoch's last parameters) is taken first."""
        if not self.main:
            return
        self.probe_if_due(run)
        self._flush(run, tb)
        if self.dead:
            x = probe_images(run.data, run.normalize, self.dead_images, self.cfg.train.batch_size)
            result = dead_units(run.model, x, self.cfg.train.batch_size, self.device)
            self.last_dead = result
            record = {"step": run.step, "epoch": epoch, **{f"dead/{k}": v for k, v in result.items()}}
            run.append_metrics(record)
            if tb is not None:
                tb.scalars(run.step, {k: v for k, v in record.items() if "/" in k})

    def on_finish(self, run: RunView, tb) -> dict:
        """Extra summary fields for a completed run."""
        if not self.main:
            return {}
        self.probe_if_due(run)
        self._flush(run, tb)
        out: dict = {}
        if self.gap and run.last_eval:
            out.update(train_eval_gap(run.model, run.data, run.normalize, self.cfg.train.batch_size,
                                      self.cfg.train.eval_batch_size, eval_acc=run.last_eval["acc"]))
            record = {"step": run.step, "gap/test_acc_eval_mode": out["test_acc_eval_mode"],
                      "gap/test_acc_train_mode": out["test_acc_train_mode"], "gap/train_eval_gap": out["train_eval_gap"]}
            run.append_metrics(record)
            if tb is not None:
                tb.scalars(run.step, {k: v for k, v in record.items() if "/" in k})
        if self.cfg.analysis.precise_bn:
            a = self.cfg.analysis
            out.update(precise_bn_eval(run.model, run.data, run.normalize, a.precise_bn_images,
                                       a.precise_bn_batch, self.cfg.train.eval_batch_size, self.device))
            if out["test_acc_precise_bn"] is not None:
                record = {"step": run.step, "gap/test_acc_precise_bn": out["test_acc_precise_bn"]}
                run.append_metrics(record)
                if tb is not None:
                    tb.scalars(run.step, {k: v for k, v in record.items() if "/" in k})
        if self.dead:
            if self.last_dead is None:
                x = probe_images(run.data, run.normalize, self.dead_images, self.cfg.train.batch_size)
                self.last_dead = dead_units(run.model, x, self.cfg.train.batch_size, self.device)
            out["dead_unit_frac"] = self.last_dead["all"]
            out["dead_units_by_layer"] = {k: v for k, v in self.last_dead.items() if k != "all"}
        if self.probe_every is not None or self.fixed:
            n = self.probe_count
            out.update({"probe_count": n,
                        "probe_loss_range_mean": self.probe_sums[0] / n if n else None,
                        "probe_grad_pred_mean": self.probe_sums[1] / n if n else None,
                        "probe_beta_mean": self.probe_sums[2] / n if n else None,
                        "probe_beta_median": median(self.probe_betas)})
            if self.fixed:
                out.update({"probe_mode": "fixed", "probe_linearity_median": median(self.probe_linearities)})
        return out

    # -- checkpoint ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "pending_probes": [(s, v.detach().cpu()) for s, v in self.pending_probes],
            "pending_hists": [(s, v.detach().cpu()) for s, v in self.pending_hists],
            "hist_layers": list(self.hist_layers),
            "hist_sizes": list(self.hist_sizes),
            "probe_sums": list(self.probe_sums),
            "probe_count": self.probe_count,
            "probe_betas": list(self.probe_betas),
            "probe_linearities": list(self.probe_linearities),
            "last_probe_step": self.last_probe_step,
            "last_dead": dict(self.last_dead) if self.last_dead is not None else None,
        }

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        dev = self.device or torch.device("cpu")
        self.pending_probes = [(int(s), v.to(dev)) for s, v in state.get("pending_probes", [])]
        self.pending_hists = [(int(s), v.to(dev)) for s, v in state.get("pending_hists", [])]
        self.hist_layers = list(state.get("hist_layers", []))
        self.hist_sizes = [int(c) for c in state.get("hist_sizes", [])]
        self.probe_sums = [float(v) for v in state.get("probe_sums", [0.0, 0.0, 0.0])]
        self.probe_count = int(state.get("probe_count", 0))
        self.probe_betas = [float(v) for v in state.get("probe_betas", [])]
        self.probe_linearities = [float(v) for v in state.get("probe_linearities", [])]
        self.last_probe_step = int(state.get("last_probe_step", -1))
        self._advance_probe()
        self.last_dead = state.get("last_dead")


def make_analysis(cfg, run: RunView) -> Optional[Analysis]:
    """An :class:`Analysis` when any ``analysis.*`` part applies to this run, else None (the
    training step then pays nothing). ``train_mode_eval`` applies to batch-dependent schemes."""
    from normbench.norms import get_scheme

    a = cfg.analysis
    gap = a.train_mode_eval and get_scheme(cfg.norm.kind).batch_dependent
    if not (a.probe or a.dead_units or a.hist_every is not None or gap or a.precise_bn):
        return None
    return Analysis(cfg, run)

