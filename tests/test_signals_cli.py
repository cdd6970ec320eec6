"""Ctrl-C outside training (loading, benchmarking, evaluating) exits 130 with one line, as
the README's exit-code table says, instead of click's "Aborted!" and exit 1."""

import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_ctrl_c_during_a_long_bench_exits_130_with_one_line():
    proc = subprocess.Popen([sys.executable, "-m", "cnntrain", "bench", "--images", "200000",
                             "--batch-sizes", "1"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    time.sleep(3)  # well inside the first timed pass
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "error: interrupted by SIGINT" in err
    assert "Traceback" not in err and "Aborted" not in err
