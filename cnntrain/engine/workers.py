"""Helper processes that run chunks of a batch beside the main process.

Why processes and not threads: NumPy releases the GIL inside each operation but takes it
back between operations, and one chunk of LeNet is well over 100 operations. Two threads
each running chunks of 32 made 1.42x the images/s of one thread; two processes made
2.0x (2 cores, medians; the GIL hand-offs were the difference).

Memory shared with the helpers, none of it copied per step:
- the model's weights: Model.flat_params lives in a shared mapping (shared_array), so
  an SGD step in the main process is what the helpers compute with at the next chunk;
- per helper, one slot: the chunk's images and labels (written by the main process), and
  its logits, loss and gradients (written by the helper), laid out by `Slot`.

Protocol, over the helper's stdin and stdout: one JSON line to start (the layer specs and
the slot layout), then per chunk a fixed 9-byte request (op, count, denominator) and a
5-byte reply (status, length of an error message that follows). A helper exits when its
stdin closes, so it never outlives the main process, even one killed with SIGKILL. It
runs in its own session: a Ctrl-C at the terminal reaches the main process only, which
finishes its step with the helpers' help and saves.

The helpers run the very same code on the same shapes with one BLAS thread each, so a
chunk's gradients are the same bits wherever it runs (tested).
"""

import json
import mmap
import os
import struct
import subprocess
import sys
import tempfile

import numpy as np

from .errors import WorkerError
from .malloc import MALLOC_ENV

REQUEST = struct.Struct("<cii")   # op (b"T" train, b"P" predict), images, denominator
REPLY = struct.Struct("<ci")      # status (b"K" ok, b"E" error), bytes of message after


# The helper imports this very cnntrain from its file, whatever sys.path would find
# first (a source folder, another installed version), without changing sys.path.
_BOOT = """import importlib.util, os, sys
init = sys.argv[1]
spec = importlib.util.spec_from_file_location(
    "cnntrain", init, submodule_search_locations=[os.path.dirname(init)])
module = sys.modules["cnntrain"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
from cnntrain.engine.workers import serve
serve()
"""


def processes_supported():
    """Helpers need POSIX file-descriptor passing (not on Windows)."""
    return os.name == "posix"


