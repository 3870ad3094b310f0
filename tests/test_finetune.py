"""launch/finetune.py as a user runs it: a subprocess, a tiny model on disk, data files on disk."""
import json
import os
import subprocess
import sys

import pytest

# tiny_model_dir and data_files are conftest fixtures.
from conftest import ROOT, free_port, script_env, write_config, write_csv


def run(args, launcher=None, timeout=300):
    env = script_env(PYTHONPATH=ROOT)
    cmd = (launcher or [sys.executable]) + [os.path.join(ROOT, "launch", "finetune.py"), "--no_progress", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)


AUTOFREEZE = {"decider": {"name": "gradnorm", "interval_steps": 2}}
CACHED = {**AUTOFREEZE, "cache": {"enabled": True, "ram_bytes": 4096, "prefetch_depth": 2}}  # RAM for a few, disk for the rest


def test_finetune_end_to_end_writes_results_and_checkpoints(tmp_path, tiny_model_dir, data_files):
    config = write_config(tmp_path / "af.json", AUTOFREEZE)
    out = tmp_path / "out"
    proc = run(["--deepspeed_config", config, "--model_name_or_path", tiny_model_dir, "--train_file", data_files[0],
                "--validation_file", data_files[1], "--num_train_epochs", "2", "--max_seq_length", "16",
                "--output_dir", str(out)])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    results = json.loads((out / "all_results.json").read_text())
    for key in ("eval_accuracy", "train_loss", "train_runtime", "freeze_events", "final_frozen_blocks"):
        assert key in results
    assert results["train_steps"] == 24 and len(results["epochs"]) == 2
    assert results["final_frozen_blocks"] == (results["freeze_events"][-1]["frozen_blocks"]
                                              if results["freeze_events"] else 0)
    assert all({"step", "frozen_blocks"} <= set(e) for e in results["freeze_events"])
    # Every gradnorm decision (every 2 steps) is reported with what it saw; the freezes are among them.
    assert [d["step"] for d in results["decisions"]] == list(range(2, 25, 2))
    assert all(len(d["block_norms"]) == 4 for d in results["decisions"])
    moves = [(d["step"], d["boundary"]) for d in results["decisions"][1:] if d.get("boundary", 0) > 0]
    assert [(e["step"], e["frozen_blocks"]) for e in results["freeze_events"]] == \
        [m for i, m in enumerate(moves) if i == 0 or m[1] > moves[i - 1][1]]
    assert "summary:" in proc.stdout and "epoch 2: eval_accuracy" in proc.stdout
    assert sum(line.startswith("[autofreeze] step") for line in proc.stdout.splitlines()) == \
        len(results["freeze_events"])
    assert (out / "checkpoints" / "epoch1" / "autofreeze_state.json").exists()
    assert (out / "checkpoints" / "latest").read_text().strip() == "epoch2"


