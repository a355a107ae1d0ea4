"""TensorBoard HParams files: the experiment at a log root, and each run's own entry.

TensorBoard's HParams dashboard reads two kinds of records (``tensorboard.plugins.hparams``):

* one *experiment*: every hyperparameter with its type, description and domain (the values a
  filter offers; ``differs`` when it has more than one), and the metrics the table shows.
  ``normbench sweep`` writes it at the sweep's folder, the root that ``tensorboard --logdir``
  opens, as the union of the values its cells take (:mod:`normbench.tensorboard_sweep`). A log
  root holds one experiment file (``events.out.tfevents.<time in ns>.normbench-experiment``);
  writing it again merges with what it declares (a sweep run again with more cells widens the
  domains), under an exclusive lock on the folder. A run whose values lie outside the
  experiment of its log root adds them when it starts (:func:`join_experiment`), so that no
  filter hides it. Where a log root has no experiment (runs trained one by one), TensorBoard
  builds one from the runs' entries.
* one *entry* per run, in the run's ``tb/`` folder (``...normbench-hparams``; the plugin's
  SessionStartInfo and SessionEndInfo records): the run's values (:mod:`normbench.hparams`),
  its metrics as scalars, and how it ended, as the status the plugin understands
  (completed -> STATUS_SUCCESS, diverged and failed -> STATUS_FAILURE, interrupted ->
  STATUS_UNKNOWN: TensorBoard's Status has no "aborted"; ``run.status`` names all four). It
  is written once, when the run ends; a resumed run removes its earlier one when it starts
  again.

TensorBoard keeps the first record of a tag it reads in a run and ignores later ones, so each
file is replaced whole (written to a temporary file whose name TensorBoard ignores, then
renamed), never appended to. A TensorBoard server that was running before a file was replaced
shows the new one after a restart.
"""
from __future__ import annotations

import contextlib
import io
import math
import os
import time
from pathlib import Path
from typing import Iterable, Iterator, Optional

from normbench.errors import UserError
from normbench.hparams import DESCRIPTIONS, METRICS, Domains, Value, domains, kind_of, merge_domains, within

EXPERIMENT_SUFFIX = ".normbench-experiment"
RUN_HPARAMS_SUFFIX = ".normbench-hparams"
EVENTS_PREFIX = "events.out.tfevents."

# A run's status -> the SessionEndInfo status (tensorboard.plugins.hparams.api_pb2.Status) by
# name. TensorBoard's Status has no "aborted": an interrupted run, which resumes later, is
# neither a success nor a failure there (run.status says "interrupted").
END_STATUS = {"completed": "STATUS_SUCCESS", "diverged": "STATUS_FAILURE", "failed": "STATUS_FAILURE",
                  "interrupted": "STATUS_UNKNOWN"}


def end_status(status: str) -> int:
    """The SessionEndInfo status of a run that ended as ``status``."""
    from tensorboard.plugins.hparams import api_pb2

    return api_pb2.Status.Value(END_STATUS.get(status, "STATUS_UNKNOWN"))


def hparams_files(folder: Path, suffix: str) -> list[Path]:
    """The HParams files of one kind in ``folder``, oldest first."""
    return sorted(Path(folder).glob(f"{EVENTS_PREFIX}*{suffix}"))


# -- protocol buffers -----------------------------------------------------------------------------
def _proto_value(value: Value):
    from google.protobuf import struct_pb2

    kind = kind_of(value)
    if kind == "bool":
        return struct_pb2.Value(bool_value=value)
    if kind == "number":
        return struct_pb2.Value(number_value=value)
    return struct_pb2.Value(string_value=value)


def _python_value(proto) -> Optional[Value]:
    field = proto.WhichOneof("kind")
    return getattr(proto, field) if field in ("bool_value", "number_value", "string_value") else None


def _hparams_summary(tag: str, plugin_data):
    from tensorboard.compat.proto import summary_pb2
    from tensorboard.plugins.hparams import metadata

    value = summary_pb2.Summary.Value(tag=tag, metadata=metadata.create_summary_metadata(plugin_data),
                                      tensor=metadata.NULL_TENSOR)
    return summary_pb2.Summary(value=[value])


