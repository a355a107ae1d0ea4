"""TensorBoard as a researcher reads it: the HParams dashboard (every value that defines a run,
typed the same in every run; the sweep's experiment with the union of its cells' values; how
each run ended; its final metrics) and accuracies in percent.

Everything is read back with TensorBoard's own code: the hparams plugin's request handlers
over a multiplexer of the log folder (what the dashboard is served), and its event readers."""
from __future__ import annotations

import json
import math

import pytest

from normbench.config import load_config
from normbench.hparams import (BEST_TEST_ACC, FINAL_TEST_ACC, FINAL_TRAIN_LOSS, PEAK_LR, RUNTIME_KEYS, STATUS,
                               STATUSES, config_hparams, kind_of)
from normbench.tensorboard_hparams import (EXPERIMENT_SUFFIX, RUN_HPARAMS_SUFFIX, hparams_files, join_experiment,
                                           read_experiment)
from normbench.tensorboard_sweep import write_sweep_experiment
from normbench.progress import Progress
from normbench.tensorboard_log import TensorBoardLog, percent_tag
from normbench.tracking import RunDir


def cfg_of(**sets):
    return load_config(None, [f"{k}={v}" for k, v in sets.items()])


class Dashboard:
    """What TensorBoard's HParams dashboard is served for a log folder."""

    def __init__(self, logdir):
        from tensorboard import context
        from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
        from tensorboard.plugins import base_plugin
        from tensorboard.plugins.hparams import backend_context

        mux = plugin_event_multiplexer.EventMultiplexer()
        mux.AddRunsFromDirectory(str(logdir))
        mux.Reload()
        provider = data_provider.MultiplexerDataProvider(mux, str(logdir))
        self.backend = backend_context.Context(base_plugin.TBContext(data_provider=provider, multiplexer=mux,
                                                                     logdir=str(logdir)))
        self.request_context = context.RequestContext()

    def experiment(self):
        from tensorboard.plugins.hparams import api_pb2, get_experiment

        return get_experiment.Handler(self.request_context, self.backend, "", api_pb2.GetExperimentRequest()).run()

    def infos(self) -> dict:
        return {info.name: info for info in self.experiment().hparam_infos}

    def runs(self, **only) -> dict:
        """Run name -> (hparams as Python values, status name, metric
        tag -> value); ``only``: the dashboard's discrete filter, hparam -> allowed values."""
        from google.protobuf import json_format, struct_pb2
        from tensorboard.plugins.hparams import api_pb2, list_session_groups

        request = api_pb2.ListSessionGroupsRequest(
            allowed_statuses=list(api_pb2.Status.values()), start_index=0, slice_size=1000,
            col_params=[api_pb2.ColParams(hparam=k, filter_discrete=struct_pb2.ListValue(
                values=[struct_pb2.Value(string_value=v) for v in values])) for k, values in only.items()])
        response = list_session_groups.Handler(self.request_context, self.backend, "", request).run()
        # a group's runs: its repeated field of records that carry a run status
        runs_field = next(f.name for f in api_pb2.SessionGroup.DESCRIPTOR.fields
                          if f.message_type is not None and "status" in f.message_type.fields_by_name)
        out = {}
        for group in response.session_groups:
            for run in getattr(group, runs_field):
                hparams = {k: json_format.MessageToDict(v) for k, v in group.hparams.items()}
                metrics = {m.name.tag: m.value for m in run.metric_values}
                out[run.name] = (hparams, api_pb2.Status.Name(run.status), metrics)
        return out


def discrete(info) -> list:
    from google.protobuf import json_format

    return [json_format.MessageToDict(v) for v in info.domain_discrete.values]


# ---------------------------------------------------------------------------------- the values


