"""`normbench sweep`: grid expansion and rules (pure), validation errors, and real sweeps on
synthetic data: 2 local workers with a diverging cell, a sweep killed and restarted, two
concurrent sweeps on one folder, and the Ray backend on a real local cluster."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from conftest import REPO, run_cli
from normbench.cli import app
from normbench.errors import UserError
from normbench.sweep.cell import ATTEMPT_MARK
from normbench.sweep.spec import expand_grid, load_sweep, parse_axes
from normbench.sweep.state import CellLock

# Settings that make a cell a second or two of CPU: ResNet-20 at width 0.25 (4 channels in
# the first stage, so GroupNorm uses 2 groups), 200 synthetic images, 1 epoch, 1 thread.
TINY = {"data.allow_download": False, "model.width": 0.25, "norm.groups": 2, "train.epochs": 1,
        "train.batch_size": 20, "train.log_every": 5, "optim.warmup_epochs": 0.5, "device": "cpu"}


def write_sweep(path: Path, grid: dict, rules=None, root: Path | None = None, tb: bool = True, **top) -> Path:
    spec = {"set": {**TINY, **({"data.root": str(root)} if root else {}), **({} if tb else {"log.tensorboard": False})},
            "grid": grid, **top}
    if rules:
        spec["rules"] = rules
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def attempts(run_dir: Path) -> int:
    log = run_dir / "train.log"
    return log.read_text().count(ATTEMPT_MARK) if log.exists() else 0


def summaries(out: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in out.glob("*/summary.json")}


# ----------------------------------------------------------------------------- pure: grid and rules


def test_grid_expansion_is_deterministic_and_zips(tmp_path):
    axes = parse_axes({"norm.kind": ["bn", "gn"], "train.batch_size,optim.lr": [[2, 0.01], [4, 0.02]],
                       "seed": [0, 1]}, "sweep")
    cells = expand_grid(axes)
    assert len(cells) == 8
    assert cells[0] == {"norm.kind": "bn", "train.batch_size": 2, "optim.lr": 0.01, "seed": 0}
    assert cells[1]["seed"] == 1 and cells[2]["train.batch_size"] == 4 and cells[2]["optim.lr"] == 0.02
    assert [c["norm.kind"] for c in cells] == ["bn"] * 4 + ["gn"] * 4
    assert expand_grid(axes) == cells


def test_load_sweep_rules_names_and_overrides(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("norm: {kind: bn}\noptim: {lr: 0.1}\nclip: {mode: none}\n")
    path = write_sweep(tmp_path / "sweeps" / "s.yaml", {"norm.kind": ["bn", "gn", "none"], "train.batch_size": [2, 8]},
                       rules=[{"where": {"norm.kind": "none"}, "set": {"clip.mode": "agc", "clip.agc_lambda": 0.02}},
                              {"where": {"norm.kind": ["bn", "gn"], "train.batch_size": 2},
                               "set": {"optim": {"warmup_epochs": 2}}},
                              {"where": {"clip.mode": "agc"}, "set": {"optim.lr": 0.05}}],
                       base="../base.yaml", out_dir=str(tmp_path / "out"))
    sweep = load_sweep(path, overrides={"train.epochs": 3}, preflight=False)
    names = [c.name for c in sweep.cells]
    assert names == ["bn-b2-s0", "bn-b8-s0", "gn-b2-s0", "gn-b8-s0", "none+agc-b2-s0", "none+agc-b8-s0"]
    by = {c.name: c.cfg for c in sweep.cells}
    assert by["none+agc-b2-s0"].clip.agc_lambda == 0.02 and by["none+agc-b2-s0"].optim.lr == 0.05
    assert by["bn-b2-s0"].optim.warmup_epochs == 2 and by["bn-b8-s0"].optim.warmup_epochs == 0.5
    assert by["none+agc-b2-s0"].optim.warmup_epochs == 0.5  # rule 2 does not match 'none'
    assert all(c.cfg.train.epochs == 3 for c in sweep.cells)
    assert all(c.run_dir.parent == (tmp_path / "out").resolve() for c in sweep.cells)
    assert len({c.run_dir for c in sweep.cells}) == 6
    # a name template
    path2 = write_sweep(tmp_path / "t.yaml", {"norm.kind": ["gn"], "seed": [3]}, name="{norm.kind}_s{seed}_e{train.epochs}")
    assert [c.name for c in load_sweep(path2, preflight=False).cells] == ["gn_s3_e1"]


@pytest.mark.parametrize("grid,extra,message", [
    ({}, {}, "the grid is empty"),
    ({"norm.kind": []}, {}, "the list of values is empty"),
    ({"norm.knd": ["bn"]}, {}, "unknown key 'norm.knd' (did you mean 'norm.kind'?)"),
    ({"train": [1]}, {}, "'train' is a section"),
    ({"norm.kind": "bn"}, {}, "expected a list of values"),
    ({"norm.kind": ["bn", "gn"], "norm.groups": [0, 2]}, {}, "cell 0 'bn-b20-groups0-s0' (norm.kind=bn, norm.groups=0): norm.groups"),
    ({"norm.kind": ["bn", "gnn"]}, {}, "cell 1 'gnn-b20-s0' (norm.kind=gnn): norm.kind: got 'gnn'"),
    ({"norm.kind": ["none"], "clip.mode": ["none", "agc"]},
     {"rules": [{"where": {"norm.kind": "none"}, "set": {"clip.mode": "agc"}}]}, "resolve to the same config"),
    ({"norm.kind": ["bn"]}, {"grids": 1}, "unknown key 'grids' (did you mean 'grid'?)"),
    ({"norm.kind": ["bn"]}, {"rules": [{"where": {"norm.kind": "bn"}}]}, "'set' is empty"),
])
def test_sweep_errors_are_one_line(tmp_path, grid, extra, message):
    rules = extra.pop("rules", None)
    path = write_sweep(tmp_path / "bad.yaml", grid, rules=rules, **extra)
    with pytest.raises(UserError) as info:
        load_sweep(path, preflight=False)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_preflight_and_cli_refuse_a_bad_sweep(tmp_path, synth_root):
    runner = CliRunner()
    # GroupNorm with 8 groups cannot normalize the 4-channel stem: the whole sweep is refused
    path = write_sweep(tmp_path / "bad.yaml", {"norm.kind": ["bn", "gn"], "norm.groups": [8]}, root=synth_root,
                       out_dir=str(tmp_path / "out"))
    res = runner.invoke(app, ["sweep", str(path)])
    assert res.exit_code == 2
    assert res.output.startswith("normbench: error: sweep cell 1 'gn-b20-groups8-s0': norm.groups=8 does not divide")
    assert res.output.count("\n") == 1 and not (tmp_path / "out").exists()
    path = write_sweep(tmp_path / "bad2.yaml", {"norm.kind": ["bn"], "optim.lrr": [0.1]})
    res = runner.invoke(app, ["sweep", str(path), "--dry-run"])
    assert res.exit_code == 2 and "unknown key 'optim.lrr' (did you mean 'optim.lr'?)" in res.output
    res = runner.invoke(app, ["sweep", str(path), "--force", "--rerun-failed"])
    assert res.exit_code == 2 and res.output.count("\n") == 1
    path = write_sweep(tmp_path / "ok.yaml", {"norm.kind": ["bn"]})
    res = runner.invoke(app, ["sweep", str(path), "--set", "norm.kind=gn"])
    assert res.exit_code == 2 and "is a grid axis" in res.output


def test_stale_lock_of_a_killed_process_is_free(tmp_path):
    lock_path = tmp_path / ".lock"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, sys.argv[1]); from normbench.sweep.state import CellLock;"
        "l = CellLock(sys.argv[2]); assert l.try_acquire(); print('held', flush=True); time.sleep(60)"),
        str(REPO), str(lock_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        lock = CellLock(lock_path)
        assert not lock.try_acquire() and lock.is_held()
        assert lock.holder().startswith(f"{holder.pid}@")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert lock.try_acquire()  # the kernel dropped the dead process's lock
    lock.release()


# ----------------------------------------------------------------------------- real sweeps


@pytest.mark.slow
def test_sweep_two_workers_divergence_skip_and_report(tmp_path, synth_root):
    out = tmp_path / "out"
    path = write_sweep(tmp_path / "s.yaml", {"norm.kind": ["bn", "gn"], "train.batch_size": [10, 20]},
                       rules=[{"where": {"norm.kind": "gn", "train.batch_size": 10}, "set": {"optim.lr": 1.0e6}}],
                       root=synth_root, out_dir=str(out))
    res = run_cli("sweep", str(path), "--workers", "2", "--threads-per-worker", "1")
    assert res.returncode == 1, res.stdout + res.stderr  # a diverged cell makes the sweep exit 1
    runs = summaries(out)
    statuses = sorted(s["status"] for s in runs.values())
    assert statuses == ["completed", "completed", "completed", "diverged"]
    bad = next(name for name, s in runs.items() if s["status"] == "diverged")
    assert bad.startswith("gn-b10-s0-") and runs[bad]["config"]["optim"]["lr"] == 1.0e6
    assert "failed or diverged cells" in res.stdout and f"{bad}/train.log" in res.stdout
    for name, s in runs.items():
        assert attempts(out / name) == 1 and s["threads"] == 1
        assert (out / name / "tb").is_dir()  # one TensorBoard tree: tensorboard --logdir out
    assert json.loads((out / "sweep.json").read_text())["cells"][0]["name"] == "bn-b10-s0"
    # again: nothing is trained twice; the dry run shows the recorded states
    mtimes = {n: (out / n / "summary.json").stat().st_mtime for n in runs}
    res = run_cli("sweep", str(path), "--workers", "2")
    assert res.returncode == 1 and "0 cell(s) trained" in res.stdout
    assert {n: (out / n / "summary.json").stat().st_mtime for n in runs} == mtimes
    res = CliRunner().invoke(app, ["sweep", str(path), "--dry-run", "--no-estimate"])
    assert res.exit_code == 0 and "3 done" in res.output and "1 diverged" in res.output
    res = CliRunner().invoke(app, ["report", str(out)])
    assert res.exit_code == 0 and "diverged" in res.output and "b=10" in res.output


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
        return "\nState:\tZ" not in state
    except OSError:
        return False


@pytest.mark.slow
def test_killed_sweep_restarts_without_retraining(tmp_path, synth_root):
    out = tmp_path / "out"
    path = write_sweep(tmp_path / "s.yaml", {"norm.kind": ["bn", "gn", "ln"]}, root=synth_root, out_dir=str(out),
                       tb=False)
    path.write_text(path.read_text().replace("train.epochs: 1", "train.epochs: 2"))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen([sys.executable, "-m", "normbench", "sweep", str(path), "--workers", "1",
                              "--threads-per-worker", "1"], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    try:
        done = _wait_for(lambda: [n for n, s in summaries(out).items() if s["status"] == "completed"], 120,
                         "the first cell to complete")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    finished = done[0]
    stamp = (out / finished / "summary.json").stat().st_mtime
    # the orphaned worker gets SIGTERM (parent-death signal), checkpoints and exits
    pids = {int(line.split("(pid ")[1].split()[0]) for p in out.glob("*/train.log")
            for line in p.read_text().splitlines() if ATTEMPT_MARK in line}
    _wait_for(lambda: not any(_alive(pid) for pid in pids), 60, "the orphaned worker to exit")
    res = run_cli("sweep", str(path), "--workers", "1", "--threads-per-worker", "1")
    assert res.returncode == 0, res.stdout + res.stderr
    runs = summaries(out)
    assert len(runs) == 3 and all(s["status"] == "completed" for s in runs.values())
    assert attempts(out / finished) == 1 and (out / finished / "summary.json").stat().st_mtime == stamp
    assert sum(attempts(out / n) for n in runs) <= 4  # at most the interrupted cell was started twice
    # every cell ends exactly as in an uninterrupted sweep (same threads: bit-identical on CPU)
    clean = tmp_path / "clean"
    res = run_cli("sweep", str(path), "--out", str(clean), "--workers", "1", "--threads-per-worker", "1")
    assert res.returncode == 0, res.stdout + res.stderr
    from normbench.tracking import RunDir

    for name in runs:
        a, b = RunDir(out / name).load_checkpoint()["model"], RunDir(clean / name).load_checkpoint()["model"]
        assert all(torch.equal(a[k], b[k]) for k in a), name
        ma = [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in RunDir(out / name).read_metrics()]
        mb = [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in RunDir(clean / name).read_metrics()]
        assert ma == mb, name


@pytest.mark.slow
def test_concurrent_sweeps_train_each_cell_once(tmp_path, synth_root):
    out = tmp_path / "out"
    path = write_sweep(tmp_path / "s.yaml", {"norm.kind": ["bn", "gn"], "seed": [0, 1]}, root=synth_root,
                       out_dir=str(out), tb=False)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "normbench", "sweep", str(path), "--workers", "1", "--threads-per-worker", "1"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
             for _ in range(2)]
    # a report on the same folder while both sweeps write: never a torn read or a traceback
    reports = []
    while any(p.poll() is None for p in procs) and len(reports) < 20:
        r = CliRunner().invoke(app, ["report", str(out)])
        reports.append((r.exit_code, r.output))
        time.sleep(0.2)
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert reports and all(code in (0, 2) and "Traceback" not in text and "corrupt" not in text
                           for code, text in reports), reports
    runs = summaries(out)
    assert len(runs) == 4 and all(s["status"] == "completed" for s in runs.values())
    assert {n: attempts(out / n) for n in runs} == {n: 1 for n in runs}, outputs


# ----------------------------------------------------------------------------- Ray


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


@pytest.fixture(scope="module")
def ray_cluster():
    """A real single-node Ray cluster on 127.0.0.1 (2 CPUs, small object store, own ports and
    temp dir), started with `ray start --head --block` and stopped by signalling that process
    (not `ray stop`, which would kill every Ray process of this user on the machine)."""
    try:
        import ray  # noqa: F401
    except ImportError:
        pytest.skip("ray is not installed (pip install -e '.[ray]'): the Ray backend test needs a real cluster")
    gcs, client, node, objm, agent, agent_grpc, rte, metrics = fixed = _free_ports(8)
    # Ray refuses a worker port range [wmin, wmin + 20] that holds one of the other ports (a
    # collision the kernel's random free ports made once in a full run): pick one that does not.
    wmin = next(w for w in (_free_ports(1)[0] for _ in range(100)) if not any(w <= f <= w + 20 for f in fixed))
    temp = tempfile.mkdtemp(prefix="nbray", dir="/tmp")  # short: Ray's unix socket paths are length-limited
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", "--num-cpus", "2",
           "--num-gpus", "0", "--node-ip-address", "127.0.0.1", "--port", str(gcs), "--include-dashboard=false",
           "--object-store-memory", str(80 * 1024 * 1024), "--disable-usage-stats", "--temp-dir", temp,
           "--ray-client-server-port", str(client), "--node-manager-port", str(node), "--object-manager-port",
           str(objm), "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(agent_grpc),
           "--runtime-env-agent-port", str(rte), "--metrics-export-port", str(metrics),
           "--min-worker-port", str(wmin), "--max-worker-port", str(wmin + 20)]
    if wmin + 20 > 65535:
        pytest.skip("no free port range for Ray workers")
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_DISABLE_DOCKER_CPU_WARNING": "1"}
    log = open(Path(temp) / "head.log", "w")
    head = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        _wait_for(lambda: "Ray runtime started" in (Path(temp) / "head.log").read_text() or head.poll() is not None,
                  90, "the Ray head to start")
        if head.poll() is not None:
            raise AssertionError("ray start failed:\n" + (Path(temp) / "head.log").read_text()[-3000:])
        yield f"127.0.0.1:{gcs}"
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops its own processes on SIGTERM
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)  # the process group started for it, nothing else
            head.wait()
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.xdist_group("ray")
def test_ray_backend_on_a_real_cluster(tmp_path, synth_root, ray_cluster):
    out = tmp_path / "out"
    path = write_sweep(tmp_path / "s.yaml", {"norm.kind": ["bn", "gn"]}, root=synth_root, out_dir=str(out))
    res = run_cli("sweep", str(path), "--backend", "ray", "--address", ray_cluster, "--threads-per-worker", "1",
                  "--no-progress", timeout=240)
    assert res.returncode == 0, res.stdout + res.stderr
    runs = summaries(out)
    assert len(runs) == 2 and all(s["status"] == "completed" and s["threads"] == 1 for s in runs.values())
    assert all(attempts(out / n) == 1 for n in runs)
    # again: both cells are recorded, nothing is submitted or trained
    res = run_cli("sweep", str(path), "--backend", "ray", "--address", ray_cluster, timeout=240)
    assert res.returncode == 0 and "0 to train" in res.stdout
    assert all(attempts(out / n) == 1 for n in runs)


@pytest.mark.slow
def test_pack_trains_seeds_as_one_network_with_their_own_run_dirs(tmp_path, synth_root):
    out = tmp_path / "out"
    path = write_sweep(tmp_path / "s.yaml", {"norm.kind": ["bn", "brn"], "seed": [0, 1, 2]}, root=synth_root,
                       out_dir=str(out), tb=False)
    res = CliRunner().invoke(app, ["sweep", str(path), "--pack", "3", "--dry-run", "--no-estimate"])
    assert res.exit_code == 0 and res.output.count("train") >= 6, res.output
    res = run_cli("sweep", str(path), "--pack", "3", "--workers", "1", "--threads-per-worker", "1")
    assert res.returncode == 0, res.stdout + res.stderr
    runs = summaries(out)
    assert len(runs) == 6 and all(s["status"] == "completed" for s in runs.values())
    packed = {n: s.get("packed_members") for n, s in runs.items()}
    assert sorted(v for n, v in packed.items() if n.startswith("bn-")) == [3, 3, 3]
    assert all(v is None for n, v in packed.items() if n.startswith("brn-"))  # brn is not packable: alone
    assert "6 done" in run_cli("sweep", str(path), "--pack", "3").stdout


def test_pack_max_batch_packs_only_the_small_batch_cells(tmp_path, synth_root):
    """--pack-max-batch 8: the batch-2 seeds are one pack, the batch-20 seeds train alone."""
    from normbench.sweep.plan import plan_sweep

    path = write_sweep(tmp_path / "s.yaml", {"train.batch_size": [2, 20], "seed": [0, 1, 2]}, root=synth_root,
                       out_dir=str(tmp_path / "out"), tb=False)
    spec = load_sweep(path, preflight=False)
    plan = plan_sweep(spec, 1, pack=4, pack_max_batch=8)
    sizes = sorted((t.config.train.batch_size, len(t.cell_tasks)) for t in plan.tasks)
    assert sizes == [(2, 3), (20, 1), (20, 1), (20, 1)]
    everything = plan_sweep(spec, 1, pack=4)
    assert sorted(len(t.cell_tasks) for t in everything.tasks) == [3, 3]


def test_local_layout_gives_spare_cores_to_the_last_cells(monkeypatch):
    """One single-thread worker per core by default; fewer cells than cores get the spare
    cores as threads; explicit --workers / --threads-per-worker always win."""
    import normbench.sweep.layout as layout

    monkeypatch.setattr(layout, "usable_cores", lambda: 4)
    cpu_cells = [type("C", (), {"cfg": type("Cfg", (), {"device": "cpu"})()})()] * 6
    assert layout.local_layout(6, None, None, cpu_cells) == (4, 1)
    assert layout.local_layout(2, None, None, cpu_cells) == (4, 2)
    assert layout.local_layout(1, None, None, cpu_cells) == (4, 4)
    assert layout.local_layout(0, None, None, cpu_cells) == (4, 1)  # nothing to train: the nominal layout
    assert layout.local_layout(1, 2, None, cpu_cells) == (2, 4)
    assert layout.local_layout(1, None, 1, cpu_cells) == (4, 1)


def test_sweep_eta_counts_cells_by_estimated_cost():
    """Long cells run first: counting cells alike would put the ETA far off early on."""
    from normbench.sweep.display import SweepCounts
    from normbench.sweep.plan import EVAL_IMAGES, cost_proxy

    c = SweepCounts()
    c.total, c.weights = 2, {0: 9.0, 1: 1.0}
    c.start(0, "long", 100, 0)
    c.running[0][2] = 50
    assert c.fraction_done() == pytest.approx(0.9)  # half of 90% of the work, in units of 2 cells
    c.running.pop(0)
    c.finish(0)
    assert c.done == 1 and c.fraction_done() == pytest.approx(1.8)
    c.t0 -= 90.0  # 90 s for 90% of the work: 10 s left
    assert c.eta() == pytest.approx(10.0, rel=0.05)
    resumed = SweepCounts()  # a cell resumed at 80%: its earlier steps are not this run's speed
    resumed.total, resumed.weights = 2, {0: 1.0, 1: 1.0}
    resumed.start(0, "resumed", 100, 80)
    resumed.running[0][2] = 90
    resumed.t0 -= 10.0  # 10 s for 10% of one cell: 1.1 cells (110 s) left
    assert resumed.eta() == pytest.approx(110.0, rel=0.05)
    plain = SweepCounts()
    plain.total, plain.done = 4, 1
    assert plain.fraction_done() == 1  # without weights: cells alike
    cfg = lambda b: load_config_for_cost(b)  # noqa: E731
    assert cost_proxy(cfg(2)) / cost_proxy(cfg(128)) == pytest.approx(
        (25000 * 5 + EVAL_IMAGES) / (390 * 131 + EVAL_IMAGES))


def load_config_for_cost(batch):
    from normbench.config import load_config

    return load_config(None, ["device=cpu", f"train.batch_size={batch}", "train.epochs=1"])
