"""Activation cache: the frozen prefix's output per training example, so later epochs skip it.

Once blocks 0..k-1 are frozen (eval mode, no dropout), the hidden states entering block k are
a pure function of the example: key (example index, boundary k) -> tensor (T, H).

Tiers, looked up in order:
- RAM: a byte budget; policy ``pinned`` (admitted entries stay, the rest live on disk only) or
  ``lru`` (least recently used is dropped from RAM).
- Disk: one Zarr v3 array per boundary, shape (N, T, H), one example per chunk, raw bytes
  (bf16/fp16 as an int16 view: bit-exact). Every entry is written behind to disk by a thread,
  so eviction from RAM costs nothing and a restarted run finds the cache filled. A background
  thread prefetches the next batches of the known epoch order from disk. Ranks sharing the
  directory share the array (each writes its own shard, with its own manifest), so a run
  re-packed onto fewer or more ranks keeps every entry.
- Padding: where the model's head never reads padding positions, ``put`` is given each row's
  unpadded length L and stores only the first L rows: in RAM an (L, H) tensor; on disk the
  chunk's rows past L are zeros, under a Blosc-LZ4 codec (level 1, no shuffle) when the first
  batch stored at the boundary is at least 10% padding: it stores the zeros in a few bytes and
  the values verbatim (activations do not compress). ``get`` returns what was stored; the
  caller pads.
- Past both budgets, or on any disk error: a miss, and the engine recomputes.

Threads: the writer and the prefetcher, ended by ``close()`` (or leaving ``with ActivationCache(...)``),
which writes what is queued first. Reads take no lock: the writer writes a chunk lock-free and
holds its store's lock only to publish the entry (the manifest line), so a training step's read
never waits for a disk write.

Safety: an entry counts only once its manifest line (index + CRC32 of the bytes) is written,
after the chunk itself (Zarr writes chunks to a temp file and renames). Reads verify the CRC,
so torn or corrupted chunks are recomputed, never fed to the model. A full disk (ENOSPC) stops
writes but keeps serving what is stored; a vanished directory or another I/O error disables the
disk tier. Each says so in one warning. The directory is 0700 and every file 0600.
No pickle anywhere: chunks are raw arrays, the manifest is text.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import queue
import shutil
import threading
import time
import warnings
import zlib
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec
from zarr.storage import LocalStore

from .config import CacheConfig, CachePolicy

_COMPRESS_PADDING = 0.1  # share of padding in a store's first batch from which its chunks are compressed
# Storage dtype per tensor dtype; half types travel as int16 bit patterns (numpy has no bf16).
_STORAGE = {torch.float32: (np.float32, None), torch.float64: (np.float64, None),
            torch.bfloat16: (np.int16, torch.int16), torch.float16: (np.int16, torch.int16)}


def crc32_of(tensors: Sequence[torch.Tensor]) -> str:
    """CRC32 over the tensors' bytes (half types by bit pattern): names what a store was built from."""
    crc = 0
    for t in tensors:
        data = t.detach().cpu().contiguous()
        view = _STORAGE.get(data.dtype, (None, None))[1]
        crc = zlib.crc32((data.view(view) if view is not None else data).numpy().tobytes(), crc)
    return f"{crc:08x}"


def row_keys(example_ids: Sequence[int], rows_per_example: int) -> list[int]:
    """Cache keys of the rows the examples enter the blocks as: row r of example i (multiple
    choice: choice r) is entry i * rows_per_example + r."""
    return [i * rows_per_example + r for i in example_ids for r in range(rows_per_example)]


class _PrivateStore(LocalStore):
    """LocalStore whose files are readable by their owner only."""

    async def _set(self, key: str, value, exclusive: bool = False) -> None:
        await super()._set(key, value, exclusive=exclusive)
        os.chmod(self.root / key, 0o600)