def test_every_key_is_logged_with_one_type_in_every_run_and_none_as_a_string():
    plain = config_hparams(cfg_of())
    odd = config_hparams(cfg_of(**{"norm.kind": "gn", "norm.groups": 4, "norm.eps": 0.001, "data.train_subset": 5000,
                                   "train.channels_last": "true", "analysis.hist_every": 2, "clip.mode": "agc",
                                   "clip.agc_lambda": 0.02, "optim.weight_decay": 0.0, "model.width": 0.5}))
    assert plain.keys() == odd.keys()
    assert {k: kind_of(v) for k, v in plain.items()} == {k: kind_of(v) for k, v in odd.items()}
    assert len(plain) >= 60 and not any(k.startswith("log.") or k in ("name", "threads", "data.root") for k in plain)
    # None is "none"; an optional key stays a string when set
    assert plain["norm.groups"] == "none" and odd["norm.groups"] == "4"
    assert plain["data.train_subset"] == "none" and odd["data.train_subset"] == "5000"
    assert plain["analysis.hist_every"] == "none" and odd["train.channels_last"] == "true"
    # the settings a sweep varies are all there, with their values
    assert odd["norm.kind"] == "gn" and odd["clip.mode"] == "agc" and odd["clip.agc_lambda"] == 0.02
    assert odd["optim.weight_decay"] == 0.0 and odd["model.width"] == 0.5 and plain["train.amp"] == "none"
    assert plain["data.augment"] is True and plain["optim.nesterov"] is False
    # eps resolved: the scheme's default when unset (BN 1e-5, FRN 1e-6), the value when set
    assert plain["norm.eps"] == 1e-5 and odd["norm.eps"] == 0.001
    assert config_hparams(cfg_of(**{"norm.kind": "frn"}))["norm.eps"] == 1e-6


def test_the_peak_lr_is_the_scaled_lr_training_reaches():
    from normbench.training.optim import lr_at

    cfg = cfg_of(**{"optim.lr": 0.1, "train.batch_size": 512, "optim.schedule": "constant", "optim.warmup_epochs": 0})
    values = config_hparams(cfg)
    assert values["optim.lr"] == 0.1 and values[PEAK_LR] == pytest.approx(0.4)
    assert values[PEAK_LR] == lr_at(cfg, 5, 100, 10)  # exactly what the schedule holds after warm-up
    assert config_hparams(cfg, world_size=2)[PEAK_LR] == lr_at(cfg, 5, 100, 10, world_size=2)
    assert config_hparams(cfg_of(**{"train.batch_size": 8}))[PEAK_LR] == 0.1 * 8 / 128


# ----------------------------------------------------------------------------- the experiment


def test_a_sweep_declares_the_union_of_its_cells_values_and_the_varying_keys_differ(tmp_path):
    cells = [cfg_of(**{"norm.kind": kind, "train.batch_size": batch, "seed": seed})
             for kind in ("bn", "gn") for batch in (8, 32) for seed in (0, 1)]
    write_sweep_experiment(tmp_path, cells)
    assert len(hparams_files(tmp_path, EXPERIMENT_SUFFIX)) == 1
    infos = Dashboard(tmp_path).infos()
    assert infos["norm.kind"].differs and discrete(infos["norm.kind"]) == ["bn", "gn"]
    assert infos["train.batch_size"].differs and discrete(infos["train.batch_size"]) == [8, 32]
    assert infos[PEAK_LR].differs and discrete(infos[PEAK_LR]) == [0.1 * 8 / 128, 0.1 * 32 / 128]
    assert infos["seed"].differs and discrete(infos["seed"]) == ["0", "1"]  # a string: seeds exceed 2^53
    assert not infos["optim.momentum"].differs and discrete(infos["optim.momentum"]) == [0.9]
    assert not infos["norm.groups"].differs and discrete(infos["norm.groups"]) == ["none"]
    assert "optim.lr x global batch" in infos[PEAK_LR].description
    # what a run learns when it starts: declared, without a domain (no filter can hide a run)
    for key in RUNTIME_KEYS:
        assert key in infos and not infos[key].HasField("domain_discrete")
    assert discrete(infos[STATUS]) == list(STATUSES)
    metrics = {m.name.tag: m for m in Dashboard(tmp_path).experiment().metric_infos}
    assert set(metrics) == {FINAL_TEST_ACC, BEST_TEST_ACC, FINAL_TRAIN_LOSS}
    assert "%" in metrics[FINAL_TEST_ACC].display_name


