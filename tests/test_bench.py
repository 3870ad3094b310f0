"""The benches' own machinery (bench/ is scripts, not the package)."""
import json
import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

from compare import run_command, write_config  # noqa: E402
from trainer import TWIN_ARGS, twin_config  # noqa: E402  (bench/trainer.py)

# A stand-in for launch/finetune.py: counts its runs and writes all_results.json into the output dir.
SCRIPT = ("import json, os, sys; out = sys.argv[sys.argv.index('--output_dir') + 1]; "
          "n = os.path.join(out, 'runs'); k = int(open(n).read()) + 1 if os.path.exists(n) else 1; "
          "open(n, 'w').write(str(k)); json.dump({'runs': k}, open(os.path.join(out, 'all_results.json'), 'w'))")


def test_reuse_matches_a_finished_run_by_its_config_content_not_its_path(tmp_path):
    out = tmp_path / "run"

    def run(config: dict, where: str) -> dict:
        (tmp_path / where).mkdir(exist_ok=True)
        path = tmp_path / where / "c.json"
        path.write_text(json.dumps(config))
        cmd = [sys.executable, "-c", SCRIPT, "--deepspeed_config", str(path), "--output_dir", str(out)]
        return run_command("t", cmd, str(out), reuse=True)

    assert run({"lr": 1}, "tmp1")["runs"] == 1
    assert run({"lr": 1}, "tmp2")["runs"] == 1  # same config written elsewhere: the finished run, read back
    assert run({"lr": 2}, "tmp2")["runs"] == 2  # another config: run again


def test_trainer_twin_trains_exactly_as_the_launcher(tmp_path):
    """bench/trainer_twin.py (the Trainer path given the launcher's batches, dropout stream and
    parameter groups) against launch/finetune.py --pad_to_max_length, packaged MiniLM and reviews, the
    shipped rule with the cache: every statistic at every decision, the freezes, the accuracy and the
    loss are the launcher's. Leaving any one of the three differences in makes it fail."""
    from conftest import ROOT, script_env
    launcher_config = json.load(open(os.path.join(ROOT, "configs", "autofreeze_cache.json")))
    launcher_config["train_micro_batch_size_per_gpu"] = 16
    common = ["--max_train_samples", "128", "--max_eval_samples", "40", "--max_seq_length", "32",
              "--num_train_epochs", "2", "--seed", "3", "--save_strategy", "no", "--no_progress"]
    results = []
    for name, script, path, extra in [
            ("launcher", "launch/finetune.py", write_config(launcher_config, str(tmp_path), "launcher"),
             ["--pad_to_max_length"]),
            ("twin", "bench/trainer_twin.py", twin_config(str(tmp_path)),
             [*TWIN_ARGS, "--per_device_train_batch_size", "16", "--warmup_steps", "1"])]:
        out = tmp_path / name
        proc = subprocess.run([sys.executable, os.path.join(ROOT, script), "--deepspeed_config", path,
                               "--output_dir", str(out), *common, *extra],
                              capture_output=True, text=True, env=script_env(), cwd=ROOT, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        results.append(json.loads((out / "all_results.json").read_text()))
    launcher, twin = results
    assert [d["stats"] for d in twin["decisions"]] == [d["stats"] for d in launcher["decisions"]]
    assert [(e["step"], e["frozen_blocks"]) for e in twin["freeze_events"]] == \
        [(e["step"], e["frozen_blocks"]) for e in launcher["freeze_events"]] != []
    assert twin["eval_accuracy"] == launcher["eval_accuracy"]
    assert abs(twin["train_loss"] - launcher["train_loss"]) < 1e-6


def test_overhead_bench_counts_the_statistics_ops_of_a_never_freezing_run(tmp_path):
    """bench/overhead.py on a 2-block model: with AutoFreeze off it counts nothing of ours; the
    moments decider's step hook runs on every step; the table and the JSON come out."""
    from conftest import ROOT, script_env
    out = tmp_path / "overhead.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "overhead.py"), "--layers", "2", "--steps", "6",
                           "--deciders", "full (autofreeze off)", "snr, moments", "--out", str(out)],
                          capture_output=True, text=True, env=script_env(), cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "| snr, moments |" in proc.stdout
    full, moments = json.loads(out.read_text())["rows"]
    assert full["hook"]["ops"] == full["after_step"]["ops"] == 0
    assert 0 < moments["hook"]["ops"] < moments["engine"]["ops"] and moments["step"]["ms"] > 0


def test_a_replayed_freeze_costs_what_the_nearest_covering_resume_point_cost():
    """The decider study reads a replayed freeze's cost at the latest measured fraction no later than
    the freeze, with the fewest blocks no fewer than its own: not the cheapest covering point, which
    read every 12-block freeze as free off the one early resume that scored above full fine-tuning."""
    from decider_study import estimated_cost
    grid = {(8, 0.1): -1.4, (8, 0.2): 2.15, (4, 0.2): 0.5}
    assert estimated_cost([(30, 4)], 100, grid) == 0.5
    assert estimated_cost([(30, 8)], 100, grid) == 2.15
    assert estimated_cost([(30, 4), (40, 8)], 100, grid) == 2.15  # a schedule costs its costliest freeze
    assert estimated_cost([(15, 4)], 100, grid) == 0.0  # a measured gain is no cost, not a credit
    assert estimated_cost([(5, 4)], 100, grid) is None  # nothing measured that early


