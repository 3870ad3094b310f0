"""Activation cache: tiers, policies, exactness against the uncached path, and faults."""
import asyncio
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
import warnings

import pytest
import torch

import ds_autofreeze
from ds_autofreeze.cache import ActivationCache
from ds_autofreeze.config import CacheConfig

from conftest import ROOT, batches, ds_config, tiny_bert

ENTRY = (6, 4)  # (T, H) of synthetic entries
ENTRY_BYTES = 6 * 4 * 4


def value(i: int) -> torch.Tensor:
    return torch.arange(24, dtype=torch.float32).reshape(ENTRY) + 1000 * i


OPENED: list[ActivationCache] = []  # closed after each test, so no test leaves threads behind


@pytest.fixture(autouse=True)
def close_caches():
    yield
    while OPENED:
        OPENED.pop().close()


def new_cache(*args, **kwargs) -> ActivationCache:
    OPENED.append(ActivationCache(*args, **kwargs))
    return OPENED[-1]


def make_cache(tmp_path=None, **cfg) -> ActivationCache:
    cfg.setdefault("enabled", True)
    cache = new_cache(CacheConfig(**cfg), str(tmp_path) if tmp_path else None, num_examples=64,
                      data_fingerprint="data")
    cache.set_boundary(2, "weights")
    return cache


def fill(cache, indices):
    cache.put(indices, torch.stack([value(i) for i in indices]))
    cache.flush()


# ---------------------------------------------------------------- tiers and policies

def test_cache_ram_tier_respects_budget_and_serves_hits():
    cache = make_cache(ram_bytes=10 * ENTRY_BYTES, disk_bytes=0)
    fill(cache, list(range(20)))
    assert cache.ram_bytes_used == 10 * ENTRY_BYTES
    got = cache.get(list(range(20)))
    assert all(torch.equal(got[i], value(i)) for i in range(10)) and all(g is None for g in got[10:])
    assert (cache.stats.ram_hits, cache.stats.misses) == (10, 10)


def reshuffled_hit_rate(policy: str, fraction: float, epochs: int = 6, n: int = 64) -> float:
    cache = make_cache(ram_bytes=int(fraction * n) * ENTRY_BYTES, disk_bytes=0, policy=policy)
    g = torch.Generator().manual_seed(0)
    for epoch in range(epochs):
        for i in torch.randperm(n, generator=g).tolist():
            if cache.get([i])[0] is None:
                cache.put([i], value(i)[None])
    hits = cache.stats.ram_hits
    return hits / (n * (epochs - 1))  # epoch 0 only fills


def test_cache_pinned_beats_lru_under_reshuffled_epochs():
    pinned, lru = reshuffled_hit_rate("pinned", 0.5), reshuffled_hit_rate("lru", 0.5)
    assert pinned == pytest.approx(0.5, abs=0.02)  # a fixed half stays: every second access hits
    assert lru < pinned - 0.1


def test_cache_disk_tier_holds_what_ram_cannot(tmp_path):
    cache = make_cache(tmp_path, ram_bytes=4 * ENTRY_BYTES, prefetch_depth=0)
    fill(cache, list(range(16)))
    got = cache.get(list(range(16)))
    assert all(torch.equal(got[i], value(i)) for i in range(16))
    assert (cache.stats.ram_hits, cache.stats.disk_hits, cache.stats.misses) == (4, 12, 0)


def test_cache_disk_budget_then_recompute(tmp_path):
    cache = make_cache(tmp_path, ram_bytes=0, disk_bytes=5 * ENTRY_BYTES, prefetch_depth=0)
    fill(cache, list(range(8)))
    got = cache.get(list(range(8)))
    assert sum(g is not None for g in got) == 5 and cache.stats.misses == 3


def test_cache_prefetch_stages_the_planned_batches(tmp_path):
    cache = make_cache(tmp_path, ram_bytes=0, prefetch_depth=2)
    fill(cache, list(range(16)))
    order = [[3, 1], [7, 5], [2, 9], [11, 4]]
    cache.plan_epoch(order)
    for batch in order:
        deadline = time.time() + 10
        while not all(i in cache._staged for i in batch) and time.time() < deadline:
            time.sleep(0.01)
        got = cache.get(batch)
        assert all(torch.equal(g, value(i)) for g, i in zip(got, batch))
    assert cache.stats.disk_hits == 8 and cache.stats.sync_reads == 0


