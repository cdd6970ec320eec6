"""Peak resident memory of this process, and of a model's helper processes."""

import resource
import sys


def peak_rss_mib():
    """Peak resident memory of this process so far, in MiB (Linux reports KiB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def run_peak_rss_mib(model):
    """This process's peak plus each of the model's running helpers' peaks, in MiB: an
    upper bound of the run's peak total (the peaks need not coincide)."""
    return peak_rss_mib() + sum(model.helper_peak_rss_mib())