def test_a_replayed_freeze_at_the_step_a_resume_froze_costs_what_that_resume_cost(tmp_path, monkeypatch):
    """The resume grid keeps each resume's fraction exact: rounded (72 / 124 -> 0.581 > 0.5806), it no
    longer covered a freeze replayed at that very step, which then read an earlier, other resume."""
    import decider_study
    monkeypatch.setattr(decider_study, "RESUME_DIR", str(tmp_path))
    (tmp_path / "mpnet-seed42-watch.json").write_text(json.dumps({"train_steps": 124, "eval_accuracy": 0.8875}))
    (tmp_path / "mpnet-seed42-resume.json").write_text(json.dumps({
        "8@0.1": {"eval_accuracy": 0.88, "step": 12}, "4@0.6": {"eval_accuracy": 0.882, "step": 72}}))
    cost = decider_study.estimated_cost([(72, 4)], 124, decider_study.resume_grid("mpnet", 42))
    assert cost == pytest.approx(0.55)


def test_progress_table_gives_the_prefix_shares_of_the_last_tenth_and_of_what_is_ahead(tmp_path, monkeypatch):
    """Two decisions of a 20-update watch run on a 2-block model: block 0 does 1 a step, block 1
    3 a step, the rest 6 until update 10 and nothing after; at 10% (update 2) the last tenth is
    updates 1-2, and the prefix's progress still ahead is block 0's updates 3-20 of the run's 140."""
    import decider_study
    monkeypatch.setattr(decider_study, "OUT", str(tmp_path))
    monkeypatch.setattr(decider_study, "RESUME_DIR", str(tmp_path))
    monkeypatch.setattr(decider_study, "FRACTIONS", [0.1, 0.6])
    monkeypatch.setitem(decider_study.TASKS, "toy", {"metric": "eval_accuracy", "sizes": (1, 1, 1)})
    stats = [{"step": s, "steps": 10, "grad_sum_sq": [0, 0], "grad_sq_sum": [0, 0],
              "progress": [[1.0] * 10, [3.0] * 10], "progress_rest": [r] * 10} for s, r in ((10, 6.0), (20, 0.0))]
    (tmp_path / "toy-seed42-watch.json").write_text(json.dumps({
        "train_steps": 20, "num_blocks": 2, "eval_accuracy": 0.9, "decisions": [{"stats": x} for x in stats]}))
    (tmp_path / "toy-seed42-resume.json").write_text(json.dumps({"1@0.6": {"eval_accuracy": 0.88, "step": 12}}))
    table = decider_study.progress_table(["toy"])["toy/42"]
    assert table["updates"] == 20 and table["progress"] == pytest.approx(140)
    early, late = table["points"]
    assert early["recent"] == [10.0, 40.0] and early["ahead"] == [round(100 * 18 / 140, 1), round(100 * 72 / 140, 1)]
    assert late["recent"] == [25.0, 100.0] and late["cost"] == {1: pytest.approx(2.0)}


def test_confirm_compares_with_the_reference_runs_and_refuses_a_missing_reference(tmp_path, monkeypatch, capsys):
    """``confirm --reference NAME`` takes full fine-tuning from confirm-NAME.json where it has the seed,
    else from the watch run; a reference that does not exist stops before any run."""
    import decider_study
    monkeypatch.setattr(decider_study, "OUT", str(tmp_path))
    decider = {"name": "schedule", "schedule": [{"fraction": 0.1, "num_frozen_blocks": 8}]}
    run = {"train_runtime": 1.0, "train_steps": 124, "freeze_events": [{"frozen_blocks": 8, "step": 12}]}
    (tmp_path / "confirm-x.json").write_text(json.dumps({"decider": decider, "section": {}, "runs": {
        "mpnet/42": {**run, "eval_accuracy": 0.87}, "mpnet/43": {**run, "eval_accuracy": 0.86}}}))
    (tmp_path / "confirm-full.json").write_text(json.dumps({"decider": {}, "section": {}, "runs": {
        "mpnet/43": {**run, "eval_accuracy": 0.84, "freeze_events": []}}}))
    (tmp_path / "mpnet-seed42-watch.json").write_text(json.dumps({"eval_accuracy": 0.85}))
    decider_study.confirm(["mpnet"], [42, 43], "x", decider, reference="full")
    table = capsys.readouterr().out
    assert "| mpnet/42 | 0.8700 | 0.8500 (watch) | +2.00 |" in table
    assert "| mpnet/43 | 0.8600 | 0.8400 (confirm-full) | +2.00 |" in table
    with pytest.raises(SystemExit, match="--reference fulll"):
        decider_study.confirm(["mpnet"], [44], "x", decider, reference="fulll")


def test_a_study_task_that_names_a_learning_rate_runs_at_it_and_the_others_at_the_shipped_one(tmp_path):
    """The decider study's configs take a task's own peak learning rate (optimizer and warmup peak alike,
    or the warmup would climb to the shipped rate); tasks that name none keep the shipped config's."""
    import decider_study
    shipped = decider_study.base_config()["optimizer"]["params"]["lr"]
    for task, lr in (("mpnet", shipped), ("mpnet-lr5e-5", 5e-5)):
        config = json.loads(open(decider_study.section_config({}, str(tmp_path), task, task)).read())
        assert (config["optimizer"]["params"]["lr"], config["scheduler"]["params"]["warmup_max_lr"]) == (lr, lr)
    assert shipped != 5e-5


def test_the_mpnet_bench_runs_every_row_at_its_learning_rate(tmp_path):
    """bench/mpnet.py's --lr reaches the full row and each decider row alike, warmup peak included."""
    import mpnet
    for config, decider in (("configs/full.json", None), ("configs/autofreeze_cache.json", "gradnorm")):
        cfg = json.loads(open(mpnet.prepared(config, str(tmp_path), False, 5e-5, decider)).read())
        assert (cfg["optimizer"]["params"]["lr"], cfg["scheduler"]["params"]["warmup_max_lr"]) == (5e-5, 5e-5)
    assert cfg["autofreeze"]["decider"]["name"] == "gradnorm"