@pytest.mark.parametrize("boundary, weights", [(3, "weights3"), (2, "reloaded")])
def test_cache_prefetch_never_stages_an_entry_of_a_store_left_behind(tmp_path, monkeypatch, boundary, weights):
    """The boundary moves (or the frozen weights are reloaded at the same one) while the
    prefetcher reads an entry of the old store: that value must not be staged, or the next step
    would be fed hidden states the model no longer computes."""
    from ds_autofreeze import cache as cache_mod
    cache = make_cache(tmp_path, ram_bytes=0, prefetch_depth=1)
    fill(cache, [1])
    real_read = cache_mod._DiskStore.read
    reading, moved = threading.Event(), threading.Event()

    def read_then_wait(self, index):
        value = real_read(self, index)
        if threading.current_thread() is cache._threads[1]:
            reading.set()
            moved.wait(10)
        return value
    monkeypatch.setattr(cache_mod._DiskStore, "read", read_then_wait)
    cache.plan_epoch([[1]])
    assert reading.wait(10)
    cache.set_boundary(boundary, weights)
    moved.set()
    cache._prefetch_q.put(None)  # the prefetcher finishes the batch and returns
    cache._threads[1].join(10)
    assert not cache._staged and cache.get([1]) == [None]


def test_cache_half_precision_is_bit_exact_on_disk(tmp_path):
    cache = make_cache(tmp_path, ram_bytes=0, prefetch_depth=0)
    x = torch.randn(3, *ENTRY).to(torch.bfloat16)
    cache.put([0, 1, 2], x)
    cache.flush()
    got = cache.get([0, 1, 2])
    assert all(g.dtype == torch.bfloat16 and torch.equal(g, x[i]) for i, g in enumerate(got))


def test_cache_files_private_and_raw(tmp_path):
    root = tmp_path / "cache"
    cache = make_cache(root, ram_bytes=0, prefetch_depth=0)
    fill(cache, [5])
    assert stat.S_IMODE(os.stat(root).st_mode) == 0o700
    files = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]
    assert files and all(stat.S_IMODE(os.stat(f).st_mode) == 0o600 for f in files)
    raw = value(5).numpy().tobytes()
    assert any(open(f, "rb").read() == raw for f in files)  # the chunk is the tensor's bytes, nothing else
    source = open(os.path.join(ROOT, "ds_autofreeze", "cache.py")).read()
    assert "pickle" not in source.replace("No pickle", "") and "torch.load" not in source


def slow_chunk_writes(monkeypatch, seconds: float) -> threading.Event:
    """Every chunk file the Zarr store writes takes ``seconds`` more (as on a slow disk);
    the event is set once a write is under way."""
    from ds_autofreeze import cache as cache_mod
    real_set = cache_mod._PrivateStore._set
    writing = threading.Event()

    async def slow_set(self, key, value, exclusive=False):
        if key.startswith("c/"):
            writing.set()
            await asyncio.sleep(seconds)  # the write's I/O, not Zarr's event loop, is what is slow
        await real_set(self, key, value, exclusive=exclusive)
    monkeypatch.setattr(cache_mod._PrivateStore, "_set", slow_set)
    return writing


def cache_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("activation-cache-")}