def test_the_experiment_is_widened_never_duplicated_and_a_run_adds_what_it_lacks(tmp_path):
    write_sweep_experiment(tmp_path, [cfg_of(**{"norm.kind": "bn"})])
    assert not Dashboard(tmp_path).infos()["norm.kind"].differs
    write_sweep_experiment(tmp_path, [cfg_of(**{"norm.kind": "gn"}), cfg_of(**{"norm.kind": "ln"})])
    assert len(hparams_files(tmp_path, EXPERIMENT_SUFFIX)) == 1  # one experiment: TensorBoard reads only the first
    assert discrete(Dashboard(tmp_path).infos()["norm.kind"]) == ["bn", "gn", "ln"]
    (before,) = hparams_files(tmp_path, EXPERIMENT_SUFFIX)
    assert not join_experiment(tmp_path, {**config_hparams(cfg_of(**{"norm.kind": "gn"})), "run.device": "cuda:3"})
    assert hparams_files(tmp_path, EXPERIMENT_SUFFIX) == [before]  # covered: nothing written
    assert join_experiment(tmp_path, config_hparams(cfg_of(**{"norm.kind": "in", "train.batch_size": 2})))
    known = read_experiment(tmp_path)
    assert known["norm.kind"] == ["bn", "gn", "in", "ln"] and known["train.batch_size"] == [2, 128]
    assert not join_experiment(tmp_path / "elsewhere", config_hparams(cfg_of()))  # no experiment there: none made
    assert not (tmp_path / "elsewhere").exists()


def test_a_sweep_writes_its_experiment_where_it_starts(tmp_path):
    """The sweep's manifest is written before any worker starts; the experiment with it."""
    import yaml

    from normbench.sweep import load_sweep, write_manifest

    spec = {"set": {"device": "cpu"}, "grid": {"norm.kind": ["bn", "gn"], "clip.mode": ["none", "agc"],
                                               "train.batch_size": [8, 128]},
            "rules": [{"where": {"clip.mode": "agc"}, "set": {"clip.agc_lambda": 0.02}}],
            "out_dir": str(tmp_path / "out")}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(spec))
    sweep = load_sweep(path)
    write_manifest(sweep)
    infos = Dashboard(sweep.out_dir).infos()
    for key in ("norm.kind", "clip.mode", "clip.agc_lambda", "train.batch_size", PEAK_LR):
        assert infos[key].differs, key
    assert discrete(infos["clip.agc_lambda"]) == [0.01, 0.02] and not infos["optim.weight_decay"].differs
    assert len(hparams_files(sweep.out_dir, EXPERIMENT_SUFFIX)) == 1


def test_recorded_runs_get_an_entry_and_their_own_experiment_is_set_aside(tiny_cfg, tmp_path):
    """A run folder recorded before runs wrote their entries: add_hparams wrote an experiment of its own into
    tb/ (which TensorBoard may show instead of the sweep's). The sweep's start gives the run a
    HParams entry from its summary and renames that file out of TensorBoard's sight."""
    from torch.utils.tensorboard import SummaryWriter

    from normbench.training.entry import train

    root = tmp_path / "sweep"
    old = tiny_cfg(**{"log.out_dir": str(root), "train.epochs": 1})
    summary = train(old)
    tb = RunDir(old.run_dir()).tb
    for path in hparams_files(tb, RUN_HPARAMS_SUFFIX):  # as the earlier code left it
        path.unlink()
    with SummaryWriter(str(tb)) as writer:
        writer.add_hparams({"norm": "bn", "lr": 0.1}, {"hparam/test_acc": 0.5}, run_name=".")
    new = tiny_cfg(**{"log.out_dir": str(root), "norm.kind": "ln"})
    write_sweep_experiment(root, [old, new])

    view = Dashboard(root)
    owners = [run for run, tags in view.backend.hparams_metadata(view.request_context, "").items()
              if "_hparams_/experiment" in tags]
    assert owners == ["."]  # one experiment in the folder: the sweep's, whichever loader reads it
    assert list(tb.glob("superseded-hparams.*"))
    (hp, status, metrics), = view.runs().values()
    assert status == "STATUS_SUCCESS" and hp[STATUS] == "completed" and hp["norm.kind"] == "bn"
    assert metrics[FINAL_TEST_ACC] == pytest.approx(100 * summary["final_test_acc"], abs=1e-4)
    assert view.infos()["norm.kind"].differs
    entry = hparams_files(tb, RUN_HPARAMS_SUFFIX)
    write_sweep_experiment(root, [old, new])  # once only: the entry is there now
    assert hparams_files(tb, RUN_HPARAMS_SUFFIX) == entry


