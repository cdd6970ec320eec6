"""Helper processes (cnntrain/engine/workers.py) as a user meets them: the same bits as
one process, Ctrl-C at a terminal, a helper killed, the main process killed."""

import json
import re
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from cnntrain.engine import workers
from cnntrain.engine.model import WorkerError, build_model
from cnntrain.engine.optim import SGD
from test_cli import LENET, cnntrain
from test_engine import LENET as LENET_SPECS

pytestmark = pytest.mark.skipif(not workers.processes_supported(), reason="POSIX only")

# 4,000 sample digits, batch 64 (two chunks of 32: one here, one in the helper), 3 epochs
RUN = ["data.dataset=mnist-sample", "data.train_limit=4000", "data.test_limit=500",
       "data.validation=500", "training.batch_size=64", "training.epochs=3",
       "optimizer.momentum=0.9", "--no-plots"]


def children(pid):
    """PIDs whose parent is `pid` (from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_gone(pids, seconds=10):
    deadline = time.monotonic() + seconds
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not any(alive(p) for p in pids)


def test_helpers_run_chunks_in_other_processes_and_stop_on_close():
    model = build_model(LENET_SPECS, (1, 28, 28), "float32", np.random.default_rng(0), workers=3)
    rng = np.random.default_rng(1)
    model.loss(rng.random((128, 1, 28, 28), dtype=np.float32), rng.integers(0, 10, 128))
    pids = [p.pid for p in model._helpers.procs]
    assert len(pids) == 2 and os.getpid() not in pids and all(alive(p) for p in pids)
    assert all(mib > 0 for mib in model.helper_peak_rss_mib())
    model.close()
    assert wait_gone(pids)
    assert model.helper_peak_rss_mib() == []
    model.predict(rng.random((64, 1, 28, 28), dtype=np.float32))  # they start again
    assert model._helpers is not None
    model.close()


def test_a_killed_helper_is_an_error_naming_it_and_the_next_batch_starts_afresh():
    model = build_model(LENET_SPECS, (1, 28, 28), "float32", np.random.default_rng(0), workers=2)
    opt = SGD(model.params(), model.grads(), lr=0.05)
    rng = np.random.default_rng(2)
    x, y = rng.random((64, 1, 28, 28), dtype=np.float32), rng.integers(0, 10, 64)
    model.loss(x, y)
    helper = model._helpers.procs[0]
    os.kill(helper.pid, signal.SIGKILL)
    helper.wait()
    with pytest.raises(WorkerError, match=r"helper process 1 stopped while .*exit code -9"):
        model.loss(x, y)
    # a fresh helper serves the next batch, with the weights as they are
    reference = build_model(LENET_SPECS, (1, 28, 28), "float32", np.random.default_rng(0))
    reference.load_params(model.params())
    loss, logits = model.loss(x, y)
    ref_loss, ref_logits = reference.loss(x, y)
    assert loss == ref_loss
    np.testing.assert_array_equal(logits, ref_logits)
    np.testing.assert_array_equal(model.flat_grads, reference.flat_grads)
    opt.step()
    model.close()


def test_a_helper_that_cannot_start_says_why():
    shared, fd = workers.shared_array(10, np.float32)
    with pytest.raises(WorkerError, match="helper process 1 failed starting: ValueError: "
                                          "the model has 61706 weights, the main process 10"):
        workers.Helpers(1, LENET_SPECS, (1, 28, 28), 10, fd, 10, "float32", 64)
    os.close(fd)


def test_helpers_exit_when_the_main_process_is_killed(tmp_path):
    script = tmp_path / "main.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        import numpy as np
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from cnntrain.engine.model import build_model
        from test_engine import LENET
        model = build_model(LENET, (1, 28, 28), "float32", np.random.default_rng(0), workers=3)
        model.predict(np.zeros((128, 1, 28, 28), np.float32))
        print(*[p.pid for p in model._helpers.procs], flush=True)
        time.sleep(60)
    """))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    pids = [int(p) for p in proc.stdout.readline().split()]
    assert len(pids) == 2 and all(alive(p) for p in pids)
    proc.kill()
    proc.wait()
    assert wait_gone(pids), "helpers outlived a SIGKILLed main process"