def test_finetune_summary_says_why_nothing_froze(tmp_path, tiny_model_dir, data_files):
    """A user who turned AutoFreeze on and got no freeze reads that, and why, in the summary."""
    never_done = {"decider": {"name": "snr", "interval_steps": 4, "z": 1e-3}}
    proc = run(["--deepspeed_config", write_config(tmp_path / "af.json", never_done), "--model_name_or_path",
                tiny_model_dir, "--train_file", data_files[0], "--validation_file", data_files[1],
                "--num_train_epochs", "1", "--max_seq_length", "16", "--output_dir", str(tmp_path / "out")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "freeze_events        none (snr: no decision found block 0 safe to freeze" in proc.stdout, proc.stdout


def test_finetune_cache_gives_the_same_run(tmp_path, tiny_model_dir, data_files):
    common = ["--model_name_or_path", tiny_model_dir, "--train_file", data_files[0], "--validation_file",
              data_files[1], "--max_seq_length", "16", "--num_train_epochs", "3"]
    results = {}
    for name, af in (("plain", AUTOFREEZE), ("cached", CACHED)):
        proc = run(common + ["--deepspeed_config", write_config(tmp_path / f"{name}.json", af),
                             "--output_dir", str(tmp_path / name)])
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[name] = json.loads((tmp_path / name / "all_results.json").read_text())
    plain, cached = results["plain"], results["cached"]
    assert cached["train_loss"] == plain["train_loss"] and cached["eval_accuracy"] == plain["eval_accuracy"]
    assert cached["freeze_events"][0]["step"] < 12  # froze in epoch 1, so epochs 2-3 could hit
    stats = cached["cache"]["stats"]
    assert stats["ram_hits"] > 0 and stats["disk_hits"] > 0 and stats["hit_rate"] > 0.3
    assert list((tmp_path / "cached" / "activation_cache").glob("*.rank0.manifest"))


def test_finetune_resume_continues_exactly(tmp_path, tiny_model_dir, data_files):
    config = write_config(tmp_path / "af.json", CACHED)
    common = ["--deepspeed_config", config, "--model_name_or_path", tiny_model_dir, "--train_file", data_files[0],
              "--validation_file", data_files[1], "--max_seq_length", "16"]
    full = run(common + ["--num_train_epochs", "3", "--output_dir", str(tmp_path / "full")])
    assert full.returncode == 0, full.stderr[-3000:]
    # As if the run had died after epoch 1: resume from that epoch's checkpoint in a new directory.
    resumed = run(common + ["--num_train_epochs", "3", "--output_dir", str(tmp_path / "part"),
                            "--resume_from_checkpoint", str(tmp_path / "full" / "checkpoints" / "epoch1")])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    a = json.loads((tmp_path / "full" / "all_results.json").read_text())
    b = json.loads((tmp_path / "part" / "all_results.json").read_text())
    assert a["eval_accuracy"] == b["eval_accuracy"] and a["train_loss"] == b["train_loss"]
    assert [(e["step"], e["frozen_blocks"]) for e in a["freeze_events"]] == \
        [(e["step"], e["frozen_blocks"]) for e in b["freeze_events"]]
    assert [h["eval_accuracy"] for h in a["epochs"]] == [h["eval_accuracy"] for h in b["epochs"]]


def test_finetune_two_ranks_with_deepspeed_launcher(tmp_path, tiny_model_dir, data_files):
    """Two ranks, each caching the shard it trains on (its examples stay the same across epochs)."""
    config = write_config(tmp_path / "static.json", {"decider": {"name": "static", "num_frozen_blocks": 2},
                                                      "cache": CACHED["cache"]})
    proc = run(["--deepspeed_config", config, "--model_name_or_path", tiny_model_dir, "--train_file", data_files[0],
                "--validation_file", data_files[1], "--num_train_epochs", "2", "--max_seq_length", "16",
                "--output_dir", str(tmp_path / "out")],
               launcher=["deepspeed", "--num_gpus", "2", "--master_port", str(free_port())])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "all_results.json").read_text())
    assert results["world_size"] == 2 and results["train_steps"] == 12  # 96 examples / (8 x 2 ranks) x 2 epochs
    # Frozen from step 0: epoch 1 fills, epoch 2 finds rank 0's whole shard (48 examples) cached.
    stats = results["cache"]["stats"]
    assert stats["misses"] == 48 and stats["ram_hits"] + stats["disk_hits"] == 48
    # One store for both ranks, one manifest each.
    names = os.listdir(tmp_path / "out" / "activation_cache")
    assert sum(n.endswith(".zarr") for n in names) == 1
    assert sorted(n.split(".")[-2] for n in names if n.endswith(".manifest")) == ["rank0", "rank1"]


def test_finetune_repacks_from_two_ranks_to_one_without_losing_an_example(tmp_path, tiny_model_dir, data_files):
    """Efficiency packing on 2 ranks: at the second freeze (step 8, mid-epoch 2) one worker is
    cheaper, so the run checkpoints and the real launcher continues it on 1 rank. Every example of
    every epoch is trained exactly once; boundary, optimizer and the shared cache carry over.
    (The first freeze, at step 1, comes before any step was timed: no plan, no move.)"""
    from ds_autofreeze.data import epoch_steps
    af = {"decider": {"name": "schedule", "schedule": [{"fraction": 0.08, "num_frozen_blocks": 2},
                                                       {"fraction": 0.67, "num_frozen_blocks": 3}]},
          "cache": CACHED["cache"], "packing": {"mode": "efficiency", "restart_seconds": 0}}
    out = tmp_path / "out"
    proc = run(["--deepspeed_config", write_config(tmp_path / "pack.json", af), "--model_name_or_path",
                tiny_model_dir, "--train_file", data_files[0], "--validation_file", data_files[1],
                "--num_train_epochs", "2", "--max_seq_length", "16", "--output_dir", str(out), "--trace_examples"],
               launcher=["deepspeed", "--num_gpus", "2", "--master_port", str(free_port())])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[packing] step 8: 2 -> 1 worker(s), micro-batch 16 x 1 accumulation" in proc.stdout
    results = json.loads((out / "all_results.json").read_text())
    assert results["world_size"] == 1 and results["train_steps"] == 12  # 96 / 16 per step x 2 epochs
    assert [(e["step"], e["frozen_blocks"]) for e in results["freeze_events"]] == [(1, 2), (8, 3)]
    assert [(r["step"], r["from_workers"], r["workers"]) for r in results["repacks"]] == [(8, 2, 1)]
    assert [h["world_size"] for h in results["epochs"]] == [2, 1]
    packed = json.loads((out / "checkpoints" / "repack-step8" / "ds_config.json").read_text())
    assert (packed["train_micro_batch_size_per_gpu"], packed["gradient_accumulation_steps"]) == (16, 1)

    traces = {f.name: [json.loads(line) for line in f.read_text().splitlines()] for f in (out / "trace").iterdir()}
    assert sorted(traces) == ["world1_rank0.jsonl", "world2_rank0.jsonl", "world2_rank1.jsonl"]
    trained = [t for lines in traces.values() for t in lines]
    for epoch in (0, 1):  # epoch 2 finishes with the global batches it started with on 2 ranks
        seen = [i for t in trained if t["epoch"] == epoch for i in t["ids"]]
        expected = [i for step in epoch_steps(96, 42, epoch, 2, 8) for i in step]
        assert sorted(seen) == sorted(expected) and len(set(seen)) == len(seen) == 96, epoch
    assert sorted(t["step"] for t in trained) == sorted([*range(1, 9), *range(1, 13)])
    # The single rank's misses at boundary 3 start from the boundary-2 store both ranks filled in
    # epoch 1 (steps 2-6: step 1 ran before the first freeze), rank 1's shard included.
    written = {i for t in trained if t["epoch"] == 0 and t["step"] >= 2 for i in t["ids"]}
    after = [i for t in traces["world1_rank0.jsonl"] for i in t["ids"]]
    rank1 = {i for t in traces["world2_rank1.jsonl"] for i in t["ids"]}
    stats = results["cache"]["stats"]
    assert stats["previous_hits"] == len(written & set(after)) and written & set(after) & rank1