# ------------------------------------------------------------------------------------- the runs


def test_runs_show_their_values_status_and_metrics_and_a_diverged_run_is_no_success(tiny_cfg, tmp_path):
    from normbench.training.entry import train

    root = tmp_path / "sweep"
    good = tiny_cfg(**{"log.out_dir": str(root), "name": "good", "train.batch_size": 40})
    bad = tiny_cfg(**{"log.out_dir": str(root), "name": "bad", "norm.kind": "gn", "norm.groups": 2, "optim.lr": 1e8,
                      "optim.warmup_epochs": 0, "optim.momentum": 0.0, "train.epochs": 3})
    write_sweep_experiment(root, [good, bad])
    s_good, s_bad = train(good), train(bad)
    assert s_good["status"] == "completed" and s_bad["status"] == "diverged"

    view = Dashboard(root)
    runs = view.runs()
    (good_hp, good_status, good_metrics) = runs[f"{good.run_dir().name}/tb"]
    (bad_hp, bad_status, bad_metrics) = runs[f"{bad.run_dir().name}/tb"]
    assert (good_status, bad_status) == ("STATUS_SUCCESS", "STATUS_FAILURE")
    assert (good_hp[STATUS], bad_hp[STATUS]) == ("completed", "diverged")
    assert good_hp["norm.kind"] == "bn" and bad_hp["norm.kind"] == "gn" and bad_hp["norm.groups"] == "2"
    assert good_hp["norm.groups"] == "none"
    assert good_hp[PEAK_LR] == pytest.approx(0.1 * 40 / 128) and good_hp["optim.lr"] == pytest.approx(0.1)
    assert good_hp["run.device"] == "cpu" and good_hp["run.world_size"] == "1"
    assert good_metrics[FINAL_TEST_ACC] == pytest.approx(100 * s_good["final_test_acc"], abs=1e-4)
    assert good_metrics[BEST_TEST_ACC] == pytest.approx(100 * s_good["best_test_acc"], abs=1e-4)
    last_loss = [r["train/loss"] for r in RunDir(good.run_dir()).read_metrics() if "train/loss" in r][-1]
    assert good_metrics[FINAL_TRAIN_LOSS] == pytest.approx(last_loss, rel=1e-6)
    assert FINAL_TEST_ACC not in bad_metrics  # a diverged run has no final accuracy
    # the dashboard's filters: every value is in its key's domain, and a filter keeps what it names
    infos = view.infos()
    assert infos["norm.kind"].differs and infos[PEAK_LR].differs and not infos["model.width"].differs
    for hp in (good_hp, bad_hp):
        for key, info in infos.items():
            if info.HasField("domain_discrete"):
                assert hp[key] in discrete(info), key
    assert list(view.runs(**{"norm.kind": ["gn"]})) == [f"{bad.run_dir().name}/tb"]
    assert list(view.runs(**{STATUS: ["completed"]})) == [f"{good.run_dir().name}/tb"]


