"""``normbench analyze``: measure a finished or checkpointed run again from its folder."""
from __future__ import annotations

from typing import Optional

import torch

from normbench.analysis.activations import dead_units, probe_images
from normbench.analysis.batch_stats import accuracy, precise_bn, running_stat_layers, train_eval_gap, training_batches
from normbench.analysis.common import preserved_rng


# ----------------------------------------------------------------------------- `normbench analyze`


def analyze_run(path, recalibrate: bool = False, recal_batch_size: Optional[int] = None,
                recal_images: Optional[int] = None, device: Optional[str] = None, log=print) -> dict:
    """Measure a finished (or checkpointed) run again from its folder: the train/eval gap
    (for every scheme: batch-independent ones are the control, with a gap of 0), precise BN
    when ``recalibrate`` (statistics over one pass of ``recal_images`` training images, default
    all, in batches of ``recal_batch_size``, default the run's batch size) and dead units.
    Updates ``summary.json`` atomically (other keys kept) when the run has one; returns the
    measured fields. User mistakes (not a run folder, unreadable files) raise UserError.
    """
    from normbench.data import Normalizer, load_cifar10
    from normbench.errors import UserError
    from normbench.model_io import load_run_model
    from normbench.norms import get_scheme
    from normbench.tracking import RunDir

    loaded = load_run_model(path, device=device)  # UserError: not a run folder, no or unusable checkpoint
    cfg, dev, model = loaded.cfg, loaded.device, loaded.model
    model.train()
    data = load_cifar10(cfg.data, log=log).to(dev)
    normalize = Normalizer(dev, loaded.channels_last)
    batch = cfg.train.batch_size
    scheme = get_scheme(cfg.norm.kind)
    out: dict = {"analyzed_step": loaded.step}
    with preserved_rng(dev):
        out.update(train_eval_gap(model, data, normalize, batch, cfg.train.eval_batch_size))
        if recalibrate:
            out["test_acc_precise_bn"] = None
            if running_stat_layers(model):
                rb = recal_batch_size or batch
                if rb > len(data.train_y):
                    raise UserError(f"--recal-batch-size: got {rb}; the training set has {len(data.train_y)} images")
                twin, used = precise_bn(model, training_batches(cfg, data, normalize, rb, recal_images))
                out["test_acc_precise_bn"] = accuracy(twin, data, normalize, cfg.train.eval_batch_size, train_mode=False)
                out["precise_bn_images"] = used * rb
                out["precise_bn_batch_size"] = rb
            else:
                log(f"{cfg.norm.kind}: no running statistics; nothing to recalibrate")
        x = probe_images(data, normalize, cfg.analysis.dead_units_images, batch)
        dead = dead_units(model, x, batch, dev)
    out["dead_unit_frac"] = dead.pop("all")
    out["dead_units_by_layer"] = dead
    out["batch_dependent"] = scheme.batch_dependent
    run = RunDir(loaded.path)
    summary = run.read_summary()
    if summary is not None:
        summary.pop("summary_version", None)
        summary.update(out)  # without --recalibrate an earlier test_acc_precise_bn is kept
        run.write_summary(summary)
        out["summary_updated"] = True
    else:
        out["summary_updated"] = False
    out["run_name"] = cfg.run_name
    out["norm"] = cfg.norm.kind
    out["batch_size"] = batch
    return out

