"""Checkpoints as .npz: atomic to write, pickle-free to read, PyTorch names.

An archive holds one array per parameter under PyTorch's names and layouts
(`conv1.weight` (F, C, kH, kW), `ff5.weight` (out, in), ...), so a PyTorch module with the
same attribute names loads them as its state_dict. Entries starting with `_` are not
parameters: `_metadata` is a JSON string (config, epoch, step, metrics, format version),
and `_optimizer.<param>` holds SGD momentum buffers.
"""

import json
import os
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FORMAT_VERSION = 1
METADATA_KEY = "_metadata"
OPTIMIZER_PREFIX = "_optimizer."


class CheckpointError(Exception):
    """A file that is not a readable cnntrain checkpoint; the message names it."""


@dataclass
class Checkpoint:
    params: dict
    metadata: dict
    optimizer: dict = field(default_factory=dict)


def _umask():
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


_UMASK = _umask()


def write_atomic(path, write):
    """Call write(file) on a temporary file beside `path`, fsync it, then rename it over
    `path`: a crash at any moment leaves the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; give what open() would give
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    # the rename itself is durable only once the directory entry is on disk
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_checkpoint(path, params, metadata, optimizer=None):
    arrays = {name: np.asarray(a) for name, a in params.items()}
    for name, v in (optimizer or {}).items():
        arrays[OPTIMIZER_PREFIX + name] = np.asarray(v)
    meta = {"format": FORMAT_VERSION, **metadata}
    arrays[METADATA_KEY] = np.array(json.dumps(meta))  # a unicode array: no pickle needed
    write_atomic(path, lambda f: np.savez(f, **arrays))


def load_checkpoint(path):
    """Read a checkpoint without ever unpickling; every defect is a CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: not a cnntrain checkpoint (not an .npz archive)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except ValueError as e:  # numpy refuses object (pickled) arrays when allow_pickle=False
        raise CheckpointError(f"{path}: refused to load: {e}") from None
    except (OSError, zipfile.BadZipFile, EOFError) as e:
        raise CheckpointError(f"{path}: unreadable .npz archive: {e}") from None
    if METADATA_KEY not in arrays:
        raise CheckpointError(f"{path}: not a cnntrain checkpoint (no {METADATA_KEY} entry)")
    try:
        metadata = json.loads(str(arrays.pop(METADATA_KEY)))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: {METADATA_KEY} is not valid JSON ({e})") from None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT_VERSION:
        found = metadata.get("format") if isinstance(metadata, dict) else metadata
        raise CheckpointError(f"{path}: checkpoint format {found!r}, expected {FORMAT_VERSION}")
    if not isinstance(metadata.get("config"), dict):
        raise CheckpointError(f"{path}: the checkpoint carries no config")
    optimizer = {name[len(OPTIMIZER_PREFIX):]: a for name, a in arrays.items()
                 if name.startswith(OPTIMIZER_PREFIX)}
    params = {name: a for name, a in arrays.items() if not name.startswith("_")}
    return Checkpoint(params, metadata, optimizer)