def test_accuracy_scalars_are_in_percent_and_say_so(tiny_cfg):
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    from normbench.training.entry import train

    cfg = tiny_cfg(**{"train.epochs": 1})
    train(cfg)
    run_dir = RunDir(cfg.run_dir())
    acc = EventAccumulator(str(run_dir.tb), size_guidance={"tensors": 0})
    acc.Reload()
    scalars = acc.PluginTagToContent("scalars")  # the tags TensorBoard's scalar charts show
    assert "test/acc_percent" in scalars and "train/acc_percent" in scalars
    assert "test/acc" not in scalars and "train/acc" not in scalars and "train/loss" in scalars
    records = run_dir.read_metrics()
    fractions = [r["test/acc"] for r in records if "test/acc" in r]  # metrics.jsonl keeps fractions
    assert fractions and all(0 <= f <= 1 for f in fractions)
    shown = [float(tensor_util.make_ndarray(e.tensor_proto)) for e in acc.Tensors("test/acc_percent")]
    assert shown == pytest.approx([100 * f for f in fractions], abs=1e-4)
    train_fractions = [r["train/acc"] for r in records if "train/acc" in r]
    shown = [float(tensor_util.make_ndarray(e.tensor_proto)) for e in acc.Tensors("train/acc_percent")]
    assert shown == pytest.approx([100 * f for f in train_fractions], abs=1e-4) and max(shown) > 1
    assert "percent" in acc.SummaryMetadata("test/acc_percent").summary_description
    summary = json.loads(run_dir.summary.read_text())
    assert 0 <= summary["final_test_acc"] <= 1 and summary["final_test_acc"] == fractions[-1]


def test_percent_tags():
    assert percent_tag("test/acc") == "test/acc_percent" and percent_tag("train/acc") == "train/acc_percent"
    assert percent_tag("gap/test_acc_train_mode") == "gap/test_acc_train_mode_percent"
    assert percent_tag("gap/train_eval_gap") == "gap/train_eval_gap_points"  # a difference: percentage points
    for other in ("train/loss", "test/loss", "grad/clipped_frac", "dead/all", "probe/beta", "opt/lr",
                  "perf/images_per_s"):
        assert percent_tag(other) is None, other


def train_with_evaluation_raising(tiny_cfg, monkeypatch, error: Exception):
    """Train a one-epoch run whose evaluation raises ``error``; (config, its HParams values,
    its end status) as the dashboard shows them."""
    from normbench.training import run as run_module
    from normbench.training.entry import train

    def broken(self, epoch, result):
        raise error

    monkeypatch.setattr(run_module.Run, "record_eval", broken)
    cfg = tiny_cfg(**{"train.epochs": 1})
    with pytest.raises(type(error)):
        train(cfg)
    (hp, status, _), = Dashboard(cfg.run_dir()).runs().values()
    return cfg, hp, status


def test_a_failed_run_shows_as_failed(tiny_cfg, monkeypatch):
    cfg, hp, status = train_with_evaluation_raising(tiny_cfg, monkeypatch, RuntimeError("evaluation broke"))
    assert status == "STATUS_FAILURE" and hp[STATUS] == "failed"
    assert json.loads(RunDir(cfg.run_dir()).summary.read_text())["status"] == "failed"


def test_an_interrupted_run_is_no_success_and_its_entry_is_replaced_when_it_resumes(tmp_path):
    tb = tmp_path / "run" / "tb"
    values = {"norm.kind": "bn", PEAK_LR: 0.1}
    log = TensorBoardLog(tb, enabled=True)
    log.begin_hparams(values, tmp_path)
    log.scalars(10, {"test/acc": 0.5})
    log.end_hparams("interrupted", {BEST_TEST_ACC: 50.0, FINAL_TRAIN_LOSS: math.nan}, 10)
    log.close()
    (hp, status, metrics), = Dashboard(tmp_path).runs().values()
    assert status == "STATUS_UNKNOWN" and hp[STATUS] == "interrupted"
    assert {t: v for t, v in metrics.items() if t.startswith("hparam/")} == {BEST_TEST_ACC: 50.0}  # NaN left out

    again = TensorBoardLog(tb, enabled=True, purge_step=10)
    again.begin_hparams(values, tmp_path, elapsed_s=30.0)
    assert hparams_files(tb, RUN_HPARAMS_SUFFIX) == []  # running again: no stale status on disk
    again.end_hparams("completed", {FINAL_TEST_ACC: 61.0, BEST_TEST_ACC: 61.0}, 20)
    again.close()
    assert len(hparams_files(tb, RUN_HPARAMS_SUFFIX)) == 1
    (hp, status, metrics), = Dashboard(tmp_path).runs().values()
    assert status == "STATUS_SUCCESS" and hp[STATUS] == "completed" and metrics[FINAL_TEST_ACC] == 61.0


