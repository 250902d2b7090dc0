"""A content-addressed tensor cache on a node's local disk, shared by the trials on that node.

Trials of a study often repeat work exactly: a coreset-ratio study runs the same frozen
backbone over the same images once per ratio. :class:`TensorCache` stores ``dict[str, Tensor]``
entries under a key that is a hash of everything the entry depends on (:func:`make_key`), so a
later trial (in the same process or another one on the node) that would compute the same
tensors reads them instead.

Layout and guarantees:

- One safetensors file per entry, in a shard folder named by the key's first two hex digits
  (``<dir>/ab/abcdef....safetensors``) so no folder grows huge.
- Writes are atomic (a temporary file in the shard, then ``os.replace``): readers and other
  writers, in any process on the node, see a whole entry or none.
- The total size is bounded: after every write the least recently used entries (by modification
  time, which a hit refreshes) are deleted until the total is at most ``max_bytes``. A write
  follows a miss, i.e. a computation far costlier than the directory scan this takes.
- Entries carry a CRC-32 of their data and their key: a truncated or corrupt file reads as a
  miss and is deleted, never as wrong tensors or an exception. Files deleted under a reader (by
  another process evicting) are misses too.
- A tensor comes back with the shape, dtype, strides and storage offset it was stored with, so a
  computation that reads it runs exactly as it would on the original (some kernels round
  differently on other memory layouts). Overlapping layouts (expanded tensors) come back
  contiguous.

:func:`use_cache` makes a cache the active one for a block of code (a context variable, so it is
per thread and per asyncio task); code deep inside a detector asks :func:`active_cache`. Nothing
is cached unless a caller opts in.

Local disk rather than Ray's object store: entries outlive a Ray session (a re-run or the next
study on the node starts warm), the page cache serves hot entries at memory speed anyway, and
``models`` stays free of Ray.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import os
import threading
import time
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor

__all__ = ["TensorCache", "active_cache", "make_key", "use_cache"]

_SUFFIX = ".safetensors"
_FORMAT = "anomaly-sweep/tensor-cache/1"
# A temporary file this old was left by a writer that died; younger ones may be in flight.
_STALE_TEMP_S = 3600.0


# ----------------------------------------------------------------------------- keys


def make_key(*parts: object) -> str:
    """A sha256 hex digest of ``parts``: tensors (dtype, shape and bytes), arrays, ``str``,
    ``bytes``, ``int``, ``float``, ``bool``, ``None`` and (nested) tuples or lists of them.

    Every part is fed with a type tag and its length, so different sequences of parts never
    feed the same bytes (``("ab", "c")`` and ``("a", "bc")`` give different keys). A tensor's
    bytes are read on the CPU in logical (contiguous) order: its strides and device are not
    part of its key, add them as parts when they matter.
    """
    digest = hashlib.sha256()
    for part in parts:
        _feed(digest, part)
    return digest.hexdigest()


def _feed(digest, part: object) -> None:
    def tagged(tag: bytes, payload: bytes | memoryview) -> None:
        digest.update(tag + len(payload).to_bytes(8, "little"))
        digest.update(payload)

    # bool before int: True is an int.
    if part is None:
        digest.update(b"N")
    elif isinstance(part, bool):
        digest.update(b"B1" if part else b"B0")
    elif isinstance(part, int):
        tagged(b"I", str(part).encode())
    elif isinstance(part, float):
        tagged(b"F", part.hex().encode())
    elif isinstance(part, str):
        tagged(b"S", part.encode())
    elif isinstance(part, bytes | bytearray | memoryview):
        tagged(b"Y", bytes(part))
    elif isinstance(part, Tensor):
        tensor = part.detach()
        tagged(b"T", f"{tensor.dtype}{tuple(tensor.shape)}".encode())
        tagged(b"D", _tensor_bytes(tensor))
    elif isinstance(part, np.ndarray):
        tagged(b"A", f"{part.dtype.str}{part.shape}".encode())
        tagged(b"D", memoryview(np.ascontiguousarray(part)).cast("B"))
    elif isinstance(part, tuple | list):
        digest.update(b"L" + len(part).to_bytes(8, "little"))
        for item in part:
            _feed(digest, item)
    else:
        raise TypeError(f"make_key: cannot hash a {type(part).__name__} ({part!r:.80})")


def _tensor_bytes(tensor: Tensor) -> memoryview:
    """The bytes of ``tensor`` in logical order, without a copy when it is a contiguous CPU one."""
    tensor = tensor.cpu().contiguous()
    if tensor.numel() == 0:
        return memoryview(b"")
    # Through uint8, because NumPy has no bfloat16 (and no float8).
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


# ----------------------------------------------------------------------------- the cache


_COUNTERS = (
    "hits",
    "misses",
    "writes",
    "evictions",
    "corrupt",  # entries that failed to read back (truncated, bad checksum) and were deleted
    "too_large",  # entries not written because alone they exceed max_bytes
    "bytes_read",
    "bytes_written",
)


class TensorCache:
    """A bounded, content-addressed store of ``dict[str, Tensor]`` entries in ``directory``.

    Args:
        directory: a folder on the node's local disk (created if missing). Several processes
            may use the same folder at once.
        max_bytes: bound on the total size of the entries; least recently used ones are evicted
            past it.
    """

    def __init__(self, directory: str | Path, max_bytes: int) -> None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
            raise ValueError(f"TensorCache: max_bytes must be a positive int, got {max_bytes!r}")
        self.directory = Path(directory).expanduser()
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ValueError(
                f"TensorCache: cannot create the cache directory {str(self.directory)!r}: {error}"
            ) from error
        self.max_bytes = max_bytes
        self._stats = dict.fromkeys(_COUNTERS, 0)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"TensorCache({str(self.directory)!r}, max_bytes={self.max_bytes})"

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def path(self, key: str) -> Path:
        """Where the entry for ``key`` lives."""
        if len(key) < 3 or not all(c in "0123456789abcdef" for c in key):
            raise ValueError(f"TensorCache: a key is a lowercase hex digest, got {key!r}")
        return self.directory / key[:2] / f"{key}{_SUFFIX}"

    def stats(self) -> dict[str, int]:
        """This object's counters (this process's use; the directory is shared): ``hits``,
        ``misses``, ``writes``, ``evictions``, ``corrupt`` (entries that failed to read back and
        were deleted), ``too_large`` (entries not written: alone they exceed ``max_bytes``),
        ``bytes_read`` and ``bytes_written``."""
        with self._lock:
            return dict(self._stats)

    def _count(self, **increments: int) -> None:
        with self._lock:
            for name, value in increments.items():
                self._stats[name] += value

    # ------------------------------------------------------------------------- read

    def get(self, key: str, device: torch.device | str | None = None) -> dict[str, Tensor] | None:
        """The entry stored under ``key`` (on ``device``, the CPU by default), or None."""
        path = self.path(key)
        try:
            blob = path.read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            self._count(misses=1)
            return None
        try:
            tensors = _decode(blob, key, torch.device(device or "cpu"))
        except _CorruptEntry:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            self._count(misses=1, corrupt=1)
            return None
        # A hit makes the entry the most recently used. It may be gone already (evicted by
        # another process after we read it): the tensors are still good.
        with contextlib.suppress(FileNotFoundError):
            now = time.time_ns()
            os.utime(path, ns=(now, now))
        self._count(hits=1, bytes_read=len(blob))
        return tensors

    # ------------------------------------------------------------------------- write

    def put(self, key: str, tensors: Mapping[str, Tensor]) -> bool:
        """Store ``tensors`` under ``key`` (replacing any entry there), then evict past the bound.

        Returns whether the entry was written: one larger than ``max_bytes`` on its own is not.
        """
        path = self.path(key)
        blob = _encode(tensors, key)
        if len(blob) > self.max_bytes:
            self._count(too_large=1)
            return False
        path.parent.mkdir(exist_ok=True)
        # Unique per process and thread, and a dot-name the scan skips.
        temp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            temp.write_bytes(blob)
            now = time.time_ns()
            os.utime(temp, ns=(now, now))
            os.replace(temp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()
            raise
        self._count(writes=1, bytes_written=len(blob))
        self._evict()
        return True

    def size_bytes(self) -> int:
        """Total size of the entries now in the directory (all processes')."""
        return sum(size for _, size, _ in self._entries())

    def _entries(self) -> list[tuple[int, int, Path]]:
        """``(last use in ns, size, path)`` of every entry; removes stale temporary files."""
        entries = []
        now = time.time()
        with contextlib.suppress(FileNotFoundError), os.scandir(self.directory) as shards:
            shard_paths = [s.path for s in shards if len(s.name) == 2 and s.is_dir()]
        for shard in shard_paths:
            try:
                files = list(os.scandir(shard))
            except FileNotFoundError:
                continue
            for entry in files:
                try:
                    stat = entry.stat()
                except FileNotFoundError:  # evicted or replaced by another process
                    continue
                if entry.name.endswith(_SUFFIX) and not entry.name.startswith("."):
                    entries.append((stat.st_mtime_ns, stat.st_size, Path(entry.path)))
                elif entry.name.endswith(".tmp") and now - stat.st_mtime > _STALE_TEMP_S:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)
        return entries

    def _evict(self) -> None:
        entries = sorted(self._entries())
        total = sum(size for _, size, _ in entries)
        evicted = 0
        for _, size, path in entries:
            if total <= self.max_bytes:
                break
            # Another process evicting at the same time may have removed it first.
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                evicted += 1
            total -= size
        if evicted:
            self._count(evictions=evicted)


