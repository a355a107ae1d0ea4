"""Runs that differ only in seed, trained as one packed network (:mod:`normbench.training.packing`).

Each member keeps its own :class:`~normbench.training.run.Run` (run folder, counters,
metrics, checkpoint, summary); the packed network is the working copy. :class:`PackedStepper`
is the training loop's stepper for it: one step trains every member, and :meth:`sync`
unpacks the packed weights, buffers and momentum into the members' own models and optimizers
(an exact copy) before every checkpoint and every measurement, so a packed run's folder is
indistinguishable from a solo one and can even be resumed alone. The measurements that only
need a member's parameters and buffers (the fixed-mode probe, dead units, the train-mode
evaluation, precise BN) run on each member's own model.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from normbench.config import RunConfig, dump_config
from normbench.errors import RunFolderError, UserError
from normbench.evaluation import sum_dtype
from normbench.progress import PrefixedMessages, Progress
from normbench.training.loop import train_loop
from normbench.training.packing import pack_key, pack_models, unpack_state, unpack_tensor, why_not_packable
from normbench.training.records import check_summary_data, completed_result
from normbench.training.run import Run
from normbench.training.signals import StopFlag


class PackedStepper:
    """Trains member runs (same step, same pack key) as one packed network."""

    def __init__(self, members: list[Run]):
        from normbench.device import memory_format
        from normbench.training.optim import build_optimizer

        self.runs, self.k = members, len(members)
        lead = members[0]
        self.cfg, self.device = lead.cfg, lead.device
        self.label = f"packed x{self.k} {lead.cfg.run_name}"
        self.distributed = False
        self.stops_mid_interval = False  # stops right after a log line: the checkpoint holds every interval
        self.summary_extra = {"packed_members": self.k}
        self.model = pack_models([m.model for m in members]).to(self.device,
                                                               memory_format=memory_format(lead.channels_last))
        self.optimizer = build_optimizer(self.cfg, self.model)
        self._pack_optimizer_state()
        self.params = [p for p in self.model.parameters()]
        self.max_norm = torch.tensor(float(self.cfg.clip.max_norm), device=self.device)
        self.shift = lead.normalize.shift.repeat(1, self.k, 1, 1)  # member k's channels 3k..3k+2
        self.scale = lead.normalize.scale.repeat(1, self.k, 1, 1)
        self.progress_modules = [m for m in self.model.modules() if hasattr(m, "set_progress")]

    def _pack_optimizer_state(self) -> None:
        solo_params = [list(m.model.parameters()) for m in self.runs]
        for j, p in enumerate(self.model.parameters()):
            states = [m.optimizer.state.get(sp[j], {}) for m, sp in zip(self.runs, solo_params)]
            if "momentum_buffer" in states[0] and states[0]["momentum_buffer"] is not None:
                bufs = [s["momentum_buffer"].reshape(-1) for s in states]
                self.optimizer.state[p]["momentum_buffer"] = torch.cat(bufs).reshape(p.shape).clone()

    # -- the loop's interface ------------------------------------------------------------------
    def plans(self, epoch: int) -> list:
        from normbench.data import EpochPlan

        return [EpochPlan(len(m.data.train_y), m.cfg.train.batch_size, m.cfg.seed, epoch, m.cfg.data.augment,
                          m.device) for m in self.runs]

    def begin_epoch(self) -> None:
        self.model.train()

    def sync(self) -> None:
        """Copy the packed weights, buffers and momentum into every member's own objects."""
        packed_state = self.model.state_dict()
        packed_params = list(self.model.parameters())
        for k, m in enumerate(self.runs):
            solo_state = m.model.state_dict()
            m.model.load_state_dict(unpack_state(packed_state, solo_state, k, self.k))
            for sp, pp in zip(m.model.parameters(), packed_params):
                buf = self.optimizer.state.get(pp, {}).get("momentum_buffer")
                if buf is not None:
                    m.optimizer.state[sp]["momentum_buffer"] = unpack_tensor(buf, sp, k, self.k)

    def member_grad_norms(self) -> torch.Tensor:
        """(K,) global L2 norm of each member's gradient."""
        sq = torch.zeros(self.k, device=self.device)
        for p in self.params:
            if p.grad is not None:
                sq += p.grad.reshape(self.k, -1).float().pow(2).sum(1)
        return sq.sqrt()

    def step(self, plans: list, i: int) -> None:
        from normbench.training.optim import lr_at

        lead = self.runs[0]
        lr = lr_at(self.cfg, lead.state.step, lead.total_steps, lead.steps_per_epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        for mod in self.progress_modules:
            mod.set_progress(lead.state.step / lead.steps_per_epoch)
        xs, ys = zip(*(plan.batch(m.data, i) for plan, m in zip(plans, self.runs)))
        x = torch.addcmul(self.shift, torch.cat(xs, 1).to(torch.float32), self.scale)  # (B, 3K, 32, 32)
        x = x.contiguous(memory_format=lead.normalize.memory_format)
        y = torch.stack(ys, 1)  # (B, K)
        out = self.model(x)  # (B, K, 10)
        per_sample = F.cross_entropy(out.transpose(1, 2), y, reduction="none")  # (B, K)
        member_loss = per_sample.mean(0)
        self.optimizer.zero_grad(set_to_none=True)
        member_loss.sum().backward()
        norms = self.member_grad_norms()
        if self.cfg.clip.mode == "norm":  # g_k <- min(1, c / ||g_k||) g_k for each member k
            coef = torch.clamp(self.max_norm / norms, max=1.0)[:, None]
            for p in self.params:
                if p.grad is not None:
                    p.grad.copy_((p.grad.reshape(self.k, -1) * coef).reshape(p.grad.shape))
            clipped = (norms > self.max_norm).float()
            threshold = self.max_norm
        else:
            clipped = torch.zeros(self.k, device=self.device)
            threshold = torch.tensor(float("nan"), device=self.device)
        self.optimizer.step()
        correct = (out.detach().argmax(2) == y).sum(0)
        for k, m in enumerate(self.runs):
            m.metrics.add(member_loss[k].detach(), correct[k], norms[k], clipped[k], threshold)
            m.state.step += 1

    @torch.no_grad()
    def evaluate(self, on_images=None) -> list[dict]:
        """Every member's test loss and accuracy from one pass of the packed network;
        ``on_images(n)`` hears after each batch how many test images are done."""
        lead = self.runs[0]
        batch_size = self.cfg.train.eval_batch_size
        self.model.eval()
        data = lead.data
        wide = sum_dtype(self.device)
        loss = torch.zeros(self.k, device=self.device, dtype=wide)
        correct = torch.zeros(self.k, device=self.device, dtype=torch.long)
        n = len(data.test_y)
        for start in range(0, n, batch_size):
            x = lead.normalize(data.test_x[start:start + batch_size]).repeat(1, self.k, 1, 1)
            y = data.test_y[start:start + batch_size]
            out = self.model(x.contiguous(memory_format=lead.normalize.memory_format))
            yk = y[:, None].expand(-1, self.k)
            loss += F.cross_entropy(out.transpose(1, 2).float(), yk, reduction="none").sum(0).to(wide)
            correct += (out.argmax(2) == yk).sum(0)
            if on_images is not None:
                on_images(min(start + batch_size, n))
        self.model.train()
        return [{"loss": float(l) / n, "acc": int(c) / n} for l, c in zip(loss.tolist(), correct.tolist())]


MemberError = Callable[[int, RunFolderError], Optional[dict]]


def train_packed(cfgs: list[RunConfig], progress: Optional[Progress] = None,
                 fresh: Union[bool, Sequence[bool]] = False,
                 on_member_error: Optional[MemberError] = None) -> list[Optional[dict]]:
    """Train runs that share a pack key as one packed network; returns their summaries.

    ``fresh``: start every member from scratch (True), or one flag per member (a sweep's
    ``--rerun-failed`` retrains a failed member while another resumes). Completed members
    are skipped; the rest must start from the same step (all new, or all resumed from
    checkpoints at the same step), otherwise each trains alone; so does the one member left.

    A member whose run folder cannot be resumed (a damaged checkpoint, results made on other
    data) raises, unless ``on_member_error(index, error)`` is given: then that member is
    left out untouched, the others train without it, and its entry in the returned list is
    what the callback returned."""
    from normbench.data import data_identity, load_cifar10
    from normbench.device import device_line, resolve_device
    from normbench.tracking import RunDir
    from normbench.training.entry import train

    progress = progress or Progress()
    if len({pack_key(c) for c in cfgs}) != 1:
        raise UserError("train_packed: cells differ in more than their seed")
    for c in cfgs:
        reason = why_not_packable(c)
        if reason:
            raise UserError(f"cannot pack {c.run_name}: {reason}")
    fresh_flags = [fresh] * len(cfgs) if isinstance(fresh, bool) else list(fresh)
    if len(fresh_flags) != len(cfgs):
        raise ValueError(f"train_packed: {len(fresh_flags)} fresh flags for {len(cfgs)} runs")
    summaries: dict[int, Optional[dict]] = {}
    recorded: dict[int, dict] = {}
    todo = []

    def leave_out(idx: int, err: RunFolderError) -> None:
        if on_member_error is None:
            raise err
        summaries[idx] = on_member_error(idx, err)

    for idx, cfg in enumerate(cfgs):
        run_dir = RunDir(cfg.run_dir())
        run_dir.create()
        if fresh_flags[idx]:
            run_dir.wipe()
        try:
            existing = run_dir.read_summary()
            done = completed_result(run_dir, existing, cfg, lambda cfg=cfg: data_identity(cfg.data, progress.message))
        except RunFolderError as err:
            leave_out(idx, err)
            continue
        if done is not None:
            summaries[idx] = done
        else:
            todo.append(idx)
            if existing is not None:
                recorded[idx] = existing
    if not todo:
        return [summaries[i] for i in range(len(cfgs))]
    lead_cfg = cfgs[todo[0]]
    device = resolve_device(lead_cfg.device)
    if lead_cfg.threads:
        torch.set_num_threads(lead_cfg.threads)
    data = load_cifar10(lead_cfg.data, log=progress.message).to(device)
    progress.message(device_line(lead_cfg.device, device))
    members: dict[int, Run] = {}
    for idx in todo:
        cfg = cfgs[idx]
        run = Run(cfg, RunDir(cfg.run_dir()), PrefixedMessages(progress, f"{cfg.run_name} (seed {cfg.seed}): "),
                  data=data)
        try:
            if idx in recorded:
                check_summary_data(run.run_dir.path, recorded[idx], data.identity, cfg)
            run.resume_or_start()
        except RunFolderError as err:
            leave_out(idx, err)
            continue
        run.run_dir.write_config(dump_config(cfg))
        members[idx] = run
    if len(members) == 1 or len({m.state.step for m in members.values()}) > 1:  # no packing: each alone
        for idx in members:
            summaries[idx] = train(cfgs[idx], progress=progress)
    elif members:
        stop = StopFlag()
        with stop.installed():
            results = train_loop(PackedStepper(list(members.values())), progress, stop)
        for (idx, m), summary in zip(members.items(), results):
            summaries[idx] = {**summary, "run_dir": str(m.run_dir.path)}
    return [summaries[i] for i in range(len(cfgs))]
