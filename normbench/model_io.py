"""A trained run's model read back from its folder: config, summary and checkpoint, checked
against each other, and the network rebuilt with the checkpoint's weights.

What a run folder keeps (normbench.tracking): ``config.yaml``, ``summary.json`` and one
``checkpoint.pt``, rewritten at every epoch end (and mid-epoch, and on SIGINT / SIGTERM). The
training loop saves it after the last epoch's evaluation, so a completed run's checkpoint holds
exactly the weights its ``final_test_acc`` was measured on; a diverged run keeps its last good
checkpoint, an interrupted one the weights at the interruption. A packed member's folder is a
solo run's (the packed stepper unpacks the member's share into its own checkpoint), so it loads
the same way. No best-accuracy checkpoint is kept.

Every mistake is a one-line :class:`~normbench.errors.UserError`: no such folder, no config or
no checkpoint, a corrupt file, a config.yaml other than the one the run was trained with, a
checkpoint of another run or another config.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from normbench.config import RunConfig, load_config, validate_config
from normbench.errors import RunFolderError, UserError, first_line
from normbench.tracking import RunDir

UNUSABLE_REMEDY = "restore the file, or retrain the run (normbench train --fresh)"


@dataclass
class RunModel:
    """A run's network with its checkpoint's weights, in eval mode, and what it was read from."""

    path: Path  # the run folder
    cfg: RunConfig  # the run's config, as config.yaml holds it
    summary: Optional[dict]  # summary.json (None while the run has none)
    checkpoint: Path  # the file the weights came from
    step: int  # the training step of the checkpoint
    data_record: dict  # {"source", "fingerprint"} of the data the checkpoint was trained on
    model: nn.Module
    device: torch.device
    channels_last: bool

    @property
    def status(self) -> Optional[str]:
        return self.summary.get("status") if self.summary else None

    @property
    def total_steps(self) -> Optional[int]:
        return self.summary.get("total_steps") if self.summary else None

    @property
    def final_weights(self) -> bool:
        """Whether these are the weights the run's final test accuracy was measured on."""
        return self.status == "completed" and self.summary.get("steps") == self.step

    def weights_line(self) -> str:
        """'step 200 of 200: final weights (completed)' and the like."""
        of = f" of {self.total_steps}" if self.total_steps else ""
        if self.final_weights:
            return f"step {self.step}{of}: final weights (completed)"
        return f"step {self.step}{of}: not final ({self.status or 'no summary: running or killed'})"


def read_run_config(run: RunDir) -> RunConfig:
    """The run folder's config.yaml (UserError when the folder or the file is missing)."""
    if not run.path.is_dir():
        raise UserError(f"run folder not found: {run.path}")
    if not run.config.is_file():
        raise UserError(f"{run.path} is not a run folder (no config.yaml)")
    return load_config(run.config)


def read_run_summary(run: RunDir) -> Optional[dict]:
    """summary.json (None while the run has none); a corrupt one is a UserError."""
    try:
        return run.read_summary()
    except RunFolderError as err:
        raise err.with_remedy(UNUSABLE_REMEDY) from None


def check_config_is_the_trained_one(run: RunDir, cfg: RunConfig, summary: Optional[dict]) -> None:
    """config.yaml must be the config the summary records (both hashed by this code, so a
    change of the hash function between versions does not matter); an old summary whose config
    no longer validates is not compared."""
    recorded = summary.get("config") if summary else None
    if not isinstance(recorded, dict):
        return
    try:
        trained = validate_config(recorded, source="summary.json")
    except UserError:
        return
    if trained.config_hash() != cfg.config_hash():
        raise UserError(f"{run.config} is not the config this run was trained with (config hash "
                        f"{cfg.config_hash()}; summary.json records {trained.config_hash()}): the folder's "
                        "files belong to different runs; restore its config.yaml")


def check_checkpoint_owner(run: RunDir, cfg: RunConfig, checkpoint: Path) -> None:
    """A checkpoint given from another folder that holds a config.yaml must come from a run of
    the same config."""
    other = RunDir(checkpoint.parent)
    if other.path.resolve() == run.path.resolve() or not other.config.is_file():
        return
    try:
        other_cfg = load_config(other.config)
    except UserError:
        return
    if other_cfg.config_hash() != cfg.config_hash():
        raise UserError(f"--checkpoint {checkpoint}: it belongs to another config (its folder's config.yaml "
                        f"has hash {other_cfg.config_hash()}; {run.path} has {cfg.config_hash()})")


def load_checkpoint_state(run: RunDir, checkpoint: Path) -> dict:
    """The checkpoint's state (digest checked); UserError when absent, corrupt or weightless."""
    if not checkpoint.is_file():
        if checkpoint == run.checkpoint:
            raise UserError(f"{run.path} has no checkpoint.pt (the run has not finished an epoch yet)")
        raise UserError(f"--checkpoint: file not found: {checkpoint}")
    reader = RunDir(run.path)
    reader.checkpoint = checkpoint
    try:
        state = reader.load_checkpoint()
    except RunFolderError as err:
        raise err.with_remedy(UNUSABLE_REMEDY) from None
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise UserError(f"checkpoint {checkpoint} holds no model weights; {UNUSABLE_REMEDY}")
    return state


def checkpoint_step(state: dict) -> int:
    """The training step a checkpoint was written at."""
    step = (state.get("state") or {}).get("step", 0)
    return int(step) if isinstance(step, int) else 0


def check_final_checkpoint(run: RunDir, summary: Optional[dict], step: int) -> None:
    """The run's own checkpoint of a completed run is saved at its last step."""
    if summary and summary.get("status") == "completed" and summary.get("steps") != step:
        raise UserError(f"{run.checkpoint} is at step {step}, but the run completed at step "
                        f"{summary.get('steps')}: it is not this run's final checkpoint; {UNUSABLE_REMEDY}")


def load_run_model(path, device: Optional[str] = None, checkpoint: Optional[Path] = None) -> RunModel:
    """Read the run in folder ``path`` and rebuild its network with the checkpoint's weights
    (``checkpoint``: another checkpoint file of this config; default the folder's own) on
    ``device`` (default the run's ``device``), in the memory format training used there, in
    eval mode. Threads: the run's ``threads`` when it sets them."""
    from normbench.device import build_model_on, resolve_device

    run = RunDir(Path(path).expanduser())
    cfg = read_run_config(run)
    summary = read_run_summary(run)
    check_config_is_the_trained_one(run, cfg, summary)
    own = checkpoint is None
    ckpt_path = run.checkpoint if own else Path(checkpoint).expanduser()
    if not own:
        check_checkpoint_owner(run, cfg, ckpt_path)
    state = load_checkpoint_state(run, ckpt_path)
    step = checkpoint_step(state)
    if own:
        check_final_checkpoint(run, summary, step)
    placed_cfg = cfg if device is None else validate_config({**cfg.to_dict(), "device": device}, source="--device")
    dev = resolve_device(placed_cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model, channels_last = build_model_on(placed_cfg, dev)
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError, TypeError) as err:
        raise UserError(f"checkpoint {ckpt_path} does not fit the model {run.config} builds (a checkpoint of "
                        f"another config?): {first_line(err)}") from None
    model.eval()
    return RunModel(run.path, cfg, summary, ckpt_path, step, dict(state.get("data") or {}), model, dev,
                    channels_last)
