"""The Ray executor against a cluster started the way the README says (`ray get-auth-token
--generate`, then `RAY_AUTH_MODE=token ray start --head`), and its connection failures: a
machine without the cluster's token, an address where nothing listens, SIGTERM while
connecting. Every Ray process a test starts runs in its own process group and is stopped by
signalling that group (never `ray stop`, which would stop every Ray of this user)."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO

if importlib.util.find_spec("ray") is None:
    pytest.skip("ray is not installed (pip install -e '.[ray]'): these tests need a real Ray cluster",
                allow_module_level=True)

pytestmark = pytest.mark.xdist_group("ray")  # one xdist worker runs every Ray cluster, one at a time

# a cell of a second or two of CPU: ResNet-20 at width 0.25, 200 synthetic images, 1 epoch
TINY = {"data.allow_download": False, "model.width": 0.25, "train.epochs": 1, "train.batch_size": 20,
        "train.log_every": 5, "optim.warmup_epochs": 0.5, "device": "cpu", "log.tensorboard": False}
RAY_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS")


def _env(home: Path, **extra: str) -> dict:
    """The environment of every process here: HOME (where Ray keeps ~/.ray/auth_token) is the
    test's own, and no Ray address or authentication setting leaks in from outside."""
    env = {k: v for k, v in os.environ.items() if k not in RAY_ENV}
    env.update({"HOME": str(home), "PYTHONPATH": str(REPO), "RAY_DISABLE_DOCKER_CPU_WARNING": "1",
                "RAY_USAGE_STATS_ENABLED": "0", **extra})
    return env


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _sweep_file(tmp_path: Path, root: Path, grid: dict) -> tuple[Path, Path]:
    out = tmp_path / "out"
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"set": {**TINY, "data.root": str(root)}, "grid": grid, "out_dir": str(out)}))
    return path, out


class _Timed:
    """`normbench ARGS` in a subprocess (stdout and stderr merged), each line with the seconds
    since start at which it arrived."""

    def __init__(self, args: list[str], env: dict):
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, "-m", "normbench", *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO,
                                     start_new_session=True)
        self.lines: list[tuple[float, str]] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append((time.monotonic() - self.t0, line.rstrip("\n")))

    def when(self, prefix: str, timeout: float) -> float:
        """Seconds since start at which a line starting with ``prefix`` arrived (waits for it)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for t, line in list(self.lines):
                if line.startswith(prefix):
                    return t
            if self.proc.poll() is not None and not self.reader.is_alive():
                break
            time.sleep(0.05)
        raise AssertionError(f"no line starting with {prefix!r} within {timeout:.0f} s:\n{self.text()}")

    def finish(self, timeout: float) -> float:
        """Wait for the process; the seconds since start at which it ended. Kills it (its own
        process group) when it outlives ``timeout``."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            self.reader.join(5)
            raise AssertionError(f"still running after {timeout:.0f} s:\n{self.text()}") from None
        ended = time.monotonic() - self.t0
        self.reader.join(5)
        return ended

    def text(self) -> str:
        return "\n".join(f"{t:6.1f} {line}" for t, line in self.lines)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture(scope="module")
