"""AutoFreezeCallback under the real Hugging Face Trainer with DeepSpeed on CPU (one process)."""

import json
import os
import shutil
import subprocess
import sys

import deepspeed
import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

from ds_autofreeze.config import ConfigError
from ds_autofreeze.hf import AutoFreezeCallback, ExampleIds

from conftest import ROOT, script_env, tiny_bert

FREEZE_2_AT_STEP_4 = {"decider": {"name": "schedule", "schedule": [{"fraction": 0.25, "num_frozen_blocks": 2}]}}


class TinyData(torch.utils.data.Dataset):
    """Random token sequences of 12 with some padding; labels follow the first token (learnable)."""

    def __init__(self, n: int = 32, seq: int = 12, seed: int = 1):
        g = torch.Generator().manual_seed(seed)
        self.input_ids = torch.randint(1, 120, (n, seq), generator=g)
        self.attention_mask = torch.ones_like(self.input_ids)
        self.attention_mask[:, seq - 3:] = torch.randint(0, 2, (n, 3), generator=g)
        self.labels = (self.input_ids[:, 0] > 60).long()

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.input_ids[i], "attention_mask": self.attention_mask[i], "labels": self.labels[i]}


def trainer_config(stage: int, autofreeze: dict) -> dict:
    """DeepSpeed JSON as a Trainer user writes it: what the Trainer sets is "auto"; no scheduler
    section (the Trainer's linear decay)."""
    return {"train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto", "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto", "steps_per_print": 10 ** 6,
            "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto", "torch_adam": True}},
            "zero_optimization": {"stage": stage}, "autofreeze": autofreeze}


class Recorder(TrainerCallback):
    """Added after AutoFreezeCallback, so it sees each step after that step's freeze: ``hook(trainer)``
    of every step goes in ``snapshots[step]``."""

    def __init__(self, trainer: Trainer, hook=None):
        self.trainer, self.hook, self.snapshots = trainer, hook, {}

    def on_step_end(self, args, state, control, **kwargs):
        if self.hook is not None:
            self.snapshots[state.global_step] = self.hook(self.trainer)


def make_trainer(out, stage=2, autofreeze=FREEZE_2_AT_STEP_4, model=None, cache=False, epochs=2, save_steps=None,
                 record=None, data_collator=None, accumulation=1):
    """A Trainer on TinyData (8 micro-batches per epoch) with AutoFreezeCallback and a Recorder:
    (trainer, callback, recorder)."""
    data = TinyData()
    autofreeze = {**autofreeze, "cache": {"enabled": cache, "disk_dir": str(out) + "-cache"}}
    targs = TrainingArguments(output_dir=str(out), per_device_train_batch_size=4, num_train_epochs=epochs,
                              gradient_accumulation_steps=accumulation,
                              learning_rate=1e-3, weight_decay=0.01, logging_steps=1, report_to="none",
                              save_strategy="steps" if save_steps else "no", save_steps=save_steps,
                              deepspeed=trainer_config(stage, autofreeze), disable_tqdm=True, seed=0,
                              dataloader_pin_memory=False)
    trainer = Trainer(model=model if model is not None else tiny_bert(), args=targs,
                      train_dataset=ExampleIds(data) if cache else data, data_collator=data_collator)
    callback = AutoFreezeCallback(trainer)
    trainer.add_callback(callback)
    recorder = Recorder(trainer, record)
    trainer.add_callback(recorder)
    return trainer, callback, recorder


def full_weights(model: torch.nn.Module, names=None) -> dict[str, torch.Tensor]:
    """Copies of the named parameters, whole even under ZeRO-3 (gathered)."""
    params = [(n, p) for n, p in model.named_parameters() if names is None or n in names]
    with deepspeed.zero.GatheredParameters([p for _, p in params], enabled=hasattr(params[0][1], "ds_id")):
        return {n: p.detach().clone() for n, p in params}


