"""Packed runs: K sweep cells that differ only in seed train as one grouped network.

At small batch a CPU step is mostly fixed per-step overhead, so K small models run one after
another waste most of the machine. Packing turns K identical-architecture models into one
network whose every convolution is grouped (member k owns group k), every per-channel norm
has K x C channels (GroupNorm K x G groups) and the classifier is a batched matmul. Member
k's input is its own batch (its own seed's order and augmentation) in channels
3k..3k+2; its loss is its own cross-entropy; the packed loss is their sum, so each member's
gradient is exactly its own. SGD, momentum and weight decay act element-wise, so a packed
member follows the same trajectory as the same cell trained alone (up to float rounding
from different kernel blocking); clipping by norm is done per member.

Each member keeps its own :class:`~normbench.engine.Trainer` (run dir, state, metrics,
checkpoint, summary); the packed network is the working copy and is unpacked into the
members at every checkpoint, so a packed cell's folder is indistinguishable from a solo one
and can even be resumed alone.

Packable: the schemes whose layers are per-channel or grouped (bn, ghost_bn, gn, ln, in,
frn without learned eps, none) with clip modes none and norm, and neither the lr-mode
landscape probe nor activation histograms (both read each training step's own batch and
gradient). The measurements that only need a member's parameters and buffers (the fixed-mode
probe, dead units, the train-mode evaluation, precise BN) run on each member's own model,
into which the packed network is unpacked first (an exact copy): the values are those of the
same weights trained alone. Other cells run alone; :func:`why_not_packable` says why.
"""
from __future__ import annotations

import copy
import time
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from normbench.config import RunConfig, dump_config
from normbench.errors import UserError

PACKABLE_CLIP = ("none", "norm")


# ----------------------------------------------------------------------------- layers