def test_cache_close_flushes_then_ends_its_threads(tmp_path, monkeypatch):
    before = cache_threads()
    cache = make_cache(tmp_path, ram_bytes=4 * ENTRY_BYTES)
    assert cache_threads() - before == set(cache._threads)
    assert sorted(t.name for t in cache._threads) == ["activation-cache-prefetch", "activation-cache-writer"]
    slow_chunk_writes(monkeypatch, 0.02)
    cache.put(list(range(12)), torch.stack([value(i) for i in range(12)]))
    cache.plan_epoch([[0, 1], [5, 6]])
    assert cache._writes.unfinished_tasks > 0  # close() finds writes still queued
    cache.close()
    assert not any(t.is_alive() for t in cache._threads) and cache_threads() <= before
    cache.close()  # a second close does nothing
    cache.flush()
    got = cache.get(list(range(12)))  # RAM still serves; the rest is a miss
    assert all(torch.equal(got[i], value(i)) for i in range(4)) and all(g is None for g in got[4:])
    assert cache.get_previous([5]) == (0, [None]) and cache.manifest()["disk_entries"] == 12
    with pytest.raises(RuntimeError, match="after close"):
        cache.put([20], value(20)[None])
    with make_cache(tmp_path, ram_bytes=0, prefetch_depth=0) as reopened:  # nothing put before close was lost
        got = reopened.get(list(range(12)))
        assert all(torch.equal(got[i], value(i)) for i in range(12))
    assert not any(t.is_alive() for t in reopened._threads) and cache_threads() <= before


def test_cache_reads_do_not_wait_for_a_write_in_progress(tmp_path, monkeypatch):
    """A step reading stored entries (this boundary's and the previous one's) while the writer
    is in the middle of a slow chunk write gets them at once, not after the write."""
    cache = make_cache(tmp_path, ram_bytes=0, prefetch_depth=0)
    fill(cache, [1, 2])
    cache.set_boundary(3, "weights3")
    fill(cache, [1, 2])
    seconds = 2.0
    writing = slow_chunk_writes(monkeypatch, seconds)
    cache.put([3], value(3)[None])
    assert writing.wait(10)
    start = time.perf_counter()
    got, (previous, got_previous) = cache.get([1, 2]), cache.get_previous([1, 2])
    elapsed = time.perf_counter() - start
    assert elapsed < 0.3 * seconds, f"reads of stored entries waited {elapsed:.2f} s for a write"
    assert cache._writes.unfinished_tasks == 1  # the write was still under way
    assert previous == 2 and all(torch.equal(g, value(i)) for g, i in zip(got + got_previous, [1, 2, 1, 2]))
    cache.flush()
    assert torch.equal(cache.get([3])[0], value(3))


def test_cache_store_reused_only_for_same_data_and_weights(tmp_path):
    fill(make_cache(tmp_path, ram_bytes=0, prefetch_depth=0), [1, 2])
    again = make_cache(tmp_path, ram_bytes=0, prefetch_depth=0)
    assert all(g is not None for g in again.get([1, 2]))
    other = new_cache(CacheConfig(enabled=True, ram_bytes=0, prefetch_depth=0), str(tmp_path), 64, "data")
    other.set_boundary(2, "other-weights")
    assert other.get([1, 2]) == [None, None]


def test_cache_store_is_shared_by_ranks_and_survives_a_repack(tmp_path):
    """Two ranks write their shards into one directory; a re-packed single rank finds both."""
    ranks = []
    for rank, shard in ((0, [0, 2, 4]), (1, [1, 3, 5])):
        cache = new_cache(CacheConfig(enabled=True, ram_bytes=0, prefetch_depth=0), str(tmp_path), 64, "data",
                          writer=f"rank{rank}")
        cache.set_boundary(2, "weights")
        fill(cache, shard)
        ranks.append(cache)
    assert sorted(p.name for p in tmp_path.glob("*.manifest")) == ["b2-data-weights.rank0.manifest",
                                                                    "b2-data-weights.rank1.manifest"]
    repacked = make_cache(tmp_path, ram_bytes=0, prefetch_depth=0)  # writer rank0 again
    got = repacked.get(list(range(6)))
    assert all(torch.equal(got[i], value(i)) for i in range(6))
    # Dropping the store: each writer withdraws its manifest; the last one out removes the array.
    ranks[0]._disk.close(delete=True)
    assert (tmp_path / "b2-data-weights.zarr").exists()
    ranks[1]._disk.close(delete=True)
    repacked._disk.close(delete=True)
    assert not list(tmp_path.glob("b2-*"))


# ---------------------------------------------------------------- faults

