"""Engine errors that the CLI names without importing NumPy (so `--help` stays fast)."""


class WorkerError(RuntimeError):
    """A helper process failed or vanished; the message says which and how."""