class PackedShortcutA(nn.Module):
    """Option-A shortcut for K members: subsample, zero-pad each member's channels."""

    def __init__(self, members: int, pad: int, stride: int):
        super().__init__()
        self.members, self.pad, self.stride = members, pad, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.pad:
            b, kc, h, w = x.shape
            x = F.pad(x.reshape(b, self.members, kc // self.members, h, w), (0, 0, 0, 0, 0, self.pad))
            x = x.reshape(b, -1, h, w)
        return x


class PackedLinear(nn.Module):
    """K independent linear layers: (B, K*in) -> (B, K, out)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight)  # (K, out, in)
        self.bias = nn.Parameter(bias)  # (K, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, out, inp = self.weight.shape
        return torch.baddbmm(self.bias.unsqueeze(1), x.reshape(-1, k, inp).transpose(0, 1),
                             self.weight.transpose(1, 2)).transpose(0, 1)


def _cat_param(ps: list[torch.Tensor], dim: int = 0) -> nn.Parameter:
    return nn.Parameter(torch.cat([p.detach() for p in ps], dim))


def per_channel_size(module: nn.Module) -> Optional[int]:
    """C when the module is per-channel (``num_features``, or only 1-D parameters of one length)."""
    if hasattr(module, "num_features"):
        return int(module.num_features)
    sizes = {tuple(p.shape) for p in module.parameters(recurse=False)}
    if len(sizes) == 1 and len(next(iter(sizes))) == 1 and not list(module.buffers(recurse=False)):
        return next(iter(sizes))[0]
    return None


def _pack_leaf(mods: list[nn.Module], name: str) -> nn.Module:
    from normbench.models.resnet import ShortcutA

    first, k = mods[0], len(mods)
    if type(first) is nn.Conv2d:
        conv = nn.Conv2d(first.in_channels * k, first.out_channels * k, first.kernel_size, first.stride,
                         first.padding, groups=first.groups * k, bias=first.bias is not None)
        conv.weight = _cat_param([m.weight for m in mods])
        if first.bias is not None:
            conv.bias = _cat_param([m.bias for m in mods])
        return conv
    if isinstance(first, nn.GroupNorm):  # (normbench's GroupNorm keeps its fused ReLU)
        from normbench.norms.sample import GroupNorm

        gn = GroupNorm(first.num_groups * k, first.num_channels * k, first.eps, first.affine,
                       relu=getattr(first, "relu", False))
        if first.affine:
            gn.weight, gn.bias = _cat_param([m.weight for m in mods]), _cat_param([m.bias for m in mods])
        return gn
    if isinstance(first, ShortcutA):
        return PackedShortcutA(k, first.pad, first.stride)
    if isinstance(first, nn.Linear):
        return PackedLinear(torch.stack([m.weight.detach() for m in mods]), torch.stack([m.bias.detach() for m in mods]))
    if isinstance(first, (nn.ReLU, nn.Identity)):
        return first
    c = per_channel_size(first)
    if c is not None:  # per-channel layers: BN, Ghost BN, FRN, TLU
        packed = copy.deepcopy(first)
        if hasattr(first, "num_features"):
            packed.num_features = c * k
        for pname, p in first.named_parameters(recurse=False):
            if p.ndim != 1 or p.shape[0] != c:
                raise UserError(f"cannot pack layer {name} ({type(first).__name__}): parameter {pname} is not per-channel")
            setattr(packed, pname, _cat_param([getattr(m, pname) for m in mods]))
        for bname, b in first.named_buffers(recurse=False):
            if b is None:
                continue
            if b.ndim == 1 and b.shape[0] == c:
                packed._buffers[bname] = torch.cat([getattr(m, bname) for m in mods])
            elif b.ndim == 0:
                packed._buffers[bname] = b.clone()
            else:
                raise UserError(f"cannot pack layer {name} ({type(first).__name__}): buffer {bname}")
        return packed
    raise UserError(f"cannot pack layer {name} ({type(first).__name__})")


def pack_models(models: list[nn.Module]) -> nn.Module:
    """One network computing all ``models`` at once (same architecture, any weights)."""
    packed = copy.deepcopy(models[0])

    def walk(dst: nn.Module, srcs: list[nn.Module], prefix: str) -> None:
        for child_name, child in list(dst.named_children()):
            subs = [getattr(s, child_name) for s in srcs]
            full = f"{prefix}{child_name}"
            if len(list(child.children())) == 0:
                setattr(dst, child_name, _pack_leaf(subs, full))
            else:
                walk(child, subs, full + ".")
        own = [n for n, _ in dst.named_parameters(recurse=False)]
        if own:
            raise UserError(f"cannot pack module {prefix or 'model'} ({type(dst).__name__}): it holds parameters")

    walk(packed, models, "")
    return packed


def unpack_tensor(packed: torch.Tensor, like: torch.Tensor, k: int, members: int) -> torch.Tensor:
    """Member k's slice of a packed tensor, shaped like the solo tensor ``like``."""
    if packed.ndim == 0:
        return packed.clone()
    return packed.chunk(members, 0)[k].reshape(like.shape).clone()


def unpack_state(packed_state: dict, solo_state: dict, k: int, members: int) -> dict:
    return {name: unpack_tensor(packed_state[name], solo_state[name], k, members) for name in solo_state}


# ----------------------------------------------------------------------------- eligibility


def why_not_packable(cfg: RunConfig) -> Optional[str]:
    """None when ``cfg`` can be packed, else the reason."""
    if cfg.norm.kind not in ("bn", "ghost_bn", "gn", "ln", "in", "frn", "none"):
        return f"norm '{cfg.norm.kind}' has layers that packing does not support"
    if cfg.norm.kind == "frn" and cfg.norm.learn_eps:
        return "frn with learn_eps has a per-layer scalar"
    if cfg.clip.mode not in PACKABLE_CLIP:
        return f"clip mode '{cfg.clip.mode}' is not per-member yet"
    a = cfg.analysis
    if a.probe and a.probe_mode != "fixed":
        return "the lr-mode landscape probe reads each training step's own gradient (probe_mode fixed packs)"
    if a.hist_every:
        return "activation histograms read each training step's own batch"
    return None


def pack_key(cfg: RunConfig) -> str:
    """Cells with the same key differ only in seed (and name) and may be packed together."""
    body = cfg.to_dict()
    body.pop("seed")
    body.pop("name")
    return RunConfig.model_validate(body).config_hash()


# ----------------------------------------------------------------------------- training


class PackedTrainer:
    """Trains member Trainers (same step, same pack key) as one packed network."""

    def __init__(self, members: list):
        self.members, self.k = members, len(members)
        lead = members[0]
        self.cfg, self.device = lead.cfg, lead.device
        memory_format = torch.channels_last if lead.channels_last else torch.contiguous_format
        self.model = pack_models([m.model for m in members]).to(self.device, memory_format=memory_format)
        from normbench.engine import build_optimizer

        self.optimizer = build_optimizer(self.cfg, self.model)
        self._pack_optimizer_state()
        self.params = [p for p in self.model.parameters()]
        self.max_norm = torch.tensor(float(self.cfg.clip.max_norm), device=self.device)
        self.shift = lead.normalize.shift.repeat(1, self.k, 1, 1)  # member k's channels 3k..3k+2
        self.scale = lead.normalize.scale.repeat(1, self.k, 1, 1)
        self.progress_modules = [m for m in self.model.modules() if hasattr(m, "set_progress")]

    # -- optimizer state -------------------------------------------------------------------
    def _pack_optimizer_state(self) -> None:
        solo_params = [list(m.model.parameters()) for m in self.members]
        for j, p in enumerate(self.model.parameters()):
            states = [m.optimizer.state.get(sp[j], {}) for m, sp in zip(self.members, solo_params)]
            if "momentum_buffer" in states[0] and states[0]["momentum_buffer"] is not None:
                bufs = [s["momentum_buffer"].reshape(-1) for s in states]
                self.optimizer.state[p]["momentum_buffer"] = torch.cat(bufs).reshape(p.shape).clone()

    def unpack_into_members(self) -> None:
        """Copy the packed weights, buffers and momentum into every member's own objects."""
        packed_state = self.model.state_dict()
        packed_params = list(self.model.parameters())
        for k, m in enumerate(self.members):
            solo_state = m.model.state_dict()
            m.model.load_state_dict(unpack_state(packed_state, solo_state, k, self.k))
            for sp, pp in zip(m.model.parameters(), packed_params):
                buf = self.optimizer.state.get(pp, {}).get("momentum_buffer")
                if buf is not None:
                    m.optimizer.state[sp]["momentum_buffer"] = unpack_tensor(buf, sp, k, self.k)

    # -- one step ------------------------------------------------------------------------------
    def member_grad_norms(self) -> torch.Tensor:
        """(K,) global L2 norm of each member's gradient."""
        sq = torch.zeros(self.k, device=self.device)
        for p in self.params:
            if p.grad is not None:
                sq += p.grad.reshape(self.k, -1).float().pow(2).sum(1)
        return sq.sqrt()

    def step(self, plans: list, i: int) -> None:
        from normbench.engine import lr_at

        lead = self.members[0]
        lr = lr_at(self.cfg, lead.state.step, lead.total_steps, lead.steps_per_epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        for mod in self.progress_modules:
            mod.set_progress(lead.state.step / lead.steps_per_epoch)
        xs, ys = zip(*(plan.batch(m.data, i) for plan, m in zip(plans, self.members)))
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
        for k, m in enumerate(self.members):
            b = m._buffers
            b["loss"].append(member_loss[k].detach())
            b["correct"].append(correct[k])
            b["norm"].append(norms[k])
            b["clipped"].append(clipped[k])
            b["threshold"].append(threshold)
            m.state.step += 1

    @torch.no_grad()
    def evaluate(self, batch_size: int) -> list[dict]:
        lead = self.members[0]
        self.model.eval()
        data = lead.data
        loss = torch.zeros(self.k, device=self.device, dtype=torch.float64)
        correct = torch.zeros(self.k, device=self.device, dtype=torch.long)
        n = len(data.test_y)
        for start in range(0, n, batch_size):
            x = lead.normalize(data.test_x[start:start + batch_size]).repeat(1, self.k, 1, 1)
            y = data.test_y[start:start + batch_size]
            out = self.model(x.contiguous(memory_format=lead.normalize.memory_format))
            yk = y[:, None].expand(-1, self.k)
            loss += F.cross_entropy(out.transpose(1, 2).float(), yk, reduction="none").sum(0).double()
            correct += (out.argmax(2) == yk).sum(0)
        self.model.train()
        return [{"loss": float(l) / n, "acc": int(c) / n} for l, c in zip(loss.tolist(), correct.tolist())]


def train_packed(cfgs: list[RunConfig], progress=None, fresh: bool = False) -> list[dict]:
    """Train cells that share a pack key as one packed network; returns their summaries.

    Completed members are skipped; the rest must start from the same step (all new, or all
    resumed from checkpoints at the same step) — otherwise each trains alone."""
    from normbench import engine
    from normbench.data import data_identity, load_cifar10
    from normbench.tracking import RunDir

    progress = progress or engine.Progress()
    keys = {pack_key(c) for c in cfgs}
    if len(keys) != 1:
        raise UserError("train_packed: cells differ in more than their seed")
    for c in cfgs:
        reason = why_not_packable(c)
        if reason:
            raise UserError(f"cannot pack {c.run_name}: {reason}")
    summaries: dict[int, dict] = {}
    recorded: dict[int, dict] = {}
    todo = []
    for idx, cfg in enumerate(cfgs):
        run_dir = RunDir(cfg.run_dir())
        run_dir.create()
        if fresh:
            run_dir.wipe()
        existing = run_dir.read_summary()
        if existing is not None and existing.get("status") == "completed":
            engine.check_summary_data(run_dir.path, existing, data_identity(cfg.data, progress.message), cfg)
            summaries[idx] = {**existing, "skipped": True}
        else:
            todo.append(idx)
            if existing is not None:
                recorded[idx] = existing
    if not todo:
        return [summaries[i] for i in range(len(cfgs))]
    lead_cfg = cfgs[todo[0]]
    device = engine.resolve_device(lead_cfg.device)
    if lead_cfg.threads:
        torch.set_num_threads(lead_cfg.threads)
    data = load_cifar10(lead_cfg.data, log=progress.message).to(device)
    members = []
    for idx in todo:
        cfg = cfgs[idx]
        trainer = engine.Trainer(cfg, RunDir(cfg.run_dir()), engine.Progress(), data=data)
        if idx in recorded:
            engine.check_summary_data(trainer.run_dir.path, recorded[idx], data.identity, cfg)
        ckpt = trainer.run_dir.load_checkpoint()
        if ckpt is not None:
            trainer.restore(ckpt)
        else:
            trainer.run_dir.truncate_metrics(0)
        trainer.run_dir.write_config(dump_config(cfg))
        members.append(trainer)
    steps = {m.state.step for m in members}
    if len(steps) > 1:  # members at different points: no packing, each alone
        for idx in todo:
            summaries[idx] = engine.train(cfgs[idx], progress=progress)
        return [summaries[i] for i in range(len(cfgs))]
    packed = PackedTrainer(members)
    stop = engine.StopFlag()
    with stop.installed():
        _run_packed(packed, progress, stop)
    for idx, m in zip(todo, members):
        summaries[idx] = {**m.final_summary, "run_dir": str(m.run_dir.path)}
    return [summaries[i] for i in range(len(cfgs))]


def _save_members(members: list, walls: list, t0: float, status: dict) -> float:
    """Checkpoint every still-healthy member (after unpacking); returns the time of the save."""
    elapsed = time.perf_counter() - t0
    for m, w in zip(members, walls):
        m.state.wall_time_s = w + elapsed
        if status[id(m)] == "completed":
            m.save()
    return time.perf_counter()


def _probe_members(packed: PackedTrainer, status: dict) -> None:
    """Fixed-mode probes due before this step: unpack the packed weights and buffers into the
    members (exact copies), then each member probes its own model, as a run alone does."""
    step = packed.members[0].state.step
    due = [m for m in packed.members
           if m.analysis is not None and m.analysis.next_probe_step == step and status[id(m)] == "completed"]
    if not due:
        return
    packed.unpack_into_members()
    for m in due:
        m.analysis.probe_if_due(m)


def _run_packed(packed: PackedTrainer, progress, stop=None) -> None:
    """The packed training loop. ``stop`` (an engine.StopFlag): on SIGINT/SIGTERM every
    still-healthy member is unpacked, checkpointed and marked ``interrupted``."""
    from normbench.data import EpochPlan
    from normbench.engine import buffers_finite
    from normbench.tracking import TensorBoardLog

    members, cfg = packed.members, packed.cfg
    lead = members[0]
    tbs = [TensorBoardLog(m.run_dir.tb, cfg.log.tensorboard, purge_step=m.state.step or None) for m in members]
    t0 = last_save = time.perf_counter()
    walls = [m.state.wall_time_s for m in members]
    status = {id(m): "completed" for m in members}
    notes: dict[int, tuple] = {}
    progress.start(f"packed x{packed.k} {lead.cfg.run_name}", lead.total_steps, lead.state.step, lead.steps_per_epoch)
    for m in members:
        m._interval_t0 = time.perf_counter()
    try:
        while lead.state.step < lead.total_steps:
            epoch, in_epoch = divmod(lead.state.step, lead.steps_per_epoch)
            plans = [EpochPlan(len(m.data.train_y), m.cfg.train.batch_size, m.cfg.seed, epoch, m.cfg.data.augment,
                               m.device) for m in members]
            for i in range(in_epoch, lead.steps_per_epoch):
                _probe_members(packed, status)
                packed.step(plans, i)
                if len(lead._buffers["loss"]) >= cfg.train.log_every or i == lead.steps_per_epoch - 1:
                    for m, tb in zip(members, tbs):
                        bad = m.flush(tb, m.state.step / m.steps_per_epoch)
                        if bad is not None and status[id(m)] == "completed":
                            status[id(m)] = "diverged"
                            notes[id(m)] = (bad, f"non-finite loss or gradient at step {bad}")
                    progress.update(lead.state.step, lead.last_record)
                    if time.perf_counter() - last_save >= cfg.log.checkpoint_every_s and i < lead.steps_per_epoch - 1:
                        packed.unpack_into_members()  # mid-epoch checkpoint of every member
                        last_save = _save_members(members, walls, t0, status)
                if stop is not None and stop.signum is not None and not lead._buffers["loss"]:
                    break  # right after a flush: the checkpoint holds every logged interval
            if stop is not None and stop.signum is not None:
                packed.unpack_into_members()
                _save_members(members, walls, t0, status)
                for m in members:
                    if status[id(m)] == "completed":
                        status[id(m)] = "interrupted"
                break
            epoch_done = lead.state.step // lead.steps_per_epoch
            if epoch_done % cfg.train.eval_every == 0 or lead.state.step >= lead.total_steps:
                results = packed.evaluate(cfg.train.eval_batch_size)
                packed.unpack_into_members()
                for m, tb, result in zip(members, tbs, results):
                    if status[id(m)] != "completed":
                        continue
                    bad_buffer = buffers_finite(m.model)
                    if bad_buffer is not None:
                        status[id(m)] = "diverged"
                        notes[id(m)] = (m.state.step, f"buffer {bad_buffer} is not finite after step {m.state.step}")
                        continue
                    m.state.last_eval = {"epoch": epoch_done, **result}
                    m.state.best_acc = max(m.state.best_acc, result["acc"])
                    m.run_dir.append_metrics({"step": m.state.step, "epoch": epoch_done,
                                              "test/loss": result["loss"], "test/acc": result["acc"]})
                    tb.scalars(m.state.step, {"test/loss": result["loss"], "test/acc": result["acc"]})
            else:
                packed.unpack_into_members()
            for m, tb in zip(members, tbs):  # probes due now, dead units: on each member's own model
                if m.analysis is not None and status[id(m)] == "completed":
                    m.analysis.on_epoch_end(m, epoch_done, tb)
            last_save = _save_members(members, walls, t0, status)
            progress.message(f"packed x{packed.k}: epoch {epoch_done} done")
    finally:
        progress.finish()
    from normbench.engine import hparams_of

    for m, tb in zip(members, tbs):
        s = status[id(m)]
        bad_step, note = notes.get(id(m), (None, None))
        summary = {**m.summary(s, bad_step, note), "packed_members": packed.k}
        if s == "completed" and m.analysis is not None:  # end-of-run measurements (train/eval gap)
            summary.update(m.analysis.on_finish(m, tb))
        if s == "completed":
            tb.hparams(hparams_of(m.cfg), {"hparam/test_acc": summary["final_test_acc"],
                                           "hparam/best_test_acc": summary["best_test_acc"]})
        tb.close()
        m.run_dir.write_summary(summary)
        m.final_summary = summary
