"""`cnntrain bench`: it runs, reports every job, and refuses bad arguments. Speed itself is
never asserted here: the figures belong in the README, measured, not in a timed test."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def bench(*args):
    return subprocess.run([sys.executable, "-m", "cnntrain", "bench", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_bench_reports_every_job_as_json():
    result = bench("configs/lenet.yaml", "training.threads=2", "--images", "96", "--repeats", "1",
                   "--batch-sizes", "1,64", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert set(report["cnntrain"]) == {"train_1", "train_64", "eval"}
    assert all(rate > 0 for rate in report["cnntrain"].values())
    assert report["images"] == 96 and report["data"] == "synthetic" and report["peak_rss_mib"] > 0
    # batch 64 ran as two chunks, one in the helper process, whose memory is reported too
    assert report["workers"] == 2 and report["helpers"] == 1 and report["helper_peak_rss_mib"] > 0
    try:
        import torch  # noqa: F401
    except ImportError:
        assert "torch" not in report
    else:
        assert set(report["ratio"]) == {"train_1", "train_64", "eval"}


def test_bench_prints_a_table_and_refuses_bad_batch_sizes():
    table = bench("--images", "64", "--repeats", "1", "--batch-sizes", "32")
    assert table.returncode == 0, table.stderr
    assert "train, batch 32" in table.stdout and "evaluate, batch 1000" in table.stdout
    assert "peak memory before torch was imported" in table.stdout
    bad = bench("--batch-sizes", "0,x")
    assert bad.returncode == 2
    assert "error: --batch-sizes: expected positive integers" in bad.stderr
    bad_config = bench("configs/lenet.yaml", "optimizer.lr=0")
    assert bad_config.returncode == 2 and "optimizer.lr" in bad_config.stderr