def experiment_summary(known: Domains):
    """The experiment record: a hyperparameter per key of ``known`` (a discrete domain where
    it has one, ``differs`` when that holds two values or more), and :data:`METRICS`."""
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

    types = {"bool": api_pb2.DATA_TYPE_BOOL, "number": api_pb2.DATA_TYPE_FLOAT64, "text": api_pb2.DATA_TYPE_STRING}
    infos = []
    for key in sorted(known):
        values = known[key]
        info = api_pb2.HParamInfo(name=key, description=DESCRIPTIONS.get(key, ""),
                                  type=types[kind_of(values[0])] if values else api_pb2.DATA_TYPE_STRING,
                                  differs=values is not None and len(values) > 1)
        if values is not None:
            info.domain_discrete.values.extend(_proto_value(v) for v in values)
        infos.append(info)
    metrics = [api_pb2.MetricInfo(name=api_pb2.MetricName(tag=tag), display_name=title, description=about)
               for tag, (title, about) in METRICS.items()]
    experiment = api_pb2.Experiment(hparam_infos=infos, metric_infos=metrics, time_created_secs=time.time())
    return _hparams_summary(metadata.EXPERIMENT_TAG, plugin_data_pb2.HParamsPluginData(experiment=experiment))


def domains_of_experiment(experiment) -> Domains:
    """The domains an experiment record declares (None where a key has no discrete domain)."""
    out: Domains = {}
    for info in experiment.hparam_infos:
        if info.HasField("domain_discrete"):
            out[info.name] = [v for v in map(_python_value, info.domain_discrete.values) if v is not None]
        else:
            out[info.name] = None
    return out


def run_hparams_summaries(hparams: dict[str, Value], status: str, start_time: float):
    """The start (``hparams``) and end (``status``, now) records of one run's entry."""
    from tensorboard.plugins.hparams import metadata, plugin_data_pb2

    start = plugin_data_pb2.SessionStartInfo(start_time_secs=start_time)
    for key, value in hparams.items():
        start.hparams[key].CopyFrom(_proto_value(value))
    end = plugin_data_pb2.SessionEndInfo(status=end_status(status), end_time_secs=time.time())
    Data = plugin_data_pb2.HParamsPluginData
    return (_hparams_summary(metadata.SESSION_START_INFO_TAG, Data(session_start_info=start)),
            _hparams_summary(metadata.SESSION_END_INFO_TAG, Data(session_end_info=end)))


def scalar_summary(tag: str, value: float, description: str = ""):
    """A scalar record with a description: a float32 tensor with the scalars plugin's
    metadata, the form whose description TensorBoard shows with either of its loaders."""
    import numpy as np
    from tensorboard.compat.proto import summary_pb2
    from tensorboard.plugins.scalar import metadata as scalar_metadata
    from tensorboard.util import tensor_util

    meta = scalar_metadata.create_summary_metadata(display_name=tag, description=description)
    record = summary_pb2.Summary.Value(tag=tag, metadata=meta, tensor=tensor_util.make_tensor_proto(np.float32(value)))
    return summary_pb2.Summary(value=[record])


# -- files ----------------------------------------------------------------------------------------
def events_blob(summaries: Iterable, step: int = 0) -> bytes:
    """An event file's bytes: the version record, then one event per summary at ``step``."""
    from tensorboard.compat.proto import event_pb2
    from tensorboard.summary.writer.record_writer import RecordWriter

    buf = io.BytesIO()
    writer = RecordWriter(buf)
    now = time.time()
    writer.write(event_pb2.Event(wall_time=now, file_version="brain.Event:2").SerializeToString())
    for summary in summaries:
        writer.write(event_pb2.Event(wall_time=now, step=step, summary=summary).SerializeToString())
    return buf.getvalue()


