"""Signals during training: the first SIGINT / SIGTERM asks the loop to checkpoint and stop."""
from __future__ import annotations

import os
import signal
from contextlib import contextmanager
from typing import Optional

import torch

INTERRUPT_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}


class StopFlag:
    """First SIGINT/SIGTERM asks the loop to checkpoint and stop; a second SIGINT exits now."""

    def __init__(self):
        self.signum: Optional[int] = None

    def agree(self, dist_ctx, device: torch.device) -> None:
        """Under torchrun: if any rank was signalled, every rank stops (at the same step)."""
        from normbench.distributed import all_reduce_max

        flag = torch.tensor([float(self.signum or 0)], device=device)
        signum = int(all_reduce_max(flag, dist_ctx).item())
        if signum and self.signum is None:
            self.signum = signum

    @contextmanager
    def installed(self):
        import threading

        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        old = {s: signal.getsignal(s) for s in INTERRUPT_EXIT}

        def handler(signum, frame):
            if self.signum is not None and signum == signal.SIGINT:
                os._exit(130)  # second Ctrl-C: every file on disk is whole (atomic writes)
            self.signum = signum

        for s in INTERRUPT_EXIT:
            signal.signal(s, handler)
        self._handler = handler
        try:
            yield self
        finally:
            for s, h in old.items():
                signal.signal(s, h)
