"""The Ray executor: every task a Ray task declaring ``num_cpus`` (its threads) and
``num_gpus``; the output folder must be on a filesystem all nodes share. Before connecting
to a cluster it checks, within a deadline and with the main thread free for signals, that
the address answers and accepts this machine's authentication."""
from __future__ import annotations

import os
import signal
import socket
import time
import traceback
from dataclasses import replace
from typing import Any, Optional

from normbench.errors import UserError, first_line
from normbench.sweep.cell import run_cell
from normbench.sweep.display import SweepDisplay
from normbench.sweep.signals import install_interrupt_handler, restore_signal_handlers
from normbench.sweep.tasks import CellResult, CellTask, PackTask, Task, settle

# How long the cluster named by --address may take to answer before the sweep gives up. Ray's
# own client waits about 35 s per attempt, 20 attempts, inside C++ calls that neither a
# deadline nor SIGTERM reaches, so the sweep checks first (see ray_probe).
RAY_CONNECT_TIMEOUT_S = 12.0
_RAY_TOKEN_FIX = ("copy the head node's ~/.ray/auth_token to this machine (`ray get-auth-token` on the head "
                  "prints it; RAY_AUTH_TOKEN=... works too)")


def ray_gcs_address(address: str) -> str:
    """``address`` (HOST:PORT or auto) as Ray will dial it; one-line UserError when malformed
    or when ``auto`` finds no cluster started on this machine."""
    if address != "auto":
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise UserError(f"--address: got '{address}'; give HOST:PORT of the head node's Ray (GCS) port, "
                            "e.g. 10.0.0.1:6379, or auto")
    try:
        from ray._private.services import canonicalize_bootstrap_address_or_die
    except ImportError:  # another Ray layout: let ray.init resolve it
        return address
    try:
        return canonicalize_bootstrap_address_or_die(address)
    except (ConnectionError, ValueError) as err:
        raise UserError(f"--backend ray: --address {address}: {first_line(err)}") from None


def ray_use_local_token() -> None:
    """Authenticate with this machine's Ray token when RAY_AUTH_MODE is unset and a token exists
    (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token): what `ray start --head` does
    when it starts the cluster, and what ray.init does for ``auto`` but not for HOST:PORT. A
    cluster without authentication accepts a client that sends a token."""
    if "RAY_AUTH_MODE" in os.environ:
        return
    try:
        from ray._raylet import AuthenticationTokenLoader, Config
    except ImportError:  # a Ray without token authentication
        return
    if AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True):
        os.environ["RAY_AUTH_MODE"] = "token"
        Config.initialize("")  # Ray caches its config: make this process see the mode


def ray_auth_refused(address: str) -> UserError:
    mode = os.environ.get("RAY_AUTH_MODE", "")
    if mode.lower() == "token":
        why = "rejected this machine's Ray token; " + _RAY_TOKEN_FIX
    elif mode:
        why = f"requires token authentication but RAY_AUTH_MODE={mode} here; unset it (or set " \
              f"RAY_AUTH_MODE=token) and {_RAY_TOKEN_FIX}"
    else:
        why = "requires token authentication and this machine has no Ray token; " + _RAY_TOKEN_FIX
    return UserError(f"--backend ray: the Ray cluster at {address} {why}")


def ray_probe(gcs_address: str, shown: str, timeout: float) -> None:
    """Make sure the cluster's GCS answers, within ``timeout`` s in all, with the main thread
    free for SIGINT/SIGTERM: first a plain TCP connection (retried while refused, so a head
    that is still starting gets the time), then Ray's own client in a daemon thread, which
    also tells whether the cluster accepts this machine's authentication. UserError (one
    line) when nothing answers in time, when authentication is refused, or on another failure."""
    import threading

    deadline = time.monotonic() + timeout
    host, _, port = gcs_address.rpartition(":")
    host = host.strip("[]")
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise UserError(f"--backend ray: no Ray cluster answered at {shown} within {timeout:.0f} s "
                            "(is `ray start --head` running there, and is this its --port, 6379 by default?)")
        try:
            socket.create_connection((host, int(port)), timeout=min(left, 3.0)).close()
            break
        except socket.gaierror:
            raise UserError(f"--backend ray: --address {shown}: unknown host '{host}'") from None
        except OSError:
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
    try:
        from ray._raylet import GcsClient
    except ImportError:  # another Ray layout: leave the rest to ray.init
        return
    outcome: dict[str, BaseException] = {}

    def attempt() -> None:
        try:
            GcsClient(address=gcs_address)
        except BaseException as err:  # noqa: BLE001
            outcome["error"] = err

    probe = threading.Thread(target=attempt, name="normbench-ray-probe", daemon=True)
    # Ray's C++ client logs its failed attempts straight to fd 2 (at 5 s and 10 s into one,
    # then at 40 s, after the sweep has given up and gone): keep them out of the one-line error
    saved, quiet = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(quiet, 2)
    try:
        probe.start()
        probe.join(max(1.0, deadline - time.monotonic()))
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(quiet)
    if probe.is_alive():
        raise UserError(f"--backend ray: {shown} accepts connections but no Ray cluster answered there within "
                        f"{timeout:.0f} s (is this the head node's Ray --port, 6379 by default?)")
    err = outcome.get("error")
    if err is None:
        return
    if type(err).__name__ == "AuthenticationError" or "InvalidAuthToken" in str(err):
        raise ray_auth_refused(shown)
    raise UserError(f"--backend ray: cannot connect to a Ray cluster at {shown}: {first_line(err)}")