def shared_array(count, dtype):
    """A zeroed 1-D array of `count` items in memory that helper processes can map: returns
    (array, fd). The fd is passed to the helpers; the memory is freed when all are gone."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("cnntrain")       # anonymous, never on a filesystem
    else:
        with tempfile.TemporaryFile() as f:   # already unlinked: nothing to clean up
            fd = os.dup(f.fileno())
    os.ftruncate(fd, max(1, count * np.dtype(dtype).itemsize))
    return _map(fd, count, dtype), fd


def _map(fd, count, dtype):
    """The shared memory behind fd as a 1-D array of `count` items (both sides use this)."""
    buf = mmap.mmap(fd, max(1, count * np.dtype(dtype).itemsize))
    return np.frombuffer(buf, dtype=dtype, count=count)


class Slot:
    """One helper's part of the scratch mapping: byte offsets of images (chunk, C, H, W),
    labels (chunk,) int64, logits (chunk, K), loss (1,) float64 and grads (P,), each
    64-byte aligned."""

    def __init__(self, chunk, input_shape, classes, n_params, dtype):
        self.chunk, self.input_shape, self.classes = chunk, tuple(input_shape), classes
        self.n_params, self.dtype = n_params, np.dtype(dtype)
        sizes = [("images", chunk * int(np.prod(input_shape)), self.dtype),
                 ("labels", chunk, np.dtype(np.int64)),
                 ("logits", chunk * classes, self.dtype),
                 ("loss", 1, np.dtype(np.float64)),
                 ("grads", n_params, self.dtype)]
        self.layout, offset = {}, 0
        for name, count, dt in sizes:
            self.layout[name] = (offset, count, dt)
            offset += -(-count * dt.itemsize // 64) * 64
        self.nbytes = offset

    def views(self, buf, index):
        """name -> array in the slot `index` of the scratch bytes `buf`, shaped for use."""
        base = index * self.nbytes
        out = {name: np.frombuffer(buf, dtype=dt, count=count, offset=base + off)
               for name, (off, count, dt) in self.layout.items()}
        out["images"] = out["images"].reshape(self.chunk, *self.input_shape)
        out["logits"] = out["logits"].reshape(self.chunk, self.classes)
        return out

    def spec(self):
        return {"chunk": self.chunk, "input_shape": list(self.input_shape),
                "classes": self.classes, "n_params": self.n_params, "dtype": self.dtype.name}


class Helpers:
    """`count` helper processes for a model built from `layer_specs`, whose flat weights
    are the shared array behind `params_fd`. Started at once; stopped by close()."""

    def __init__(self, count, layer_specs, input_shape, classes, params_fd, n_params, dtype,
                 chunk):
        self.slot = Slot(chunk, input_shape, classes, n_params, dtype)
        scratch, self._scratch_fd = shared_array(self.slot.nbytes * count, np.uint8)
        self.slots = [self.slot.views(scratch, i) for i in range(count)]
        self.procs = []
        try:
            for i in range(count):
                self._start(i, layer_specs, params_fd)
            for i in range(count):
                self._reply(i, "starting")
        except BaseException:
            self.close()
            raise

    def _start(self, index, layer_specs, params_fd):
        import cnntrain

        env = {**MALLOC_ENV, **os.environ}  # the user's own malloc settings win
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = "1"  # one BLAS thread per process, as the main process's chunks use
        proc = subprocess.Popen(
            [sys.executable, "-c", _BOOT, os.path.abspath(cnntrain.__file__)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            pass_fds=(params_fd, self._scratch_fd), env=env, start_new_session=True)
        self.procs.append(proc)
        hello = {"layers": layer_specs, "params_fd": params_fd, "scratch_fd": self._scratch_fd,
                 "slot": self.slot.spec(), "index": index}
        self._send(index, json.dumps(hello).encode() + b"\n", "starting")

    def submit(self, index, op, images, labels, denominator):
        """Hand helper `index` a chunk: op b"T" (forward + backward) or b"P" (forward)."""
        n = len(images)
        slot = self.slots[index]
        slot["images"][:n] = images
        if labels is not None:
            slot["labels"][:n] = labels
        self._send(index, REQUEST.pack(op, n, denominator), "taking a chunk")

    def result(self, index):
        """Wait for helper `index`'s chunk; returns its slot (logits, loss, grads views)."""
        self._reply(index, "running a chunk")
        return self.slots[index]

    def _send(self, index, data, doing):
        try:
            stdin = self.procs[index].stdin
            stdin.write(data)
            stdin.flush()
        except OSError:
            self._died(index, doing)

    def _reply(self, index, doing):
        out = self.procs[index].stdout
        head = out.read(REPLY.size)
        if len(head) < REPLY.size:
            self._died(index, doing)
        status, length = REPLY.unpack(head)
        message = out.read(length).decode(errors="replace") if length else ""
        if status != b"K":
            raise WorkerError(f"helper process {index + 1} failed {doing}: {message}")

    def _died(self, index, doing):
        proc = self.procs[index]
        try:
            proc.wait(timeout=5)
            err = proc.stderr.read().decode(errors="replace").strip().splitlines()
        except (subprocess.TimeoutExpired, OSError, ValueError):
            err = []
        last = f": {err[-1]}" if err else ""
        raise WorkerError(f"helper process {index + 1} stopped while {doing} "
                          f"(exit code {proc.returncode}){last}")

    def peak_rss_mib(self):
        """Each helper's peak resident memory so far in MiB (Linux's VmHWM); [] elsewhere."""
        peaks = []
        for proc in self.procs:
            try:
                with open(f"/proc/{proc.pid}/status") as f:
                    kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
            except (OSError, StopIteration, ValueError):
                return []
            peaks.append(kib / 1024)
        return peaks

    def close(self):
        """Stop the helpers: closing stdin ends each one's loop."""
        for proc in self.procs:
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                try:
                    stream.close()
                except OSError:
                    pass
        for proc in self.procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs = []
        if self._scratch_fd is not None:
            os.close(self._scratch_fd)
            self._scratch_fd = None


def serve():
    """A helper's main loop (run in the helper process)."""
    from .loss import softmax_cross_entropy
    from .model import adopt, build_model

    inp = sys.stdin.buffer
    # The replies get a private copy of stdout; fd 1 itself now points at stderr, so that
    # nothing printed by accident can ever be taken for a reply.
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)

    def reply(status, message=""):
        data = message.encode()
        out.write(REPLY.pack(status, len(data)) + data)
        out.flush()

    hello = json.loads(inp.readline())
    s = hello["slot"]
    slot = Slot(s["chunk"], s["input_shape"], s["classes"], s["n_params"], s["dtype"])
    try:
        model = build_model(hello["layers"], slot.input_shape, slot.dtype, workers=1)
        if model.flat_params.size != slot.n_params:
            raise ValueError(f"the model has {model.flat_params.size} weights, the main "
                             f"process {slot.n_params}")
        # Point the layers at the main process's weights and at this slot's gradients.
        model.flat_params = adopt([layer.params for layer in model.layers],
                                  _map(hello["params_fd"], slot.n_params, slot.dtype))
        scratch = mmap.mmap(hello["scratch_fd"], 0)
        views = slot.views(scratch, hello["index"])
        model.flat_grads = adopt([layer.grads for layer in model.layers], views["grads"])
    except Exception as e:  # reported to the main process, which raises WorkerError
        reply(b"E", f"{type(e).__name__}: {e}")
        return
    reply(b"K")
    while True:
        head = inp.read(REQUEST.size)
        if len(head) < REQUEST.size:
            return  # the main process closed our stdin: done
        op, n, denominator = REQUEST.unpack(head)
        try:
            images = views["images"][:n]
            if op == b"T":
                logits = model.forward(images, train=True)
                loss, dlogits, _ = softmax_cross_entropy(logits, views["labels"][:n],
                                                         denominator=denominator)
                model.backward(dlogits)
                views["loss"][0] = loss
            else:
                logits = model.forward(images, train=False)
            views["logits"][:n] = logits
        except Exception as e:
            reply(b"E", f"{type(e).__name__}: {e}")
            continue
        reply(b"K")
