"""SIGINT / SIGTERM handling shared by the executors: install a handler, put the old ones back."""
from __future__ import annotations

import signal


def install_interrupt_handler(handler) -> dict:
    """Install ``handler`` for SIGINT and SIGTERM (main thread only); returns the old handlers."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return {}
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in old:
        signal.signal(s, handler)
    return old


def restore_signal_handlers(old: dict) -> None:
    """Put back what :func:`install_interrupt_handler` replaced (a handler set outside Python,
    reported as None, stays)."""
    for s, h in old.items():
        if h is not None:
            signal.signal(s, h)