def token_cluster(tmp_path_factory):
    """A real single-node cluster with token authentication, started as the README says: a
    token made by `ray get-auth-token --generate` in the head's HOME, then `ray start --head`
    with RAY_AUTH_MODE=token; 127.0.0.1 only, its own ports and temp dir, and `--block`, so
    signalling that process group stops it and everything it started."""
    home = tmp_path_factory.mktemp("head-home")
    env = _env(home, RAY_AUTH_MODE="token")
    ray_cli = [sys.executable, "-m", "ray.scripts.scripts"]
    made = subprocess.run([*ray_cli, "get-auth-token", "--generate"], env=env, capture_output=True, text=True,
                          timeout=180)
    assert made.returncode == 0 and (home / ".ray" / "auth_token").is_file(), made.stdout + made.stderr
    fixed = _free_ports(8)
    gcs, client, node, objm, agent, agent_grpc, rte, metrics = fixed
    # Ray refuses a worker port range that holds one of the other ports: pick one that does not
    wmin = next((w for w in (_free_ports(1)[0] for _ in range(100))
                 if w + 20 <= 65535 and not any(w <= f <= w + 20 for f in fixed)), None)
    if wmin is None:
        pytest.skip("no free range of 21 ports for the Ray workers on this machine")
    temp = tempfile.mkdtemp(prefix="nbrc", dir="/tmp")  # short: Ray's unix socket paths are length-limited
    cmd = [*ray_cli, "start", "--head", "--block", "--port", str(gcs), "--node-ip-address", "127.0.0.1",
           "--num-cpus", "2", "--num-gpus", "0", "--include-dashboard=false", "--disable-usage-stats",
           "--object-store-memory", str(80 * 1024 * 1024), "--temp-dir", temp,
           "--ray-client-server-port", str(client), "--node-manager-port", str(node),
           "--object-manager-port", str(objm), "--dashboard-agent-listen-port", str(agent),
           "--dashboard-agent-grpc-port", str(agent_grpc), "--runtime-env-agent-port", str(rte),
           "--metrics-export-port", str(metrics), "--min-worker-port", str(wmin), "--max-worker-port", str(wmin + 20)]
    log_path = Path(temp) / "head.log"
    log = open(log_path, "w")
    head = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in log_path.read_text() and head.poll() is None:
            assert time.monotonic() < deadline, "the Ray head did not start in 120 s:\n" + log_path.read_text()[-3000:]
            time.sleep(0.1)
        assert head.poll() is None, "ray start failed:\n" + log_path.read_text()[-3000:]
        yield {"address": f"127.0.0.1:{gcs}", "home": home}
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops what it started on SIGTERM
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(head.pid, signal.SIGKILL)  # whatever of that process group is left, nothing else
        except ProcessLookupError:
            pass
        head.wait()
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
def test_sweep_trains_on_a_token_cluster_started_with_ray_start(tmp_path, synth_root, token_cluster):
    """The head node's HOME holds the token and RAY_AUTH_MODE is unset, as in a shell on the
    head after the README's commands: the sweep finds the token the way `ray` does."""
    path, out = _sweep_file(tmp_path, synth_root, {"norm.kind": ["bn"]})
    run = _Timed(["sweep", str(path), "--backend", "ray", "--address", token_cluster["address"],
                  "--threads-per-worker", "1", "--no-progress"], _env(token_cluster["home"]))
    try:
        run.finish(300)
    finally:
        run.kill()
    assert run.proc.returncode == 0, run.text()
    summaries = [json.loads(p.read_text()) for p in out.glob("*/summary.json")]
    assert [s["status"] for s in summaries] == ["completed"], run.text()


@pytest.mark.slow
def test_a_machine_without_the_cluster_token_gets_one_line_naming_the_fix(tmp_path, synth_root, token_cluster):
    path, out = _sweep_file(tmp_path, synth_root, {"norm.kind": ["bn"]})
    home = tmp_path / "home"  # no ~/.ray/auth_token: another machine the token was not copied to
    home.mkdir()
    run = _Timed(["sweep", str(path), "--backend", "ray", "--address", token_cluster["address"], "--no-progress"],
                 _env(home))
    try:
        start = run.when("sweep s.yaml:", 180)
        ended = run.finish(120)
    finally:
        run.kill()
    assert run.proc.returncode == 2, run.text()
    errors = [line for t, line in run.lines if t >= start and not line.startswith(("sweep s.yaml:", "connecting"))]
    assert len(errors) == 1 and errors[0].startswith("normbench: error:"), run.text()  # no Ray log lines
    assert token_cluster["address"] in errors[0] and "~/.ray/auth_token" in errors[0], errors[0]
    assert ended - start < 20, run.text()
    assert not list(out.glob("*/summary.json"))