def losses(trainer: Trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


# ---------------------------------------------------------------- freezing under the Trainer

@pytest.mark.parametrize("stage", [2, 3])
def test_hf_freeze_repartitions_and_training_logging_saving_continue(tmp_path, stage):
    def state(trainer):
        af = next(c for c in trainer.callback_handler.callbacks if isinstance(c, AutoFreezeCallback)).af
        numel = lambda p: getattr(p, "ds_numel", p.numel())  # noqa: E731 - ZeRO-3 holds partitions
        return {"bytes": af.training_state_bytes(), "weights": full_weights(trainer.model),
                "trainable": sum(numel(p) for p in trainer.model.parameters() if p.requires_grad),
                "optimizer": trainer.model_wrapped.optimizer}

    trainer, callback, recorder = make_trainer(tmp_path / "out", stage, autofreeze={**FREEZE_2_AT_STEP_4,
                                               "rescale_clipping": True}, save_steps=6, record=state)
    trainer.train()
    af, engine, seen = callback.af, trainer.model_wrapped, recorder.snapshots
    assert af.freeze_events == [{"step": 4, "frozen_blocks": 2, "trainable_params": seen[4]["trainable"],
                                 "repartition_seconds": af.freeze_events[0]["repartition_seconds"],
                                 "gradient_clipping": round(engine.gradient_clipping(), 6)}]
    assert 0 < engine.gradient_clipping() < 1.0  # the Trainer's max_grad_norm, rescaled at the freeze
    assert af.config.total_steps == trainer.state.max_steps == 16

    # Frozen weights (embeddings, blocks 0-1) are bit-identical from the freeze to the end; the rest trained.
    end = full_weights(trainer.model)
    frozen = [n for n, p in trainer.model.named_parameters() if not p.requires_grad]
    assert any("embeddings" in n for n in frozen) and any("layer.1." in n for n in frozen)
    assert not any("layer.2." in n or "classifier" in n for n in frozen)
    for name in frozen:
        assert torch.equal(seen[4]["weights"][name], end[name]), name
    assert not torch.equal(seen[4]["weights"]["classifier.weight"], end["classifier.weight"])
    assert not torch.equal(seen[4]["weights"]["bert.encoder.layer.3.output.dense.weight"],
                           end["bert.encoder.layer.3.output.dense.weight"])

    # The optimizer holds fp32 masters and two Adam moments of the trainable share only (one rank;
    # ZeRO pads its flat partitions to an alignment).
    before, after = seen[3]["bytes"], seen[4]["bytes"]
    trainable = seen[4]["trainable"]
    assert trainable < seen[3]["trainable"] // 2
    assert 4 * trainable <= after["master_weights"] <= 4 * (trainable + 64)
    assert after["optimizer_moments"] == 2 * after["master_weights"] < before["optimizer_moments"]

    # The Trainer's references followed the new optimizer, and training, logging, saving went on.
    assert seen[4]["optimizer"] is not seen[3]["optimizer"]
    for wrapper in (trainer.optimizer, trainer.callback_handler.optimizer, *trainer.accelerator._optimizers):
        assert wrapper.optimizer is engine.optimizer
    assert trainer.lr_scheduler.scheduler is engine.lr_scheduler
    logged = {h["step"]: h for h in trainer.state.log_history if "loss" in h}
    assert sorted(logged) == list(range(1, 17))
    lrs = [logged[s]["learning_rate"] for s in range(1, 17)]
    assert lrs == sorted(lrs, reverse=True) and lrs[0] > lrs[-1] == 0.0  # the linear decay went on through the freeze
    assert all(logged[s]["grad_norm"] > 0 for s in range(5, 17))
    event = next(h for h in trainer.state.log_history if "autofreeze/frozen_blocks" in h)
    assert event["step"] == 4 and event["autofreeze/frozen_blocks"] == 2
    assert event["autofreeze/optimizer_moments_bytes"] == after["optimizer_moments"]
    for step in (6, 12):
        with open(tmp_path / "out" / f"checkpoint-{step}" / "trainer_state.json") as f:
            history = json.load(f)["log_history"]
        assert any(h.get("autofreeze/frozen_blocks") == 2 and h["step"] == 4 for h in history)
        assert os.path.isfile(tmp_path / "out" / f"checkpoint-{step}" / f"global_step{step}" / "autofreeze_state.json")


def test_hf_static_decider_freezes_before_the_first_step(tmp_path):
    trainer, _, _ = make_trainer(tmp_path / "out", 2, {"decider": {"name": "static", "num_frozen_blocks": 2}}, epochs=1)
    trainer.train()
    first = trainer.state.log_history[0]
    assert first["step"] == 0 and first["autofreeze/frozen_blocks"] == 2
    assert trainer.optimizer.optimizer is trainer.model_wrapped.optimizer
    assert [h["step"] for h in trainer.state.log_history if "loss" in h] == list(range(1, 9))


def test_hf_says_why_nothing_froze(tmp_path):
    trainer, _, _ = make_trainer(tmp_path / "out", 2, {"decider": {"name": "snr", "interval_steps": 2, "z": 1e-3}},
                                 epochs=1)
    with pytest.warns(UserWarning, match=r"^autofreeze: nothing froze\. snr: no decision found block 0 safe"):
        trainer.train()


def test_hf_attaches_on_the_instance_only(tmp_path):
    from accelerate import Accelerator
    trainer, _, _ = make_trainer(tmp_path / "out")
    assert "prepare" in vars(trainer.accelerator)  # this trainer's accelerator, not its class
    assert vars(Accelerator)["prepare"].__module__ == "accelerate.accelerator"


# ---------------------------------------------------------------- resume through the Trainer's checkpoints

@pytest.mark.parametrize("stage", [2, 3])
def test_hf_resume_continues_the_freeze_state_exactly(tmp_path, stage):
    gradnorm = {"decider": {"name": "gradnorm", "interval_steps": 3}}
    trainer, callback, _ = make_trainer(tmp_path / "run", stage, gradnorm, epochs=3, save_steps=10)
    trainer.train()
    af = callback.af
    with open(tmp_path / "run" / "checkpoint-10" / "global_step10" / "autofreeze_state.json") as f:
        saved = json.load(f)
    assert saved["num_frozen_blocks"] > 0, "the checkpoint must come after a freeze for this test to mean anything"
    assert af.num_frozen_blocks > saved["num_frozen_blocks"] or len(af.decider.log) > len(saved["decider"]["log"])
    final = full_weights(trainer.model)

    shutil.copytree(tmp_path / "run" / "checkpoint-10", tmp_path / "resumed" / "checkpoint-10")
    resumed, callback2, _ = make_trainer(tmp_path / "resumed", stage, gradnorm, epochs=3, save_steps=10,
                                         model=tiny_bert(seed=7))  # another init: everything comes from disk
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-10"))
    af2 = callback2.af
    timeless = lambda events: [{k: v for k, v in e.items() if k != "repartition_seconds"} for e in events]  # noqa: E731
    assert timeless(af2.freeze_events) == timeless(af.freeze_events) and af2.decider.log == af.decider.log
    assert af2.freeze_events[:len(saved["freeze_events"])] == saved["freeze_events"]
    assert af2.num_frozen_blocks == af.num_frozen_blocks
    assert losses(resumed) == losses(trainer)
    for name, p in full_weights(resumed.model).items():
        assert torch.equal(p, final[name]), name
    # Each decision and freeze is in the resumed history once: those before the checkpoint came with it.
    for key in ("autofreeze/frozen_blocks", "autofreeze/decision/threshold"):
        steps = [h["step"] for h in resumed.state.log_history if key in h]
        assert steps == [h["step"] for h in trainer.state.log_history if key in h] and len(set(steps)) == len(steps)
    assert len([h for h in trainer.state.log_history if any(k.startswith("autofreeze/decision/") for k in h)]) \
        == len(af.decider.log)


# ---------------------------------------------------------------- the activation cache

@pytest.mark.parametrize("stage", [2, 3])
def test_hf_cached_training_equals_uncached(tmp_path, stage):
    # Accumulation: the Trainer then passes num_items_in_batch (the loss is normalized over the
    # accumulated micro-batches), which must reach the model past the cache's hook.
    plain, _, _ = make_trainer(tmp_path / "plain", stage, epochs=3, accumulation=2)
    plain.train()
    cached, callback, _ = make_trainer(tmp_path / "cached", stage, cache=True, epochs=3, accumulation=2)
    cached.train()
    assert losses(cached) == losses(plain)
    stats = callback.af.cache.stats
    assert stats.ram_hits > 0 and stats.misses > 0
    final = full_weights(plain.model)
    for name, p in full_weights(cached.model).items():
        assert torch.equal(p, final[name]), name
    hit_rate = next(h for h in cached.state.log_history if "autofreeze/cache/hit_rate" in h)
    assert hit_rate["autofreeze/cache/hit_rate"] == stats.hit_rate > 0


def test_hf_cache_needs_example_ids(tmp_path):
    with pytest.raises(ConfigError, match=r"autofreeze\.cache\.enabled: .*ExampleIds\(train_dataset\)"):
        targs = TrainingArguments(output_dir=str(tmp_path), report_to="none",
                                  deepspeed=trainer_config(2, {"cache": {"enabled": True}}))
        AutoFreezeCallback(Trainer(model=tiny_bert(), args=targs, train_dataset=TinyData()))
    # A collator that passes on only the keys it knows: training would silently never hit the cache.
    trainer, _, _ = make_trainer(tmp_path / "out", cache=True, data_collator=lambda features: default_data_collator(
        [{k: v for k, v in f.items() if k != "example_ids"} for f in features]))
    with pytest.raises(ConfigError, match="a training batch came without example_ids; the data collator must pass"):
        trainer.train()

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield from TinyData()

    with pytest.raises(ConfigError, match="an iterable dataset has no example indices"):
        ExampleIds(Stream())


# ---------------------------------------------------------------- LoRA (PEFT)

def lora_bert():
    from peft import LoraConfig, get_peft_model
    return get_peft_model(tiny_bert(), LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                                  task_type="SEQ_CLS"))