def _file_number(path: Path, suffix: str) -> int:
    """The number in an HParams file's name (``events.out.tfevents.<number><suffix>``); 0
    where it has none."""
    middle = path.name[len(EVENTS_PREFIX):-len(suffix)]
    return int(middle) if middle.isdigit() else 0


def new_file_path(folder: Path, suffix: str, older: list[Path]) -> Path:
    """A name for the next file of this kind: the time in nanoseconds, raised above the
    numbers of ``older`` where needed, so that each write has its own name (two in one
    second included; TensorBoard would not read a file again under a name it has read) and
    the newest sorts last."""
    number = max([time.time_ns(), *(_file_number(p, suffix) + 1 for p in older)])
    return Path(folder) / f"{EVENTS_PREFIX}{number:019d}{suffix}"


def replace_file(folder: Path, suffix: str, blob: bytes) -> Path:
    """Write ``blob`` as the folder's one file of this kind: a new file (named by
    :func:`new_file_path`, so that it sorts after the files TensorBoard has read) takes the
    place of the older ones."""
    folder = Path(folder)
    older = hparams_files(folder, suffix)
    path = new_file_path(folder, suffix, older)
    tmp = folder / f".{suffix.lstrip('.')}.{os.getpid()}.tmp"  # no "tfevents": TensorBoard skips it
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        for old in older:
            if old != path:
                old.unlink(missing_ok=True)
    except OSError as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise UserError(f"cannot write TensorBoard hparams in {folder}: {err.strerror or err}") from None
    return path


def remove_files(folder: Path, suffix: str) -> None:
    for path in hparams_files(folder, suffix):
        path.unlink(missing_ok=True)


def read_experiment(folder: Path) -> Optional[Domains]:
    """The domains declared by the experiment file(s) of a log root (merged, should there be
    several); None when it has none or none can be read."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.hparams import metadata

    found: Optional[Domains] = None
    for path in hparams_files(folder, EXPERIMENT_SUFFIX):
        try:
            for event in EventFileLoader(str(path)).Load():
                for value in event.summary.value:
                    if value.tag == metadata.EXPERIMENT_TAG:
                        declared = domains_of_experiment(
                            metadata.parse_experiment_plugin_data(value.metadata.plugin_data.content))
                        found = declared if found is None else merge_domains(found, declared)
        except Exception:  # noqa: BLE001 - a damaged file declares nothing; the next write replaces it
            continue
    return found


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive ``flock`` on the folder itself (no lock file), where the OS offers one."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on Linux or macOS
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):  # a file system without locks: go on unlocked
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def write_experiment(folder: Path, new: Domains) -> bool:
    """Declare ``new`` in the experiment of log root ``folder``, merged with what it already
    declares; False when that already covered it (nothing written)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create {folder} for the TensorBoard experiment: {err.strerror}") from None
    with folder_lock(folder):
        old = read_experiment(folder)
        merged = new if old is None else merge_domains(old, new)
        if old is not None and merged == old and len(hparams_files(folder, EXPERIMENT_SUFFIX)) == 1:
            return False
        replace_file(folder, EXPERIMENT_SUFFIX, events_blob([experiment_summary(merged)]))
    return True


def join_experiment(folder: Path, hparams: dict[str, Value]) -> bool:
    """Add a run's values to the experiment of its log root, if the root has one and does not
    cover them yet (True when it was rewritten). A root without an experiment is left so."""
    known = read_experiment(folder)
    if known is None or within(hparams, known):
        return False
    return write_experiment(folder, domains([hparams]))


def write_run_hparams(tb_folder: Path, hparams: dict[str, Value], status: str, metrics: dict[str, float], step: int,
                  start_time: float) -> Path:
    """A run's entry file: its values, its finite metrics (at ``step``), how it ended."""
    start, end = run_hparams_summaries(hparams, status, start_time)
    scalars = [scalar_summary(tag, value, METRICS[tag][1] if tag in METRICS else "")
               for tag, value in metrics.items() if math.isfinite(value)]
    return replace_file(tb_folder, RUN_HPARAMS_SUFFIX, events_blob([start, *scalars, end], step=step))