@pytest.mark.slow
def test_address_where_nothing_listens_fails_in_seconds_with_one_line(tmp_path, synth_root):
    port = _free_ports(1)[0]  # bound and closed again: nothing listens there
    path, _ = _sweep_file(tmp_path, synth_root, {"norm.kind": ["bn"]})
    run = _Timed(["sweep", str(path), "--backend", "ray", "--address", f"127.0.0.1:{port}", "--no-progress"],
                 _env(tmp_path))
    try:
        start = run.when("sweep s.yaml:", 180)  # printed just before the executor connects
        failed = run.when("normbench: error:", 60)
        ended = run.finish(60)
    finally:
        run.kill()
    assert run.proc.returncode == 2, run.text()
    after = [line for t, line in run.lines if t >= start and not line.startswith(("sweep s.yaml:", "connecting"))]
    assert len(after) == 1 and f"127.0.0.1:{port}" in after[0], run.text()  # no Ray log lines, no traceback
    assert failed - start < 20 and ended - start < 40, run.text()


@pytest.mark.slow
def test_sigterm_while_connecting_stops_the_sweep_promptly(tmp_path, synth_root):
    port = _free_ports(1)[0]
    path, _ = _sweep_file(tmp_path, synth_root, {"norm.kind": ["bn"]})
    run = _Timed(["sweep", str(path), "--backend", "ray", "--address", f"127.0.0.1:{port}", "--no-progress"],
                 _env(tmp_path))
    try:
        run.when("connecting to the Ray cluster", 180)
        time.sleep(2)  # into the connection attempt (it gives up only after 12 s)
        assert run.proc.poll() is None, run.text()
        sent = time.monotonic() - run.t0
        run.proc.send_signal(signal.SIGTERM)
        ended = run.finish(60)
    finally:
        run.kill()
    assert run.proc.returncode == 143, run.text()
    assert ended - sent < 15, run.text()
    assert "interrupted" in run.text() and "Traceback" not in run.text()


# ----------------------------------------------------------------------------- the probe alone


def test_probe_gives_up_on_a_port_that_accepts_but_never_answers(monkeypatch):
    """TCP connects (a listening socket that never speaks), Ray's client then blocks: the probe
    still returns within its timeout, with one line naming the address."""
    import ray._raylet

    from normbench.errors import UserError
    from normbench.sweep.ray_backend import ray_probe

    monkeypatch.setattr(ray._raylet, "GcsClient", lambda address: time.sleep(3600))
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        address = f"127.0.0.1:{server.getsockname()[1]}"
        t0 = time.monotonic()
        with pytest.raises(UserError) as err:
            ray_probe(address, address, timeout=1.5)
        assert time.monotonic() - t0 < 5
    assert address in str(err.value) and "accepts connections" in str(err.value)


def test_probe_leaves_the_main_thread_free_for_sigterm(monkeypatch):
    import ray._raylet

    from normbench.sweep.ray_backend import ray_probe

    monkeypatch.setattr(ray._raylet, "GcsClient", lambda address: time.sleep(3600))

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, interrupt)
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM))
    try:
        with socket.socket() as server:
            server.bind(("127.0.0.1", 0))
            server.listen()
            address = f"127.0.0.1:{server.getsockname()[1]}"
            t0 = time.monotonic()
            timer.start()
            with pytest.raises(KeyboardInterrupt):
                ray_probe(address, address, timeout=30)
            assert time.monotonic() - t0 < 5
    finally:
        timer.cancel()
        signal.signal(signal.SIGTERM, old)


def test_malformed_address_is_one_line_naming_it():
    from normbench.errors import UserError
    from normbench.sweep.ray_backend import ray_gcs_address

    for bad in ("nonsense", "10.0.0.1:", "10.0.0.1:port", "10.0.0.1:70000"):
        with pytest.raises(UserError) as err:
            ray_gcs_address(bad)
        assert f"'{bad}'" in str(err.value) and "HOST:PORT" in str(err.value)