# ----------------------------------------------------------------------------- file format


class _CorruptEntry(Exception):
    pass


def _encode(tensors: Mapping[str, Tensor], key: str) -> bytes:
    contiguous, layouts = {}, {}
    checksum = 0
    for name in sorted(tensors):
        tensor = tensors[name].detach()
        layouts[name] = [list(tensor.stride()), tensor.storage_offset()]
        tensor = tensor.cpu().contiguous()
        contiguous[name] = tensor
        checksum = zlib.crc32(_tensor_bytes(tensor), checksum)
    metadata = {
        "format": _FORMAT,
        "key": key,
        "crc32": str(checksum),
        "layouts": json.dumps(layouts),
    }
    return save_safetensors(contiguous, metadata=metadata)


def _decode(blob: bytes, key: str, device: torch.device) -> dict[str, Tensor]:
    try:
        header_size = int.from_bytes(blob[:8], "little")
        metadata = json.loads(blob[8 : 8 + header_size])["__metadata__"]
        if metadata["format"] != _FORMAT or metadata["key"] != key:
            raise _CorruptEntry("not this entry")
        layouts = json.loads(metadata["layouts"])
        tensors = load_safetensors(blob)
    except (SafetensorError, ValueError, KeyError, TypeError, UnicodeDecodeError) as error:
        raise _CorruptEntry(str(error)) from error
    checksum = 0
    for name in sorted(tensors):
        checksum = zlib.crc32(_tensor_bytes(tensors[name]), checksum)
    if str(checksum) != metadata["crc32"] or set(layouts) != set(tensors):
        raise _CorruptEntry("checksum mismatch")
    return {name: _with_layout(tensors[name], *layouts[name], device) for name in tensors}