def pin_data_roots(tasks: list[Task]) -> list[Task]:
    """The tasks with every cell's data root made an absolute path (not part of the config
    hash): remote workers have another cwd and environment."""
    def pin(task: CellTask) -> CellTask:
        data = task.config.data
        root = str(data.resolved_root().resolve())
        return replace(task, config=task.config.model_copy(update={"data": data.model_copy(update={"root": root})}))

    return [replace(t, members=tuple(pin(m) for m in t.members)) if isinstance(t, PackTask) else pin(t)
            for t in tasks]


def ray_cell_task(task: Task) -> CellResult:
    """Body of one Ray task: the same locking, skipping and resuming as a local worker."""
    import torch

    threads = int(task.config.threads or 1)
    torch.set_num_threads(threads)
    try:
        return run_cell(task)
    except BaseException:  # noqa: BLE001
        return CellResult.crashed(task, traceback.format_exc().splitlines()[-1])


class RayExecutor:
    """Each cell a Ray task with ``num_cpus=threads`` and ``num_gpus=gpus``. ``address``:
    None starts a private local Ray instance sized to ``local_cpus`` (even with RAY_ADDRESS set);
    otherwise connect, giving up after :data:`RAY_CONNECT_TIMEOUT_S`. SIGINT/SIGTERM, while
    connecting or training, stop the sweep with exit code 130/143."""

    def __init__(self, address: Optional[str], threads: int, gpus: float, display: SweepDisplay,
                 local_cpus: Optional[int] = None):
        self.address, self.threads, self.gpus, self.display, self.local_cpus = address, threads, gpus, display, local_cpus
        self.interrupted = False
        self.exit_code = 130

    def run(self, tasks: list[Task]) -> list[CellResult]:
        try:
            import ray
        except ImportError:
            raise UserError("--backend ray needs Ray: pip install -e '.[ray]'") from None
        if not tasks:
            return []
        tasks = pin_data_roots(tasks)
        old_handlers = self._install_signal_handlers()
        try:
            try:
                self._connect(ray)
            except KeyboardInterrupt:
                self.interrupted = True
                self.display.message("stopping: interrupted while connecting to Ray; nothing was submitted")
                return []
            self._install_signal_handlers()  # ray.init replaced the SIGTERM handler with its own
            return self._submit(ray, tasks)
        finally:
            try:
                ray.shutdown()
            finally:
                restore_signal_handlers(old_handlers)

    def _connect(self, ray) -> None:
        import logging

        kwargs: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.WARNING,
                                  "configure_logging": True}
        if not self.address:
            try:
                ray.init(address="local", num_cpus=self.local_cpus, include_dashboard=False, **kwargs)
            except Exception as err:  # noqa: BLE001
                raise UserError(f"--backend ray: cannot start a local Ray instance: {first_line(err)}") from None
            return
        gcs = ray_gcs_address(self.address)
        ray_use_local_token()
        self.display.message(f"connecting to the Ray cluster at {self.address} "
                             f"(giving up after {RAY_CONNECT_TIMEOUT_S:.0f} s)")
        ray_probe(gcs, self.address, RAY_CONNECT_TIMEOUT_S)
        try:
            ray.init(address=self.address, **kwargs)
        except SystemExit as err:  # the SIGTERM handler ray.init installs calls sys.exit(signum)
            if err.code == signal.SIGTERM:
                self.exit_code = 143
                raise KeyboardInterrupt from None
            raise
        except Exception as err:  # noqa: BLE001
            text = f"{err} {err.__cause__ or ''}"
            if type(err).__name__ == "AuthenticationError" or "InvalidAuthToken" in text:
                raise ray_auth_refused(self.address) from None
            hint = (" (run the sweep on a node of the cluster, one where `ray start` ran)"
                    if "No node info found" in text else "")
            raise UserError(f"--backend ray: cannot connect to a Ray cluster at {self.address}: "
                            f"{first_line(err)}{hint}") from None

    def _install_signal_handlers(self) -> dict:
        def handler(signum, frame):
            self.exit_code = 130 if signum == signal.SIGINT else 143
            raise KeyboardInterrupt

        return install_interrupt_handler(handler)

    def _submit(self, ray, tasks: list[Task]) -> list[CellResult]:
        """Submit every task, then the deferred ones again (now waiting for their lock);
        collect the results as they come."""
        remote = ray.remote(ray_cell_task)
        opts = {"num_cpus": self.threads, "num_gpus": self.gpus, "max_retries": 0}
        by_index: dict[int, Task] = {t.index: t for t in tasks}
        refs = {remote.options(**opts).remote(t): t.index for t in tasks}
        deferred: list[CellTask] = []
        results: dict[int, CellResult] = {}
        try:
            while refs or deferred:
                if not refs:
                    refs = {remote.options(**opts).remote(t): t.index for t in deferred}
                    by_index.update({t.index: t for t in deferred})
                    deferred = []
                done, _ = ray.wait(list(refs), num_returns=1, timeout=1.0)
                if not done:
                    self.display.tick()
                for ref in done:
                    index = refs.pop(ref)
                    try:
                        result = ray.get(ref)
                    except ray.exceptions.RayError as err:
                        text = str(err)
                        if "No module named 'normbench'" in text:
                            raise UserError("--backend ray: the Ray workers cannot import normbench; install it "
                                            "on every node (pip install -e '.[ray]')") from None
                        result = CellResult.crashed(by_index[index],
                                                    f"Ray task failed: {first_line(err)}")
                    self.display.finished(result)
                    cell_results, later = settle(by_index[index], result, defer=True)
                    results.update({r.index: r for r in cell_results})
                    deferred.extend(later)
        except KeyboardInterrupt:
            self.interrupted = True
            self.display.message("stopping: cancelling Ray tasks (finished epochs are checkpointed)")
            for ref in refs:
                ray.cancel(ref)
        return list(results.values())