def test_cache_corrupted_chunk_is_detected_and_recomputed(tmp_path):
    fill(make_cache(tmp_path, ram_bytes=0, prefetch_depth=0), [0, 1, 2])
    raw = value(1).numpy().tobytes()
    chunk = next(os.path.join(d, f) for d, _, fs in os.walk(tmp_path) for f in fs
                 if open(os.path.join(d, f), "rb").read() == raw)
    with open(chunk, "r+b") as f:
        f.seek(40)
        f.write(b"\xff\xfe")
    reader = make_cache(tmp_path, ram_bytes=0, prefetch_depth=0)
    with pytest.warns(RuntimeWarning, match="checksum"):
        got = reader.get([0, 1, 2])
    assert got[1] is None and torch.equal(got[0], value(0)) and torch.equal(got[2], value(2))
    assert reader.stats.corrupt == 1


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_cache_corrupted_compressed_chunk_is_recomputed_not_fatal(tmp_path, damage):
    """Entries stored without padding are compressed: damage may break the codec itself, which
    must count as one corrupt entry, not take the disk tier down."""
    x = torch.randn(3, 32, 8)
    cache = make_cache(tmp_path, ram_bytes=0, prefetch_depth=0)
    cache.put([0, 1, 2], x, lengths=[10, 32, 20])
    cache.flush()
    chunk = next(tmp_path.rglob("c/1/0/0"))
    data = chunk.read_bytes()
    chunk.write_bytes(data[:5] + bytes([data[5] ^ 0xFF]) + data[6:] if damage == "flip" else data[:len(data) // 2])
    reader = make_cache(tmp_path, ram_bytes=0, prefetch_depth=0)
    with pytest.warns(RuntimeWarning, match="checksum"):
        got = reader.get([0, 1, 2])
    assert got[1] is None and torch.equal(got[0], x[0, :10]) and torch.equal(got[2], x[2, :20])
    assert reader.stats.corrupt == 1 and reader._disk_store() is not None


def test_cache_sigkill_mid_write_never_yields_torn_entries(tmp_path):
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {ROOT!r}); sys.path.insert(0, {os.path.join(ROOT, 'tests')!r})
        from test_cache import make_cache, value
        cache = make_cache({str(tmp_path)!r}, ram_bytes=0)
        print("ready", flush=True)
        i = 0
        while True:
            cache.put([i % 64], value(i % 64)[None].expand(1, 6, 4).contiguous())
            i += 1
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.stdout.readline().strip() == "ready"
    manifest = next(tmp_path.glob("*.manifest"), None)
    deadline = time.time() + 60
    while (manifest is None or manifest.stat().st_size < 200) and time.time() < deadline:
        time.sleep(0.01)
        manifest = next(tmp_path.glob("*.manifest"), None)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    reader = make_cache(tmp_path, ram_bytes=0, prefetch_depth=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no entry listed in the manifest may be torn or corrupt
        got = reader.get(list(range(64)))
    present = [i for i, g in enumerate(got) if g is not None]
    assert present, "the writer should have completed some entries before the kill"
    assert all(torch.equal(got[i], value(i)) for i in present)


def test_cache_enospc_warns_once_and_degrades_to_recompute(tmp_path, monkeypatch):
    from ds_autofreeze import cache as cache_mod

    def full(self, index, value):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(cache_mod._DiskStore, "write", full)
    cache = make_cache(tmp_path, ram_bytes=2 * ENTRY_BYTES, prefetch_depth=0)
    with pytest.warns(RuntimeWarning, match="disk full.*No space left") as record:
        fill(cache, list(range(6)))
        fill(cache, list(range(6, 12)))
    assert len([w for w in record if "disk full" in str(w.message)]) == 1
    got = cache.get(list(range(12)))
    assert sum(g is not None for g in got) == 2  # the RAM tier still works; the rest is recomputed


# ---------------------------------------------------------------- exactness through the engine

FREEZES = {"total_steps": 40, "decider": {"name": "schedule", "schedule": [
    {"fraction": 0.1, "num_frozen_blocks": 1}, {"fraction": 0.5, "num_frozen_blocks": 3}]}}  # steps 4 and 20


def train_epochs(cache_dir=None, epochs=5, fault=None, data=None, **cache_cfg):
    model = tiny_bert(seed=0)
    engine, *_, af = ds_autofreeze.initialize(model=model, config=ds_config(1, FREEZES))
    if cache_dir is not None:
        cfg = CacheConfig(enabled=True, **{"prefetch_depth": 2, **cache_cfg})
        af.attach_cache(new_cache(cfg, str(cache_dir), num_examples=32, data_fingerprint="d"))
    data = data or batches(8, micro=4)
    torch.manual_seed(123)
    losses, grads = [], []
    g = torch.Generator().manual_seed(5)
    for epoch in range(epochs):
        order = torch.randperm(8, generator=g).tolist()  # reshuffled batches; example ids are fixed per row
        if af.cache is not None:
            af.cache.plan_epoch([list(range(4 * b, 4 * b + 4)) for b in order])
        for b in order:
            if fault is not None:
                fault(af, epoch, b)
            ids = torch.arange(4 * b, 4 * b + 4)
            loss = engine(**data[b], example_ids=ids).loss
            engine.backward(loss)
            grads.append(model.classifier.weight.grad.clone() if model.classifier.weight.grad is not None else None)
            engine.step()
            af.after_step()
            losses.append(loss.item())
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}, af


def assert_same_run(a, b):
    assert a[0] == b[0]  # losses, bitwise
    for name, p in a[1].items():
        assert torch.equal(p, b[1][name]), name


def test_cache_exact_against_uncached_path(tmp_path):
    plain = train_epochs()
    cached = train_epochs(tmp_path / "c", ram_bytes=10 ** 9)
    assert_same_run(plain, cached)
    stats = cached[2].cache.stats
    assert stats.ram_hits > 0 and stats.previous_hits > 0
    disk_only = train_epochs(tmp_path / "d", ram_bytes=0)
    assert_same_run(plain, disk_only)
    s = disk_only[2].cache.stats
    assert s.disk_hits > 0 and s.previous_hits > 0  # blocks 1..2 were fed from the boundary-1 store


def padded_batches(seq: int = 32) -> list[dict]:
    """batches() with each row cut to a random length: mostly padding, as short texts are."""
    data = batches(8, micro=4, seq=seq)
    g = torch.Generator().manual_seed(9)
    for b in data:
        for row, length in enumerate(torch.randint(3, seq + 1, (4,), generator=g).tolist()):
            b["input_ids"][row, length:] = 0
            b["attention_mask"][row] = torch.arange(seq) < length
    return data


def test_cache_drops_padding_and_stays_exact(tmp_path):
    data = padded_batches()
    plain = train_epochs(data=data)
    cached = train_epochs(tmp_path / "c", ram_bytes=10 ** 9, data=data)
    assert_same_run(plain, cached)  # padding rows come back as zeros: the loss never reads them
    disk_only = train_epochs(tmp_path / "d", ram_bytes=0, data=data)
    assert_same_run(plain, disk_only)
    assert disk_only[2].cache.stats.disk_hits > 0 and disk_only[2].cache.stats.previous_hits > 0
    # What is stored: each entry's unpadded rows (the hidden size of tiny_bert is 32, fp32).
    lengths = torch.cat([b["attention_mask"] for b in data]).sum(-1)
    assert cached[2].cache.ram_bytes_used == int(lengths.sum()) * 32 * 4 < 32 * 32 * 32 * 4
    chunks = [f.stat().st_size for f in (tmp_path / "d").rglob("c/*/0/0") if f.is_file()]
    assert len(chunks) == 32 and sum(chunks) < int(lengths.sum()) * 32 * 4 + 32 * 128  # values + codec overhead


def test_cache_entries_keep_only_their_length(tmp_path):
    cache = make_cache(tmp_path, ram_bytes=0, prefetch_depth=0)
    x = torch.randn(3, 128, 64).to(torch.bfloat16)
    cache.put([0, 1, 2], x, lengths=[5, 128, 40])
    cache.flush()
    got = cache.get([0, 1, 2])
    assert [g.shape[0] for g in got] == [5, 128, 40]
    assert all(torch.equal(g, x[i, :n]) for i, (g, n) in enumerate(zip(got, [5, 128, 40])))
    manifest = next(tmp_path.glob("*.manifest")).read_text().split()
    assert manifest[2::3] == ["5", "128", "40"]
    assert cache._disk_store().bytes_used == (5 + 128 + 40) * 64 * 2
    # On disk: the values plus a few bytes for the zeros past each length.
    sizes = {int(f.parent.parent.name): f.stat().st_size for f in tmp_path.rglob("c/*/0/0")}
    assert all(0.9 * n * 128 <= sizes[i] < n * 128 + 256 for i, n in enumerate([5, 128, 40]))
    # A store whose first batch is under 10% padding keeps raw chunks (they read faster cold).
    cache.set_boundary(3, "weights3")
    cache.put([0, 1, 2], x, lengths=[128, 120, 126])
    cache.flush()
    assert [g.shape[0] for g in cache.get([0, 1, 2])] == [128, 120, 126]
    assert not cache._disk_store().compressed and cache._disk_store().bytes_used == 3 * 128 * 64 * 2
    assert {f.stat().st_size for f in tmp_path.glob("b3-*/c/*/0/0")} == {128 * 64 * 2}


def test_cache_directory_deleted_mid_run_recomputes(tmp_path):
    import shutil
    plain = train_epochs()

    def delete(af, epoch, b):
        # The writer thread may be adding a chunk while the tree goes (as under a user's rm -rf).
        for _ in range(100):
            if epoch != 3 or not os.path.exists(tmp_path / "c"):
                break
            shutil.rmtree(tmp_path / "c", ignore_errors=True)
    with pytest.warns(RuntimeWarning, match="disk tier disabled"):
        faulty = train_epochs(tmp_path / "c", ram_bytes=0, fault=delete)
    assert_same_run(plain, faulty)
    assert faulty[2].cache.stats.misses > 0


def test_cache_disk_full_mid_run_gives_the_same_training(tmp_path, monkeypatch):
    from ds_autofreeze import cache as cache_mod
    plain = train_epochs()
    real_write = cache_mod._DiskStore.write
    written = []

    def write_until_full(self, index, value):
        if len(written) >= 10:
            raise OSError(28, "No space left on device")
        written.append(index)
        real_write(self, index, value)
    monkeypatch.setattr(cache_mod._DiskStore, "write", write_until_full)
    with pytest.warns(RuntimeWarning, match="No space left"):
        faulty = train_epochs(tmp_path / "c", ram_bytes=0)
    assert_same_run(plain, faulty)
    assert len(written) == 10 and faulty[2].cache.stats.disk_hits > 0


def test_cache_previous_boundary_kept_one_full_epoch(tmp_path):
    cache = make_cache(tmp_path, ram_bytes=0, prefetch_depth=0)
    fill(cache, [1, 2])
    cache.set_boundary(3, "weights3")  # mid-epoch move
    assert cache.get_previous([1, 2, 5])[0] == 2 and cache.get_previous([1])[1][0] is not None
    cache.plan_epoch([[1, 2]])  # the epoch after the move still needs the old entries
    assert cache.get_previous([1])[1][0] is not None
    cache.plan_epoch([[1, 2]])  # a whole epoch ran at boundary 3: the old store is deleted
    assert cache.get_previous([1]) == (0, [None])
    assert not list(tmp_path.glob("b2-*"))


def test_cache_checkpoint_restores_the_same_whether_the_cache_is_attached_before_or_after_loading(tmp_path):
    """A run resumed from a checkpoint continues with the cache it had (stores on disk, the previous
    boundary's entries, the epoch count since the move) whatever the order of load and attach."""
    data = batches(8, micro=4)
    moves = {"total_steps": 24, "decider": {"name": "schedule", "schedule": [  # steps 4, 12 and 20
        {"fraction": 4 / 24, "num_frozen_blocks": 1}, {"fraction": 0.5, "num_frozen_blocks": 2},
        {"fraction": 20 / 24, "num_frozen_blocks": 3}]}}

    def epoch(engine, af, order):
        losses = []
        af.cache.plan_epoch([list(range(4 * b, 4 * b + 4)) for b in order])
        for b in order:
            loss = engine(**data[b], example_ids=torch.arange(4 * b, 4 * b + 4)).loss
            engine.backward(loss)
            engine.step()
            af.after_step()
            losses.append(loss.item())
        return losses

    def fresh(cache_dir, attach_first, load=None):
        engine, *_, af = ds_autofreeze.initialize(model=tiny_bert(seed=0), config=ds_config(1, moves))
        cache = new_cache(CacheConfig(enabled=True, ram_bytes=0, prefetch_depth=2), str(cache_dir), num_examples=32,
                          data_fingerprint="d")
        if attach_first or load is None:
            af.attach_cache(cache)
        if load is not None:
            engine.load_checkpoint(load, tag="e2")
            if not attach_first:
                af.attach_cache(cache)
        return engine, af

    orders = [torch.randperm(8, generator=torch.Generator().manual_seed(e)).tolist() for e in range(3)]
    engine, af = fresh(tmp_path / "c", True)
    torch.manual_seed(123)
    for e in range(2):
        epoch(engine, af, orders[e])
    engine.save_checkpoint(str(tmp_path / "ck"), tag="e2")
    af.cache.flush()
    shutil.copytree(tmp_path / "c", tmp_path / "saved")  # the run goes on, and drops stores the checkpoint names
    rng = torch.get_rng_state()
    reference = epoch(engine, af, orders[2])
    af.close()
    runs = {}
    for attach_first in (True, False):
        shutil.copytree(tmp_path / "saved", tmp_path / f"resumed{attach_first}")
        engine, af = fresh(tmp_path / f"resumed{attach_first}", attach_first, load=str(tmp_path / "ck"))
        torch.set_rng_state(rng)
        stats = af.cache.stats
        runs[attach_first] = (epoch(engine, af, orders[2]), stats.disk_hits, stats.previous_hits)
        af.close()
    assert runs[True][0] == runs[False][0] == reference
    assert runs[True][1] == runs[False][1] > 0  # served from the stores the saved run wrote
    # Saved within the epoch after the move to 2 blocks: the boundary-1 store still feeds block 1
    # (and, after the move at step 20, blocks 1..2) instead of running from the embeddings.
    assert runs[True][2] == runs[False][2] > 0


def test_cache_exact_with_batches_padded_to_their_own_longest_row(tmp_path):
    """Dynamic padding: each batch is cut to its longest row, so a row's batch length changes from
    epoch to epoch; the frozen prefix runs at the canonical length, cached or not, and the two runs
    are the same bit for bit."""
    from ds_autofreeze.data import TokenizedDataset
    rows = padded_batches(seq=32)
    dataset = TokenizedDataset({k: torch.cat([b[k] for b in rows]) for k in rows[0]})
    dataset.trim_padding = True

    def run(cache_dir):
        engine, *_, af = ds_autofreeze.initialize(model=tiny_bert(seed=0), config=ds_config(1, FREEZES))
        af.pad_prefix_to(dataset.seq_len)
        if cache_dir is not None:
            af.attach_cache(new_cache(CacheConfig(enabled=True, prefetch_depth=2), str(cache_dir), num_examples=32,
                                      data_fingerprint="d"))
        g = torch.Generator().manual_seed(5)
        torch.manual_seed(123)
        losses, lengths = [], set()
        for epoch in range(5):
            order = torch.randperm(32, generator=g).tolist()  # rows meet other rows every epoch
            batches_ = [order[i:i + 4] for i in range(0, 32, 4)]
            if af.cache is not None:
                af.cache.plan_epoch(batches_)
            for ids in batches_:
                batch = dataset.batch(ids)
                lengths.add(batch["input_ids"].shape[-1])
                loss = engine(**batch, example_ids=torch.tensor(ids)).loss
                engine.backward(loss)
                engine.step()
                af.after_step()
                losses.append(loss.item())
        if af.cache is not None:
            # The store's rows hold the longest batch's entries whichever batch created it: the
            # previous boundary's entries feed the newly frozen blocks, none read back damaged.
            assert af.cache.stats.previous_hits > 0 and af.cache.stats.corrupt == 0
        af.close()
        return losses, lengths

    plain, lengths = run(None)
    cached, _ = run(tmp_path / "c")
    assert len(lengths) > 3 and max(lengths) <= 32  # batches really are cut to different lengths
    assert cached == plain