def _bad_input_cases(tmp, model_dir, train, dev):
    bad_label = write_csv(tmp / "bad_label.csv", 10, 3, label_fn=lambda y: "positive" if y else "negative")
    good = write_config(tmp / "good.json", AUTOFREEZE)
    typo = write_config(tmp / "typo.json", {"decider": {"name": "gradnorm", "interval_stpes": 2}})
    base = ["--model_name_or_path", model_dir, "--deepspeed_config", good]
    return {
        "missing file": (base + ["--train_file", str(tmp / "nope.csv"), "--validation_file", dev],
                         "data file not found: " + str(tmp / "nope.csv")),
        "missing column": (base + ["--train_file", train, "--validation_file", dev, "--text_column_names", "review"],
                           "column(s) 'review' not found"),
        "label not a class": (base + ["--train_file", bad_label, "--validation_file", dev],
                              "label column 'label' must hold integer class ids, got 'negative'"),
        "unknown config key": (["--model_name_or_path", model_dir, "--deepspeed_config", typo, "--train_file", train,
                                "--validation_file", dev], "autofreeze.decider.gradnorm.interval_stpes"),
        "missing model": (["--model_name_or_path", str(tmp / "no_model"), "--deepspeed_config", good, "--train_file",
                           train, "--validation_file", dev], "no such model directory"),
    }


@pytest.mark.parametrize("case", ["missing file", "missing column", "label not a class", "unknown config key",
                                  "missing model"])
def test_finetune_bad_input_fails_with_one_line(case, tmp_path, tiny_model_dir, data_files):
    args, expected = _bad_input_cases(tmp_path, tiny_model_dir, *data_files)[case]
    proc = run(args + ["--output_dir", str(tmp_path / "out")])
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "epoch" not in proc.stdout  # nothing trained
    assert not (tmp_path / "out").exists()


def test_finetune_lora_with_the_cache_gives_the_same_run(tmp_path, tiny_model_dir, data_files):
    common = ["--model_name_or_path", tiny_model_dir, "--train_file", data_files[0], "--validation_file",
              data_files[1], "--max_seq_length", "16", "--num_train_epochs", "2", "--use_peft", "--lora_r", "4",
              "--save_strategy", "no"]
    results = {}
    for name, af in (("plain", AUTOFREEZE), ("cached", CACHED)):
        proc = run(common + ["--deepspeed_config", write_config(tmp_path / f"{name}.json", af),
                             "--output_dir", str(tmp_path / name)])
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert ", LoRA)" in proc.stdout
        results[name] = json.loads((tmp_path / name / "all_results.json").read_text())
    plain, cached = results["plain"], results["cached"]
    assert plain["freeze_events"] and plain["trainable_params"] < 10_000  # adapters and the head only
    assert cached["train_loss"] == plain["train_loss"] and cached["eval_accuracy"] == plain["eval_accuracy"]
    assert not (tmp_path / "plain" / "checkpoints").exists()