def test_single_runs_without_an_experiment_still_differ(tmp_path):
    """Runs trained one by one into a folder: no experiment is written; TensorBoard builds one
    from their entries, and the key that varies differs."""
    for kind in ("bn", "gn"):
        log = TensorBoardLog(tmp_path / kind / "tb", enabled=True)
        log.begin_hparams(config_hparams(cfg_of(**{"norm.kind": kind})), tmp_path)
        log.end_hparams("completed", {}, 1)
        log.close()
    assert hparams_files(tmp_path, EXPERIMENT_SUFFIX) == []
    infos = Dashboard(tmp_path).infos()
    assert infos["norm.kind"].differs and not infos["optim.lr"].differs


def test_disabled_log_writes_nothing(tmp_path):
    log = TensorBoardLog(tmp_path / "tb", enabled=False)
    assert log.begin_hparams({"norm.kind": "bn"}, tmp_path) is None
    log.scalars(1, {"test/acc": 0.5})
    log.end_hparams("completed", {FINAL_TEST_ACC: 50.0}, 1)
    log.close()
    assert not (tmp_path / "tb").exists()


# ---------------------------------------------------------------------------- what goes wrong


class Messages(Progress):
    """A progress view that keeps the lines it is given."""

    def __init__(self):
        self.lines = []

    def message(self, text):
        self.lines.append(text)


def test_a_huge_seed_is_a_string_in_its_own_domain_and_does_not_rewrite_the_experiment(tmp_path):
    seed = 2**53 + 1  # a float64 rounds it to 2^53
    cfg = cfg_of(seed=seed)
    values = config_hparams(cfg)
    assert values["seed"] == str(seed) and config_hparams(cfg_of())["seed"] == "0"
    write_sweep_experiment(tmp_path, [cfg, cfg_of(seed=2**53)])
    (before,) = hparams_files(tmp_path, EXPERIMENT_SUFFIX)
    assert read_experiment(tmp_path)["seed"] == sorted([str(seed), str(2**53)])
    assert not join_experiment(tmp_path, values)  # its own value is in the domain: nothing rewritten
    assert hparams_files(tmp_path, EXPERIMENT_SUFFIX) == [before]
    assert discrete(Dashboard(tmp_path).infos()["seed"]) == sorted([str(seed), str(2**53)])


def test_two_entries_written_in_one_clock_tick_get_their_own_names_and_the_latest_is_read(tmp_path, monkeypatch):
    from normbench import tensorboard_hparams

    tb = tmp_path / "run" / "tb"
    monkeypatch.setattr(tensorboard_hparams.time, "time_ns", lambda: 1_700_000_000_000_000_000)  # a clock that stands
    write = tensorboard_hparams.write_run_hparams
    first = write(tb, {"norm.kind": "bn", STATUS: "interrupted"}, "interrupted", {}, 1, 0.0)
    second = write(tb, {"norm.kind": "bn", STATUS: "completed"}, "completed", {FINAL_TEST_ACC: 60.0}, 2, 0.0)
    assert first != second and second.name > first.name  # a new name, sorting after the one read before
    assert second.name.startswith("events.out.tfevents.") and second.name.endswith(RUN_HPARAMS_SUFFIX)
    assert hparams_files(tb, RUN_HPARAMS_SUFFIX) == [second]
    (hp, status, metrics), = Dashboard(tmp_path).runs().values()
    assert status == "STATUS_SUCCESS" and hp[STATUS] == "completed" and metrics[FINAL_TEST_ACC] == 60.0


def test_an_entry_that_cannot_be_removed_at_the_start_is_one_line(tmp_path, monkeypatch):
    from normbench import tensorboard_hparams

    def read_only(folder, suffix):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tensorboard_hparams, "remove_files", read_only)
    log = TensorBoardLog(tmp_path / "run" / "tb", enabled=True)
    note = log.begin_hparams({"norm.kind": "bn"}, tmp_path)
    log.close()
    assert note is not None and "\n" not in note and "Permission denied" in note and "tb" in note


