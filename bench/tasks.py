"""Extractive QA and multiple choice with the packaged MiniLM-L6: full fine-tuning vs AutoFreeze + cache.

    python bench/tasks.py                        # both tasks, about 30 min on 2 CPU cores
    python bench/tasks.py --tasks multiple_choice --max_train_samples 400   # a quick look

No SQuAD or SWAG can be downloaded here, so both data sets are derived from the packaged IMDb
reviews (train split for training, the held-out split for evaluation), in the formats users
have (SQuAD 2.0 JSON; SWAG columns), and written under --out/data:
- question_answering (SQuAD 2.0 style): "What rating did the reviewer give?" (answer: the span
  "7/10", "8 out of 10", ...) and "Which year is mentioned?" (the first year), each asked of
  reviews that hold the answer and, as unanswerable questions, of reviews that do not (half and
  half). Reviews are long (median 174 words): contexts are split into 192-token windows with
  stride 64.
- multiple_choice (SWAG style): sent1 = a review's first sentence, sent2 = the first two words of
  its second sentence; the right ending is the rest of that sentence, three distractors are the
  rest of other reviews' second sentences.
Each task runs launch/finetune.py twice, one after the other: configs/full.json and
configs/autofreeze_cache.json. Speedup = full's train_runtime / AutoFreeze's. Prints a markdown
table; writes results.json under --out.
"""
from __future__ import annotations

import json
import os
import random
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

from compare import bench_parser, cells, run_one, write_results  # noqa: E402

from ds_autofreeze.data import packaged_split  # noqa: E402

RUNS = {"full": "configs/full.json", "autofreeze+cache": "configs/autofreeze_cache.json"}
HEADLINE = {"question_answering": ("f1", "exact_match"), "multiple_choice": ("accuracy",)}
QUESTIONS = {"What rating did the reviewer give?": re.compile(r"\b\d{1,2}(?:\.\d)? ?(?:/|out of) ?10\b"),
             "Which year is mentioned?": re.compile(r"\b(?:19\d\d|20[0-2]\d)\b")}


def clean(text: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<br\s*/?>", " ", text)).strip()


def squad_file(reviews: list[dict], n: int, seed: int, path: str) -> str:
    """n questions, a quarter per (question, answerable or not), as a SQuAD 2.0 JSON file."""
    rng = random.Random(seed)
    texts = [clean(r["text"]) for r in reviews]
    rng.shuffle(texts)
    paragraphs = []
    for question, pattern in QUESTIONS.items():
        with_answer = [t for t in texts if pattern.search(t)][:n // 4]
        without = [t for t in texts if not pattern.search(t)][:n // 4]
        for i, text in enumerate(with_answer + without):
            match = pattern.search(text)
            answers = [{"text": match.group(0), "answer_start": match.start()}] if match else []
            paragraphs.append({"context": text, "qas": [{"id": f"{len(paragraphs)}", "question": question,
                                                         "answers": answers, "is_impossible": not answers}]})
    rng.shuffle(paragraphs)
    with open(path, "w") as f:
        json.dump({"version": "v2.0", "data": [{"title": "imdb", "paragraphs": paragraphs}]}, f)
    return path


def swag_file(reviews: list[dict], n: int, seed: int, path: str) -> str:
    rng = random.Random(seed)
    pairs = []
    for r in reviews:
        sentences = [s.split() for s in re.split(r"(?<=[.!?])\s+", clean(r["text"]))]
        if len(sentences) >= 2 and 4 <= len(sentences[0]) <= 40 and 5 <= len(sentences[1]) <= 30:
            pairs.append((" ".join(sentences[0]), sentences[1]))
    rng.shuffle(pairs)
    pairs = pairs[:n]
    with open(path, "w") as f:
        for i, (first, second) in enumerate(pairs):
            others = rng.sample([p[1] for j, p in enumerate(pairs) if j != i][:200], 3)
            label = rng.randrange(4)
            endings = [" ".join(o[2:]) for o in others]
            endings.insert(label, " ".join(second[2:]))
            f.write(json.dumps({"sent1": first, "sent2": " ".join(second[:2]),
                                **{f"ending{k}": e for k, e in enumerate(endings)}, "label": label}) + "\n")
    return path


SETTINGS = {  # per task: data builder, sizes, launch arguments
    "question_answering": (squad_file, "json", ["--max_seq_length", "192", "--doc_stride", "64"]),
    "multiple_choice": (swag_file, "jsonl", ["--max_seq_length", "64"]),
}


def table(results: dict[str, dict[str, dict]]) -> str:
    rows = ["| task | run | score | Δ vs full (pt) | train time (s) | speedup vs full | frozen blocks |",
            "|---|---|---|---|---|---|---|"]
    rows += [f"| {task} | {name} | {cells(r, runs.get('full'), HEADLINE[task])} |"
             for task, runs in results.items() for name, r in runs.items()]
    return "\n".join(rows)


def main() -> None:
    p = bench_parser(__doc__, "tasks")
    p.set_defaults(max_train_samples=1000, max_eval_samples=400, num_train_epochs=2)
    p.add_argument("--tasks", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    train_reviews, held_out = packaged_split()
    results: dict[str, dict[str, dict]] = {}
    for task in args.tasks:
        build, ext, launch_args = SETTINGS[task]
        data = os.path.join(args.out, "data")  # rebuilt from the packaged reviews (seeded); not committed
        os.makedirs(data, exist_ok=True)
        train = build(train_reviews, args.max_train_samples, args.seed, os.path.join(data, f"{task}_train.{ext}"))
        dev = build(held_out, args.max_eval_samples, args.seed + 1, os.path.join(data, f"{task}_dev.{ext}"))
        # max_seq_length comes from the task's settings (the later flag wins in argparse).
        extra = ["--task", task, "--train_file", train, "--validation_file", dev, *launch_args]
        results[task] = {name: run_one(f"{task}-{name}", config, args, extra=extra) for name, config in RUNS.items()}
    write_results(args, results, table(results))


if __name__ == "__main__":
    main()
