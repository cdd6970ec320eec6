"""SIGINT and SIGTERM as a request to stop: training finishes the step it is in, saves a
resumable checkpoint and exits 130 (SIGINT) or 143 (SIGTERM), 128 + the signal number as
shells report it. A second Ctrl-C stops at once (KeyboardInterrupt)."""

import signal
from contextlib import contextmanager


class StopRequest:
    """Set by the signal handler, read by the training loop between steps."""

    def __init__(self):
        self.signum = None

    def __bool__(self):
        return self.signum is not None

    @property
    def name(self):
        return signal.Signals(self.signum).name

    @property
    def exit_code(self):
        return 128 + self.signum


@contextmanager
def stop_on_signals():
    """Within the block, SIGINT and SIGTERM set the yielded StopRequest instead of killing."""
    request = StopRequest()

    def handler(signum, frame):
        if request.signum is None:
            request.signum = signum
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield request
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