def test_an_entry_that_cannot_be_written_costs_a_warning_not_the_summary(tiny_cfg, monkeypatch):
    from normbench import tensorboard_hparams
    from normbench.errors import UserError
    from normbench.training.entry import train

    def disk_full(folder, *args):
        raise UserError(f"cannot write TensorBoard hparams in {folder}: No space left on device")

    closed = []
    close = TensorBoardLog.close

    def counted_close(self):
        closed.append(self.writer is not None)
        return close(self)

    monkeypatch.setattr(tensorboard_hparams, "write_run_hparams", disk_full)
    monkeypatch.setattr(TensorBoardLog, "close", counted_close)
    progress = Messages()
    cfg = tiny_cfg(**{"train.epochs": 1})
    summary = train(cfg, progress=progress)
    assert summary["status"] == "completed"
    assert json.loads(RunDir(cfg.run_dir()).summary.read_text())["status"] == "completed"
    warnings = [line for line in progress.lines if "HParams entry" in line]
    assert len(warnings) == 1 and "No space left on device" in warnings[0] and "\n" not in warnings[0]
    assert closed and closed[0] is True  # the event file was closed
    assert hparams_files(RunDir(cfg.run_dir()).tb, RUN_HPARAMS_SUFFIX) == []


def test_a_packed_members_warning_reaches_the_packs_view_with_its_name(tiny_cfg, monkeypatch):
    from normbench import tensorboard_hparams
    from normbench.errors import UserError
    from normbench.training.packed import train_packed

    def disk_full(folder, *args):
        raise UserError(f"cannot write TensorBoard hparams in {folder}: No space left on device")

    monkeypatch.setattr(tensorboard_hparams, "write_run_hparams", disk_full)
    progress = Messages()
    cfgs = [tiny_cfg(seed=s, **{"train.epochs": 1}) for s in range(2)]
    assert [s["status"] for s in train_packed(cfgs, progress=progress)] == ["completed", "completed"]
    warnings = [line for line in progress.lines if "HParams entry" in line]
    assert sorted(w.split(":")[0] for w in warnings) == [f"{c.run_name} (seed {c.seed})" for c in cfgs]
    assert sum("device:" in line for line in progress.lines) == 1  # the pack says it once


def test_a_failing_entry_does_not_hide_the_error_that_failed_the_run(tiny_cfg, monkeypatch):
    from normbench import tensorboard_hparams
    from normbench.training import run as run_module
    from normbench.training.entry import train

    def broken(self, epoch, result):
        raise RuntimeError("evaluation broke")

    def read_only(folder, *args):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(run_module.Run, "record_eval", broken)
    monkeypatch.setattr(tensorboard_hparams, "write_run_hparams", read_only)
    cfg = tiny_cfg(**{"train.epochs": 1})
    with pytest.raises(RuntimeError, match="evaluation broke"):
        train(cfg, progress=Messages())
    assert json.loads(RunDir(cfg.run_dir()).summary.read_text())["status"] == "failed"


def test_a_finished_run_keeps_its_status_when_the_log_is_closed_again(tmp_path):
    tb = tmp_path / "run" / "tb"
    log = TensorBoardLog(tb, enabled=True)
    log.begin_hparams({"norm.kind": "bn"}, tmp_path)
    assert log.end_hparams("completed", {}, 1) is None and log.close() is None
    (entry,) = hparams_files(tb, RUN_HPARAMS_SUFFIX)
    assert log.end_hparams("failed", {}, 1) is None and log.close() is None  # the second time: nothing
    assert hparams_files(tb, RUN_HPARAMS_SUFFIX) == [entry]
    (hp, status, _), = Dashboard(tmp_path).runs().values()
    assert status == "STATUS_SUCCESS" and hp[STATUS] == "completed"


def test_a_user_error_is_no_failure_of_the_run(tiny_cfg, monkeypatch):
    """As train() writes no failed summary for a UserError, TensorBoard shows the run as
    interrupted (it resumes once the cause is fixed), not failed."""
    from normbench.errors import UserError

    cfg, hp, status = train_with_evaluation_raising(tiny_cfg, monkeypatch, UserError("cannot write the metrics file"))
    assert status == "STATUS_UNKNOWN" and hp[STATUS] == "interrupted"
    assert not RunDir(cfg.run_dir()).summary.exists()