def _with_layout(data: Tensor, stride: list[int], offset: int, device: torch.device) -> Tensor:
    """``data`` (contiguous, on the CPU) copied into a tensor with the given strides and storage
    offset on ``device``."""
    shape = data.shape
    if offset == 0 and tuple(stride) == data.stride():
        return data.to(device)  # the common case: it was contiguous; no second copy
    if data.numel() == 0 or not _non_overlapping(shape, stride):
        return data.to(device)
    extent = offset + 1 + sum((size - 1) * step for size, step in zip(shape, stride, strict=True))
    out = torch.empty(extent, dtype=data.dtype, device=device).as_strided(shape, stride, offset)
    return out.copy_(data)


def _non_overlapping(shape: torch.Size, stride: list[int]) -> bool:
    """Whether no two elements of a tensor with this shape and stride share memory."""
    dims = sorted((step, size) for size, step in zip(shape, stride, strict=True) if size > 1)
    span = 1
    for step, size in dims:
        if step < span:
            return False
        span = step * size
    return True


# ----------------------------------------------------------------------------- the active cache

_ACTIVE: contextvars.ContextVar[TensorCache | None] = contextvars.ContextVar(
    "anomaly_sweep_active_tensor_cache", default=None
)


@contextlib.contextmanager
def use_cache(cache: TensorCache | None) -> Iterator[TensorCache | None]:
    """Make ``cache`` the active cache inside the block (None turns caching off in it)."""
    token = _ACTIVE.set(cache)
    try:
        yield cache
    finally:
        _ACTIVE.reset(token)


def active_cache() -> TensorCache | None:
    """The cache set by the innermost :func:`use_cache` around this call, if any."""
    return _ACTIVE.get()