@pytest.mark.parametrize("cache", [False, True])
def test_hf_lora_adapters_of_frozen_blocks_freeze_the_others_train(tmp_path, cache):
    lora = lambda trainer: full_weights(trainer.model, {n for n, _ in trainer.model.named_parameters()  # noqa: E731
                                                        if "lora_" in n or "modules_to_save" in n})
    trainer, callback, recorder = make_trainer(tmp_path / "out", 2, model=lora_bert(), cache=cache, record=lora)
    trainer.train()
    at_freeze, end = recorder.snapshots[4], lora(trainer)
    frozen_blocks = ("layer.0.", "layer.1.")
    assert len(at_freeze) == 4 * 4 + 2  # A and B of query and value in 4 blocks, the head's trained copy
    for name, value in end.items():
        if any(b in name for b in frozen_blocks):
            assert torch.equal(value, at_freeze[name]), name
        else:
            assert not torch.equal(value, at_freeze[name]), name
    # The optimizer holds the adapters of blocks 2-3 and the head, nothing else.
    held = {id(f.param) for f in callback.af.repartitioner.layout.fragments()}
    trainable = {id(p) for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert held == trainable and len(trainable) == 2 * 4 + 2
    if cache:
        plain = make_trainer(tmp_path / "plain", 2, model=lora_bert())[0]
        plain.train()
        assert losses(trainer) == losses(plain) and callback.af.cache.stats.ram_hits > 0


# ---------------------------------------------------------------- the example script

def test_trainer_example_script_trains_freezes_and_evaluates_every_example(tmp_path):
    """launch/trainer.py as a user runs it (packaged MiniLM, packaged reviews): the freeze happens, the
    second epoch is served from the cache in part, and all 40 held-out examples are evaluated, though 40 is not
    a multiple of the evaluation batch (32)."""
    config = json.load(open(os.path.join(ROOT, "configs", "trainer_autofreeze_cache.json")))
    # Frozen after step 2 of 4 in epoch 1: its last two batches are written, and hit in epoch 2.
    config["autofreeze"]["decider"] = {"name": "schedule", "schedule": [{"fraction": 0.25, "num_frozen_blocks": 2}]}
    path = tmp_path / "trainer.json"
    path.write_text(json.dumps(config))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "trainer.py"), "--deepspeed_config", str(path),
                           "--output_dir", str(out), "--max_train_samples", "64", "--max_eval_samples", "40",
                           "--max_seq_length", "32", "--num_train_epochs", "2", "--per_device_train_batch_size", "16",
                           "--save_strategy", "no", "--no_progress"],
                          capture_output=True, text=True, env=script_env(), cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    results = json.loads((out / "all_results.json").read_text())
    assert results["eval_examples"] == 40 and [e["epoch"] for e in results["epochs"]] == [1, 2]
    assert results["train_steps"] == 8
    assert [e["frozen_blocks"] for e in results["freeze_events"]] == [2] and results["final_frozen_blocks"] == 2
    assert results["cache"]["stats"]["hit_rate"] > 0
