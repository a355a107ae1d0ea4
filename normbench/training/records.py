"""What a run folder already records, and whether it may be reused.

One rule for every caller (``train``, the packed trainer, the sweep's cell state): a
completed summary is the run's result and is not trained again; a summary or checkpoint made
on other data than ``data.root`` holds now is refused (:class:`OtherDataError`), never reused.
"""
from __future__ import annotations

from typing import Callable, Optional

from normbench.config import RunConfig
from normbench.errors import OtherDataError

OTHER_DATA_REMEDY = ("give another log.out_dir or name to keep it and train on this data there, "
                     "or rerun with --fresh to replace it")


def check_recorded_data(run_path, what: str, source: Optional[str], fingerprint: Optional[str],
                        current, cfg: RunConfig) -> None:
    """Refuse (OtherDataError) when ``what`` in the run folder was made on data other than
    ``current`` (a DataIdentity; None: unknown, nothing to check). A record with a
    fingerprint must match it; one without (written before fingerprints were recorded) is
    accepted when its data source matches, or when it names none."""
    if current is None:
        return
    if fingerprint:
        if fingerprint == current.fingerprint:
            return
        recorded = f"{source or 'unknown'} data {fingerprint}"
    elif source is None or source == current.source:
        return
    else:
        recorded = f"{source} data"
    raise OtherDataError(f"run folder {run_path} holds {what} made on other data ({recorded}; data.root "
                         f"{cfg.data.resolved_root()} holds {current.describe()})", OTHER_DATA_REMEDY)


def check_summary_data(run_path, summary: dict, current, cfg: RunConfig) -> None:
    check_recorded_data(run_path, f"a {summary.get('status')} run", summary.get("data_source"),
                        summary.get("data_fingerprint"), current, cfg)


def is_completed(summary: Optional[dict]) -> bool:
    return summary is not None and summary.get("status") == "completed"


def completed_result(run_dir, summary: Optional[dict], cfg: RunConfig, identity: Callable[[], object]) -> Optional[dict]:
    """The run's recorded result if ``summary`` says it completed (checked against the data
    ``identity()`` names), marked ``skipped``; None if the run is still to be trained."""
    if not is_completed(summary):
        return None
    check_summary_data(run_dir.path, summary, identity(), cfg)
    return {**summary, "skipped": True}