@dataclass
class CacheStats:
    ram_hits: int = 0
    disk_hits: int = 0
    misses: int = 0
    previous_hits: int = 0  # served from the previous boundary's store, then advanced
    corrupt: int = 0
    dropped_writes: int = 0
    sync_reads: int = 0  # disk entries read by get() itself because the prefetcher had not staged them
    stall_seconds: float = 0.0  # time get() spent on those reads

    @property
    def hit_rate(self) -> float:
        total = self.ram_hits + self.disk_hits + self.misses
        return (self.ram_hits + self.disk_hits) / total if total else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "hit_rate": self.hit_rate}


class _DiskStore:
    """One boundary's Zarr array, shared by every rank that caches into the same directory, plus
    one append-only manifest per writer (``<index> <crc32> <rows>`` lines). Ranks write disjoint
    examples (their shards), so they never write the same chunk; a re-packed run reopens the
    store and finds what every former rank wrote.

    One thread writes, any may read. Readers take no lock: an entry is in ``complete`` only once
    its chunk is whole on disk (renamed into place), and a listed chunk is not rewritten."""

    def __init__(self, root: Path, name: str, writer: str, shape: Optional[tuple[int, ...]] = None,
                 dtype: Optional[torch.dtype] = None, compressed: bool = False):
        """Reopen the store ``name`` under root if a run left one, else create it (needs shape, dtype;
        ``compressed``: chunks under a codec that stores the zeros past an entry's rows in a few bytes)."""
        self.root, self.name = root, name
        self.path = root / f"{name}.zarr"
        self.manifest_path = root / f"{name}.{writer}.manifest"
        with _locked(root / f"{name}.lock"):  # ranks may open the same new store at once
            if (self.path / "zarr.json").exists():
                self.array = zarr.open_array(store=_PrivateStore(self.path), mode="r+")
                dtype = getattr(torch, self.array.attrs["torch_dtype"])
            elif shape is None:
                raise FileNotFoundError(self.path)
            else:
                for stale in root.glob(f"{name}.*.manifest"):  # they described an array that is gone
                    stale.unlink()
                # Zeros past each entry's rows compress away, values stay verbatim. Zarr shards of row
                # blocks stored as little but read 2-4x slower cold (one file read per block).
                codec = BloscCodec(cname="lz4", clevel=1, shuffle="noshuffle") if compressed else None
                self.array = zarr.create_array(store=_PrivateStore(self.path), shape=shape, chunks=(1, *shape[1:]),
                                               dtype=_STORAGE[dtype][0], compressors=codec, filters=None,
                                               fill_value=0, overwrite=True,
                                               attributes={"torch_dtype": str(dtype).split(".")[-1]})
            self._manifest = open(os.open(self.manifest_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "a")
        self.row_bytes = int(np.prod(self.array.shape[2:])) * np.dtype(_STORAGE[dtype][0]).itemsize
        self.compressed = bool(self.array.compressors)
        self.complete: dict[int, tuple[int, int]] = {}
        self._own: set[int] = set()
        for manifest in root.glob(f"{name}.*.manifest"):
            entries = self._read_manifest(manifest)
            self.complete.update(entries)
            if manifest == self.manifest_path:
                self._own = set(entries)
        self.dtype = dtype
        self.view_dtype = _STORAGE[dtype][1]
        self.bytes_used = sum(self.stored_bytes(self.complete[i][1]) for i in self._own)  # the budget is per rank
        self.closed = False
        self._lock = threading.Lock()  # the manifest file and ``closed``; never held while chunk data moves

    def _read_manifest(self, path: Path) -> dict[int, tuple[int, int]]:
        """index -> (crc32, rows stored) per ``<index> <crc32> <rows>`` line."""
        complete = {}
        rows = self.array.shape[1]
        for line in path.read_text().splitlines():
            parts = line.split()
            # A line cut short by a crash (no newline yet, or a missing field) is ignored.
            if len(parts) == 3 and all(p.isdigit() for p in parts) and 0 < int(parts[2]) <= rows:
                complete[int(parts[0])] = (int(parts[1]), int(parts[2]))
        return complete

    def stored_bytes(self, rows: int) -> int:
        """Disk bytes of an entry of ``rows`` rows: only those where the zeros past them compress."""
        return (rows if self.compressed else self.array.shape[1]) * self.row_bytes

    def write(self, index: int, value: np.ndarray) -> None:
        """Store ``value`` (L, H) as the first L rows of entry ``index``; a store closed meanwhile
        does not list it."""
        crc = zlib.crc32(value.tobytes())
        self.array[index, :len(value)] = value  # no lock: readers never touch an unlisted chunk
        # The manifest line goes last: an entry without one (a crash mid-write) is never read.
        with self._lock:
            if self.closed:
                return
            self._manifest.write(f"{index} {crc} {len(value)}\n")
            self._manifest.flush()
            self.complete[index] = (crc, len(value))
        self._own.add(index)
        self.bytes_used += self.stored_bytes(len(value))

    def read(self, index: int) -> Optional[torch.Tensor]:
        """The entry (its stored rows), or None if it is absent; raises _CorruptEntry if its bytes
        fail the checksum or the codec."""
        entry = self.complete.get(index)
        if entry is None:
            return None
        crc, rows = entry
        try:
            value = np.ascontiguousarray(self.array[index, :rows])
        except (RuntimeError, ValueError):  # a damaged compressed chunk fails in the codec
            value = None
        if value is None or zlib.crc32(value.tobytes()) != crc:
            if not self.manifest_path.exists():  # zarr reads a vanished chunk as fill values
                raise FileNotFoundError(f"cache directory {self.path.parent} is gone")
            self.complete.pop(index, None)
            raise _CorruptEntry(index)
        tensor = torch.from_numpy(value)
        return tensor.view(self.dtype) if self.view_dtype is not None else tensor

    def close(self, delete: bool) -> None:
        """With ``delete``: withdraw this writer's entries; the last writer out removes the array.
        Closing twice is harmless."""
        with self._lock:  # a write under way then lists nothing
            self.closed = True
            self._manifest.close()
        if delete:
            with _locked(self.root / f"{self.name}.lock"):
                self.manifest_path.unlink(missing_ok=True)
                if not any(self.root.glob(f"{self.name}.*.manifest")):
                    shutil.rmtree(self.path, ignore_errors=True)
                    # Nobody creates a store being dropped (the boundary has moved past it).
                    (self.root / f"{self.name}.lock").unlink(missing_ok=True)


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock between processes (flock on a 0600 file next to the store)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


class _CorruptEntry(Exception):
    pass


class ActivationCache:
    """Per-rank cache of the hidden states entering block ``boundary`` for each training example.

    Its two threads (disk writer, prefetcher) run until ``close()``; ``with ActivationCache(...) as
    cache:`` closes on exit. ``put``, ``set_boundary``, ``plan_epoch`` and ``close`` belong to one
    thread, the training loop's."""

    def __init__(self, config: CacheConfig, disk_dir: Optional[str], num_examples: int, data_fingerprint: str,
                 writer: str = "rank0"):
        """``disk_dir`` may be shared by all ranks (each names itself ``writer``): their entries land
        in one store per boundary, so a run re-packed onto other ranks keeps them."""
        self.config = config
        self.writer = writer
        self.num_examples = num_examples
        self.data_fingerprint = data_fingerprint
        self.boundary = 0
        self.store_name: Optional[str] = None  # names data + frozen weights: reused only on a match
        self.stats = CacheStats()
        self._ram: OrderedDict[int, torch.Tensor] = OrderedDict()
        self._ram_used = 0
        self._disk: Optional[_DiskStore] = None
        self._previous: Optional[tuple[int, _DiskStore]] = None
        self._epochs_since_move = 0
        self._root: Optional[Path] = None
        if disk_dir is not None and config.disk_bytes > 0:
            self._root = Path(disk_dir)
            self._root.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.chmod(self._root, 0o700)
        self._disk_lock = threading.Lock()  # which stores are open (_disk, _previous, _root); held for no chunk I/O
        self._writes_stopped = False
        self._closed = False
        self._warned: set[str] = set()
        self._writes: queue.Queue = queue.Queue(maxsize=1024)
        self._order: list[list[int]] = []
        self._cursor = 0
        self._staged: dict[int, torch.Tensor] = {}
        self._staged_lock = threading.Lock()
        self._prefetch_q: queue.Queue = queue.Queue()
        # Daemons: a cache never closed does not keep the interpreter from exiting (its queued writes are lost).
        self._threads = tuple(threading.Thread(target=target, name=f"activation-cache-{name}", daemon=True)
                              for target, name in ((self._write_loop, "writer"), (self._prefetch_loop, "prefetch")))
        for thread in self._threads:
            thread.start()

    def close(self) -> None:
        """Write every queued entry to disk, then end the writer and prefetcher threads (joined).
        A second call does nothing. Afterwards ``get`` serves the RAM tier only (everything else is
        a miss, ``get_previous`` finds nothing), ``put`` raises RuntimeError, and the disk stores
        stay on disk for the next cache over the same directory."""
        if self._closed:
            return
        self.flush()
        for requests in (self._writes, self._prefetch_q):
            requests.put(None)  # each thread's last request: it returns
        for thread in self._threads:
            thread.join()
        self._closed = True
        with self._staged_lock:
            self._staged.clear()
        with self._disk_lock:
            stores = [self._disk] + ([self._previous[1]] if self._previous else [])
        for store in stores:  # kept referenced: manifest() still describes them
            if store is not None:
                store.close(delete=False)

    def __enter__(self) -> "ActivationCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ boundary and epochs
    def set_boundary(self, boundary: int, weights_fingerprint: str) -> None:
        """The frozen prefix grew (or, at the same boundary, its weights were reloaded). The old
        boundary's disk store is kept until every example has been seen at the new one, to feed
        the newly frozen blocks once instead of the whole prefix."""
        name = self._store_name(boundary, weights_fingerprint)
        if name == self.store_name:
            return
        self.flush()
        moved = boundary != self.boundary
        if moved:
            self._drop_previous()
            self._epochs_since_move = 0
        with self._disk_lock:
            disk, self._disk = self._disk, None
            if moved and disk is not None:
                self._previous = (self.boundary, disk)
            self.boundary = boundary
            self.store_name = name
            self._ram, self._ram_used = OrderedDict(), 0
        if not moved and disk is not None:
            disk.close(delete=False)
        with self._staged_lock:
            self._staged.clear()

    def _store_name(self, boundary: int, weights_fingerprint: str) -> str:
        return f"b{boundary}-{self.data_fingerprint}-{weights_fingerprint}"

    def restore(self, manifest: dict, previous_weights_fingerprint: Optional[str]) -> None:
        """Continue where a checkpointed run left off (``manifest()`` of that run, same boundary):
        its previous boundary's store, if still on disk, feeds the newly frozen blocks again."""
        self._epochs_since_move = manifest.get("epochs_since_move", 0)
        previous = manifest.get("previous")
        if previous is None or previous_weights_fingerprint is None or self._root is None or self._previous:
            return
        name = self._store_name(previous["boundary"], previous_weights_fingerprint)
        if name == previous["store"] and (self._root / f"{name}.zarr" / "zarr.json").exists():
            with self._disk_lock:
                self._previous = (previous["boundary"], _DiskStore(self._root, name, self.writer))

    def plan_epoch(self, batches: Sequence[Sequence[int]]) -> None:
        """The example order of the coming epoch, batch by batch, for prefetching."""
        self._order, self._cursor = [list(b) for b in batches], 0
        with self._staged_lock:
            self._staged.clear()
        self._epochs_since_move += 1
        if self._epochs_since_move >= 2:  # a whole epoch ran at the new boundary: all of it is stored
            self._drop_previous()
        for j in range(min(self.config.prefetch_depth, len(self._order))):
            self._request_prefetch(self._order[j])

    def _drop_previous(self) -> None:
        with self._disk_lock:
            previous, self._previous = self._previous, None
        if previous is not None:
            previous[1].close(delete=True)  # outside the lock: removing a store's files takes a while

    # ------------------------------------------------------------------ lookups
    def get(self, indices: Sequence[int]) -> list[Optional[torch.Tensor]]:
        """Entries at the current boundary (None for a miss), in the order asked; each as ``put``
        stored it ((L, H) where it was given a length)."""
        out = [self._lookup(i) for i in indices]
        self._advance_prefetch()
        return out

    def get_previous(self, indices: Sequence[int]) -> tuple[int, list[Optional[torch.Tensor]]]:
        """Entries at the previous boundary, to run only the newly frozen blocks from: (boundary, entries)."""
        previous = None if self._closed else self._previous
        if previous is None:
            return 0, [None] * len(indices)
        out = [self._read_disk(previous[1], i) for i in indices]
        self.stats.previous_hits += sum(v is not None for v in out)
        return previous[0], out

    def _lookup(self, index: int) -> Optional[torch.Tensor]:
        value = self._ram.get(index)
        if value is not None:
            if self.config.policy == CachePolicy.lru:
                self._ram.move_to_end(index)
            self.stats.ram_hits += 1
            return value
        with self._staged_lock:
            value = self._staged.pop(index, None)
        if value is None:
            start = time.perf_counter()
            disk = self._disk_store()
            value = self._read_disk(disk, index) if disk is not None else None
            self.stats.stall_seconds += time.perf_counter() - start
            self.stats.sync_reads += value is not None
        if value is None:
            self.stats.misses += 1
            return None
        self.stats.disk_hits += 1
        self._admit(index, value)
        return value

    def _read_disk(self, disk: _DiskStore, index: int) -> Optional[torch.Tensor]:
        try:
            return disk.read(index)
        except _CorruptEntry:
            self.stats.corrupt += 1
            self._warn_once("corrupt", f"activation cache: entry {index} is damaged (checksum or codec); recomputing "
                                       "(further corrupt entries are counted, not reported)")
        except Exception as err:  # a vanished directory, a truncated file: recompute, never crash
            if not disk.closed:  # else the store was dropped during the read: a miss, the disk is fine
                self._disk_failed(err)
        return None

    # ------------------------------------------------------------------ inserts
    def put(self, indices: Sequence[int], hidden: torch.Tensor, lengths: Optional[Sequence[int]] = None,
            width: Optional[int] = None) -> None:
        """Store hidden states (B, T, H) entering block ``boundary`` for these examples; with
        ``lengths``, only each row's first ``lengths[row]`` positions (the rest is padding the
        model never reads). ``width`` is the longest an entry can be (the model's sequence length,
        default T): batches padded to their own longest row have T of their own, the store's rows
        must hold any of them. Raises RuntimeError after ``close()``."""
        if self._closed:
            raise RuntimeError("ActivationCache.put after close(): the cache stores nothing any more")
        hidden = hidden.detach().to("cpu")
        width = max(width or 0, hidden.shape[1])
        # Decides the disk layout when this batch creates the boundary's store: compressed chunks
        # read ~40% slower cold with 3% padding (IMDb at 128 tokens) and faster with 46% (at 512).
        compress = lengths is not None and sum(lengths) <= (1 - _COMPRESS_PADDING) * len(lengths) * width
        for row, index in enumerate(indices):
            value = hidden[row, :lengths[row]].clone() if lengths is not None else hidden[row].clone()
            self._admit(index, value)
            if self._root is not None and not self._writes_stopped:
                try:
                    self._writes.put_nowait((self.boundary, index, value, (width, *hidden.shape[2:]), compress))
                except queue.Full:  # never block the training step on I/O
                    self.stats.dropped_writes += 1

    def _admit(self, index: int, value: torch.Tensor) -> None:
        if index in self._ram:
            return
        size = value.numel() * value.element_size()
        if self.config.policy == CachePolicy.lru:
            while self._ram and self._ram_used + size > self.config.ram_bytes:
                _, old = self._ram.popitem(last=False)
                self._ram_used -= old.numel() * old.element_size()
        if self._ram_used + size <= self.config.ram_bytes:
            self._ram[index] = value
            self._ram_used += size

    @property
    def ram_bytes_used(self) -> int:
        return self._ram_used

    # ------------------------------------------------------------------ disk store and threads
    def _disk_store(self, create: Optional[tuple[tuple[int, ...], torch.dtype, bool]] = None) -> Optional[_DiskStore]:
        """This boundary's store: open if a run left it (same data and weights), else create it
        when there is something to write (``create``: an entry's full shape, dtype, compressed).
        None after ``close()``."""
        if self._closed:
            return None
        disk = self._disk
        if disk is not None:  # the common case takes no lock
            return disk
        with self._disk_lock:
            if self._disk is None and self._root is not None and self.store_name is not None:
                exists = (self._root / f"{self.store_name}.zarr" / "zarr.json").exists()
                if exists:
                    self._disk = _DiskStore(self._root, self.store_name, self.writer)
                elif create is not None:
                    shape, dtype, compressed = create
                    self._disk = _DiskStore(self._root, self.store_name, self.writer, (self.num_examples, *shape),
                                            dtype, compressed)
            return self._disk

    def _write_loop(self) -> None:
        while (item := self._writes.get()) is not None:
            boundary, index, value, shape, compressed = item
            try:
                if boundary != self.boundary:
                    continue  # the boundary moved on: this entry is no longer wanted
                disk = self._disk_store(create=(shape, value.dtype, compressed))
                if disk is None or index in disk.complete:
                    continue
                if disk.bytes_used + disk.stored_bytes(len(value)) > self.config.disk_bytes:
                    continue
                storage = value.view(disk.view_dtype) if disk.view_dtype is not None else value
                disk.write(index, storage.numpy())
            except OSError as err:
                if err.errno != errno.ENOSPC:
                    self._disk_failed(err)
                    continue
                # A full disk keeps what it has: entries already written are still served.
                self._writes_stopped = True
                self._warn_once("full", f"activation cache: disk full ({err}); no more entries are written, "
                                        "the ones on disk are still used, the rest is recomputed")
            except Exception as err:
                self._disk_failed(err)
            finally:
                self._writes.task_done()
        self._writes.task_done()  # close()'s stop request, so that a later flush() returns

    def _prefetch_loop(self) -> None:
        while (batch := self._prefetch_q.get()) is not None:
            disk = self._disk_store()
            for index in batch if disk is not None else ():
                if index in self._ram or index not in disk.complete:
                    continue
                value = self._read_disk(disk, index)
                # Checked under the lock set_boundary clears the staging area under, after it names
                # the new store: a value of a store left behind (boundary moved, weights reloaded) is dropped.
                with self._staged_lock:
                    if value is not None and disk.name == self.store_name:
                        self._staged[index] = value

    def _advance_prefetch(self) -> None:
        self._cursor += 1
        ahead = self._cursor + self.config.prefetch_depth - 1
        if self.config.prefetch_depth and ahead < len(self._order):
            self._request_prefetch(self._order[ahead])

    def _request_prefetch(self, batch: list[int]) -> None:
        if not self._closed:  # no thread serves requests after close()
            self._prefetch_q.put(batch)

    def flush(self) -> None:
        """Wait until every queued write has reached the disk store."""
        self._writes.join()

    # ------------------------------------------------------------------ failures
    def _disk_failed(self, err: Exception) -> None:
        self._warn_once("disk", f"activation cache: disk tier disabled ({type(err).__name__}: {err}); "
                                "outputs not in RAM are recomputed")
        with self._disk_lock:
            self._root = None
            stores = [self._disk] + ([self._previous[1]] if self._previous else [])
            self._disk, self._previous = None, None
        for store in stores:
            if store is not None:
                try:
                    store.close(delete=False)
                except OSError:
                    pass

    def _warn_once(self, kind: str, message: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            warnings.warn(message, RuntimeWarning, stacklevel=3)

    def manifest(self) -> dict:
        """What a checkpoint records: the store in use and how full it is."""
        previous = self._previous
        return {"boundary": self.boundary, "store": self.store_name,
                "previous": {"boundary": previous[0], "store": previous[1].name} if previous else None,
                "epochs_since_move": self._epochs_since_move,
                "disk_entries": len(self._disk.complete) if self._disk else 0,
                "ram_entries": len(self._ram), "stats": self.stats.as_dict()}