def test_ctrl_c_at_a_terminal_stops_the_run_cleanly_and_resume_matches_one_process(tmp_path):
    """SIGINT to the whole process group, as a terminal sends it: the run finishes its
    step with its helper, saves, exits 130; resumed, it ends with the very bits of the
    same run done in one go in a single process (training.threads=1)."""
    one = cnntrain("train", LENET, *RUN, "training.threads=1", "--json", "--runs-dir",
                   tmp_path / "one", cwd=tmp_path)
    assert one.returncode == 0, one.stderr
    proc = subprocess.Popen([sys.executable, "-m", "cnntrain", "train", str(LENET), *RUN,
                             "training.threads=2", "--runs-dir", str(tmp_path)],
                            cwd=tmp_path, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own group, as a shell job has
    helpers = []
    for line in proc.stderr:
        if line.startswith("epoch 1/3"):
            helpers = children(proc.pid)
            os.killpg(proc.pid, signal.SIGINT)
            break
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 130, err
    assert "Traceback" not in err
    errors = [e for e in err.splitlines() if e.startswith("error:")]
    assert len(errors) == 1 and "interrupted by SIGINT in epoch" in errors[0], err
    assert helpers and wait_gone(helpers)
    resumed = cnntrain("train", "--resume", tmp_path / "lenet", "--json", "--no-plots",
                       cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    a, b = json.loads(one.stdout), json.loads(resumed.stdout)
    assert a["test_acc"] == b["test_acc"] and a["test_loss"] == b["test_loss"]
    assert a["final_train_loss"] == b["final_train_loss"]


def test_a_helper_killed_during_training_fails_the_run_resumably(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "cnntrain", "train", str(LENET), *RUN,
                             "training.threads=2", "--runs-dir", str(tmp_path)],
                            cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if line.startswith("epoch 1/3"):
            for pid in children(proc.pid):
                os.kill(pid, signal.SIGKILL)
            break
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 1, err
    assert "Traceback" not in err
    errors = [e for e in err.splitlines() if e.startswith("error:")]
    assert len(errors) == 1, err
    assert re.search(r"helper process 1 stopped while (taking|running) a chunk \(exit code -9\)", errors[0])
    assert f"continue with: cnntrain train --resume {tmp_path / 'lenet'}" in errors[0]
    summary = json.loads((tmp_path / "lenet" / "summary.json").read_text())
    assert summary["status"] == "failed" and "WorkerError" in summary["error"]
    resumed = cnntrain("train", "--resume", tmp_path / "lenet", "--json", "--no-plots",
                       cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["status"] == "completed"


FAULTS = textwrap.dedent("""
    import resource, sys
    import numpy as np
    sys.path.insert(0, {tests!r})
    from cnntrain.engine.malloc import keep_freed_memory
    from cnntrain.engine.model import build_model
    from test_engine import LENET
    if sys.argv[1] == "tuned":
        assert keep_freed_memory()
    model = build_model(LENET, (1, 28, 28), "float32", np.random.default_rng(0))
    x, y = np.random.default_rng(0).random((48, 1, 28, 28), dtype=np.float32), np.arange(48) % 10
    for _ in range(5):
        model.loss(x, y)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        model.loss(x, y)
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_memory_is_kept_for_the_next_step(tmp_path):
    """engine/malloc.py: with glibc tuned, a training step takes almost no new pages from
    the kernel once the first steps have run (measured: 16 page faults per step, against
    184 untuned, at batch 48)."""
    script = tmp_path / "faults.py"
    script.write_text(FAULTS.format(tests=os.path.dirname(__file__)))
    faults = {}
    for mode in ("tuned", "default"):
        out = subprocess.run([sys.executable, str(script), mode], capture_output=True, text=True,
                             env={k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")})
        assert out.returncode == 0, out.stderr
        faults[mode] = float(out.stdout)
    assert faults["tuned"] * 5 < faults["default"], faults


def test_helpers_get_the_same_malloc_settings():
    model = build_model(LENET_SPECS, (1, 28, 28), "float32", np.random.default_rng(0), workers=2)
    model.predict(np.zeros((64, 1, 28, 28), np.float32))
    with open(f"/proc/{model._helpers.procs[0].pid}/environ", "rb") as f:
        env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
    model.close()
    assert env[b"MALLOC_MMAP_THRESHOLD_"] == b"33554432"
    assert env[b"MALLOC_TRIM_THRESHOLD_"] == b"67108864"
    assert env[b"OPENBLAS_NUM_THREADS"] == b"1"
