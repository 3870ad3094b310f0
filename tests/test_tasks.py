"""The non-classification tasks: data formats, features, scoring, and launch/finetune.py runs with
tiny random models (BERT for QA / multiple choice, BART and T5 for summarization)."""
import argparse
import json
import random

import pytest
import torch

from conftest import WORDS_NEG, WORDS_POS, write_config
from test_finetune import run

from ds_autofreeze.data import DataError, read_rows
from ds_autofreeze.tasks import EvalSet, QuestionAnswering, add_arguments

WORDS = [*WORDS_POS, *WORDS_NEG, "the", "movie", "was"]
SCHEDULE_CACHE = {"decider": {"name": "schedule", "schedule": [{"fraction": 0.2, "num_frozen_blocks": 1},
                                                               {"fraction": 0.5, "num_frozen_blocks": 2}]},
                  "cache": {"enabled": True, "ram_bytes": 1 << 16}}
SCHEDULE = {"decider": SCHEDULE_CACHE["decider"]}


def task_args(**overrides) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args([])
    for k, v in {**dict(max_seq_length=24, max_train_samples=None, max_eval_samples=None, doc_stride=8,
                        train_file=None, validation_file=None), **overrides}.items():
        setattr(args, k, v)
    return args


def squad_rows(n: int, seed: int) -> list[dict]:
    """Contexts of 20-30 words; the question names a word, the answer is the two words after it.
    Every fourth question asks for a word the context does not hold: no answer (SQuAD 2.0)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = rng.choices(WORDS, k=rng.randint(20, 30))
        context = " ".join(words)
        if i % 4 == 3:
            missing = "superb" if "superb" not in words else None
            if missing is not None:
                words = [w for w in words if w != missing]
                context = " ".join(words)
                rows.append({"id": f"q{i}", "question": f"after {missing}", "context": context,
                             "answers": {"text": [], "answer_start": []}})
                continue
        k = rng.randint(0, len(words) - 3)
        start = len(" ".join(words[:k])) + (1 if k else 0)
        answer = " ".join(words[k + 1:k + 3])
        rows.append({"id": f"q{i}", "question": f"after {words[k]}", "context": context,
                     "answers": {"text": [answer], "answer_start": [start + len(words[k]) + 1]}})
    return rows


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def write_squad_json(path, rows) -> str:
    """The official SQuAD 2.0 layout: data / paragraphs / qas, is_impossible."""
    qas = [{"id": r["id"], "question": r["question"], "is_impossible": not r["answers"]["text"],
            "answers": [{"text": t, "answer_start": s} for t, s in zip(r["answers"]["text"], r["answers"]["answer_start"])]}
           for r in rows]
    paragraphs = [{"context": r["context"], "qas": [q]} for r, q in zip(rows, qas)]
    path.write_text(json.dumps({"version": "v2.0", "data": [{"title": "t", "paragraphs": paragraphs}]}))
    return str(path)


def swag_rows(n: int, seed: int) -> list[dict]:
    """The right ending repeats the context's sentiment words; the others are of the other sentiment."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        positive = rng.random() < 0.5
        same, other = (WORDS_POS, WORDS_NEG) if positive else (WORDS_NEG, WORDS_POS)
        label = rng.randint(0, 3)
        endings = [" ".join(rng.choices(same if j == label else other, k=2)) for j in range(4)]
        rows.append({"sent1": " ".join(rng.choices(same, k=3)), "sent2": "the movie was",
                     **{f"ending{j}": e for j, e in enumerate(endings)}, "label": label})
    return rows


def summary_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = rng.choices(WORDS, k=12)
        rows.append({"article": " ".join(words), "summary": " ".join(words[:3])})
    return rows


# ---------------------------------------------------------------- data formats and features
def test_squad_json_and_jsonl_read_the_same(tmp_path):
    rows = squad_rows(12, 0)
    assert read_rows(write_squad_json(tmp_path / "s.json", rows)) == read_rows(write_jsonl(tmp_path / "s.jsonl", rows))
    assert any(not r["answers"]["text"] for r in rows)


def test_qa_features_label_the_answer_span_in_every_window(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = squad_rows(16, 1)
    args = task_args(train_file=write_jsonl(tmp_path / "t.jsonl", rows), validation_file=write_jsonl(tmp_path / "v.jsonl", rows))
    task = QuestionAnswering(args)
    train, evaluation = task.load(tokenizer)
    assert len(train) > len(rows)  # long contexts became several overlapping features
    assert evaluation.allow_no_answer and evaluation.num_examples == len(rows)
    found = set()
    for e, feats in enumerate(evaluation.example_features):
        ref = evaluation.references[e]
        for f, offsets in zip(feats, ref["offsets"]):
            s, t = int(train.tensors["start_positions"][f]), int(train.tensors["end_positions"][f])
            if (s, t) == (0, 0):
                continue
            assert ref["answers"] and ref["context"][offsets[s][0]:offsets[t][1]] == ref["answers"][0][0]
            found.add(e)
    # Every answerable question is labelled in at least one window; unanswerable ones in none.
    assert found == {e for e, ref in enumerate(evaluation.references) if ref["answers"]}


def test_qa_data_errors_name_the_row(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = squad_rows(4, 2)
    rows[2]["answers"] = {"text": ["nowhere"], "answer_start": [0]}
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=r"bad.jsonl: row 2: answer 'nowhere' is not at character 0"):
        QuestionAnswering(task_args(train_file=path, validation_file=path)).load(tokenizer)
    with pytest.raises(DataError, match="needs --train_file and --validation_file"):
        QuestionAnswering(task_args()).load(tokenizer)


def test_qa_answers_from_the_best_window_and_no_answer_rule():
    task = QuestionAnswering(task_args(max_answer_length=3, n_best_size=5))
    context = "aa bb cc dd"
    ref = {"id": "x", "context": context, "answers": [],
           # two windows over the words: (aa bb cc) and (bb cc dd); position 0 is [CLS]
           "offsets": [[None, (0, 2), (3, 5), (6, 8)], [None, (3, 5), (6, 8), (9, 11)]]}
    low, high = torch.full((4,), -5.0), torch.full((4,), -5.0)
    start2, end2 = high.clone(), high.clone()
    start2[2], end2[3] = 4.0, 4.0  # "cc dd" in the second window
    windows = [(low, low.clone()), (start2, end2)]
    assert task._answer(ref, windows, allow_no_answer=False) == "cc dd"
    start2[0] = end2[0] = 5.0  # [CLS] of window 2 scores 10 > 8, but the null score is the windows' minimum
    assert task._answer(ref, windows, allow_no_answer=True) == "cc dd"
    low[0] = 5.0
    windows[0] = (low, low.clone())  # now every window's [CLS] scores 10: no answer
    assert task._answer(ref, windows, allow_no_answer=True) == ""
    assert task._answer(ref, windows, allow_no_answer=False) == "cc dd"


def test_qa_scores_use_squad2_rules_for_unanswerable_questions():
    class Fixed(QuestionAnswering):
        def _answer(self, ref, logits, allow):
            return ref["predict"]

    class Engine:
        device = torch.device("cpu")

        def __call__(self, **batch):
            n = len(batch["input_ids"])
            return argparse.Namespace(start_logits=torch.zeros(n, 4), end_logits=torch.zeros(n, 4))

    from ds_autofreeze.data import TokenizedDataset
    refs = [{"id": "a", "context": "", "answers": [("the movie", 0)], "predict": "the movie"},  # EM 1, F1 1
            {"id": "b", "context": "", "answers": [("great fun", 0)], "predict": "great"},  # EM 0, F1 2/3
            {"id": "c", "context": "", "answers": [], "predict": ""},  # no answer, right: 1, 1
            {"id": "d", "context": "", "answers": [], "predict": "dull"}]  # no answer, wrong: 0, 0
    features = TokenizedDataset({"input_ids": torch.zeros(4, 4, dtype=torch.long)})
    evaluation = EvalSet(features, 4, [[0], [1], [2], [3]], refs, allow_no_answer=True)
    em, f1 = Fixed(task_args()).score(Engine(), evaluation, [0, 1, 2, 3], batch_size=3)
    assert em == pytest.approx(2.0) and f1 == pytest.approx(2 + 2 / 3)


def test_multiple_choice_rejects_a_label_past_the_endings(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer
    from ds_autofreeze.tasks import MultipleChoice
    rows = swag_rows(4, 0)
    rows[1]["label"] = 4
    path = write_jsonl(tmp_path / "swag.jsonl", rows)
    with pytest.raises(DataError, match="row 1: label 4 names no ending"):
        MultipleChoice(task_args(train_file=path, validation_file=path)).load(AutoTokenizer.from_pretrained(tiny_model_dir))


# ---------------------------------------------------------------- end to end, cache exactness
@pytest.fixture(scope="session")
def seq2seq_dirs(tmp_path_factory):
    """Tiny random BART and T5 with a word-level tokenizer, saved as local models."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import (BartConfig, BartForConditionalGeneration, PreTrainedTokenizerFast, T5Config,
                              T5ForConditionalGeneration)
    dirs = {}
    for family, specials in (("bart", ["<s>", "<pad>", "</s>", "<unk>"]), ("t5", ["<pad>", "</s>", "<unk>"])):
        vocab = {w: i for i, w in enumerate([*specials, *WORDS])}
        tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", vocab["</s>"])])
        path = tmp_path_factory.mktemp(family)
        PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                **({"bos_token": "<s>"} if family == "bart" else {})).save_pretrained(path)
        torch.manual_seed(0)
        if family == "bart":
            model = BartForConditionalGeneration(BartConfig(
                vocab_size=len(vocab), d_model=32, encoder_layers=4, decoder_layers=2, encoder_attention_heads=2,
                decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=2))
        else:
            model = T5ForConditionalGeneration(T5Config(
                vocab_size=len(vocab), d_model=32, d_kv=16, d_ff=64, num_layers=4, num_decoder_layers=2, num_heads=2,
                pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
        model.save_pretrained(path)
        dirs[family] = str(path)
    return dirs


def run_task(tmp_path, name, task, model_dir, train, dev, autofreeze, *extra):
    out = tmp_path / name
    proc = run(["--task", task, "--model_name_or_path", model_dir, "--train_file", train, "--validation_file", dev,
                "--deepspeed_config", write_config(tmp_path / f"{name}.json", autofreeze),
                "--num_train_epochs", "3", "--output_dir", str(out), *extra])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads((out / "all_results.json").read_text()), proc.stdout


def assert_cache_exact(plain, cached, metrics):
    """The cached run is the uncached run: same losses, same scores, same freezes."""
    assert cached["train_loss"] == plain["train_loss"]
    assert all(cached[m] == plain[m] for m in metrics)
    assert cached["freeze_events"] and [e["step"] for e in cached["freeze_events"]] == \
        [e["step"] for e in plain["freeze_events"]]
    stats = cached["cache"]["stats"]
    assert stats["hit_rate"] > 0.2 and stats["corrupt"] == 0  # epochs after a freeze read what it stored


def test_question_answering_end_to_end_with_cache(tmp_path, tiny_model_dir):
    train = write_squad_json(tmp_path / "train.json", squad_rows(48, 3))
    dev = write_jsonl(tmp_path / "dev.jsonl", squad_rows(16, 4))
    common = ("--max_seq_length", "24", "--doc_stride", "8")
    plain, out = run_task(tmp_path, "plain", "question_answering", tiny_model_dir, train, dev, SCHEDULE, *common)
    cached, _ = run_task(tmp_path, "cached", "question_answering", tiny_model_dir, train, dev, SCHEDULE_CACHE, *common)
    assert plain["task"] == "question_answering" and 0 <= plain["eval_exact_match"] <= plain["eval_f1"] <= 1
    assert "eval_f1" in out and "eval_exact_match" in out
    assert_cache_exact(plain, cached, ("eval_exact_match", "eval_f1"))


def test_multiple_choice_end_to_end_with_cache_keyed_per_choice(tmp_path, tiny_model_dir):
    train = write_jsonl(tmp_path / "train.jsonl", swag_rows(64, 5))
    dev = write_jsonl(tmp_path / "dev.jsonl", swag_rows(24, 6))
    refused = run(["--task", "multiple_choice", "--model_name_or_path", tiny_model_dir, "--train_file", train,
                   "--validation_file", dev, "--deepspeed_config", write_config(tmp_path / "c.json", SCHEDULE)])
    assert refused.returncode == 2 and "pass --ignore_mismatched_sizes" in refused.stderr.splitlines()[-1]
    # The tiny model was saved with a 2-label classifier; a multiple-choice head scores one per choice.
    common = ("--max_seq_length", "16", "--ignore_mismatched_sizes")
    plain, _ = run_task(tmp_path, "plain", "multiple_choice", tiny_model_dir, train, dev, SCHEDULE, *common)
    cached, _ = run_task(tmp_path, "cached", "multiple_choice", tiny_model_dir, train, dev, SCHEDULE_CACHE, *common)
    assert 0 <= plain["eval_accuracy"] <= 1
    assert_cache_exact(plain, cached, ("eval_accuracy",))
    # One entry per (example, choice): epoch 3 ran every example at the final boundary.
    assert cached["cache"]["disk_entries"] == 64 * 4


@pytest.mark.parametrize("family", ["bart", "t5"])
def test_summarization_end_to_end_with_cache(tmp_path, seq2seq_dirs, family):
    train = write_jsonl(tmp_path / "train.jsonl", summary_rows(48, 7))
    dev = write_jsonl(tmp_path / "dev.jsonl", summary_rows(8, 8))
    common = ("--max_seq_length", "16", "--max_target_length", "6")
    plain, out = run_task(tmp_path, "plain", "summarization", seq2seq_dirs[family], train, dev, SCHEDULE, *common)
    cached, _ = run_task(tmp_path, "cached", "summarization", seq2seq_dirs[family], train, dev, SCHEDULE_CACHE, *common)
    assert plain["num_blocks"] == 4  # the encoder's blocks
    assert all(0 <= plain[f"eval_{m}"] <= 1 for m in ("rouge1", "rouge2", "rougeL")) and "eval_rougeL" in out
    assert_cache_exact(plain, cached, ("eval_rouge1", "eval_rouge2", "eval_rougeL"))


def _evaluate_on_ranks(rank, world, model_dir, train, dev):
    """Each rank scores its share of the held-out examples of a QA and a multiple-choice set, with
    plain models, and of the QA set with a ZeRO-3 engine (weights partitioned over the ranks)."""
    import deepspeed
    from transformers import AutoModelForMultipleChoice, AutoModelForQuestionAnswering, AutoTokenizer
    import ds_autofreeze
    from conftest import ds_config
    from ds_autofreeze.tasks import MultipleChoice
    deepspeed.init_distributed(dist_backend="gloo")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    scores = {}
    for name, task, cls, files in (("qa", QuestionAnswering, AutoModelForQuestionAnswering, (train[0], dev[0])),
                                   ("mc", MultipleChoice, AutoModelForMultipleChoice, (train[1], dev[1])),
                                   ("qa-zero3", QuestionAnswering, AutoModelForQuestionAnswering, (train[0], dev[0]))):
        torch.manual_seed(0)  # the same random head on every rank
        model = cls.from_pretrained(model_dir, ignore_mismatched_sizes=True)
        if name.endswith("zero3"):
            config = ds_config(3)
            config["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition every weight
            model, *_ = ds_autofreeze.initialize(model=model, config=config)
        t = task(task_args(train_file=files[0], validation_file=files[1], max_seq_length=24, doc_stride=8))
        _, evaluation = t.load(tokenizer)
        scores[name] = t.evaluate(model, evaluation, batch_size=5)
    return scores


def test_evaluation_scores_do_not_depend_on_the_number_of_ranks(tmp_path, tiny_model_dir):
    """Held-out examples are split by example over the ranks (a QA example's windows stay together)
    and summed: two ranks report what one rank does. Under ZeRO-3 the ranks, which hold different
    numbers of QA windows, still run their forwards in lockstep (else they would hang)."""
    from multirank import run_ranks
    train = [write_jsonl(tmp_path / "qa.jsonl", squad_rows(8, 9)), write_jsonl(tmp_path / "mc.jsonl", swag_rows(8, 9))]
    dev = [write_jsonl(tmp_path / "qa_dev.jsonl", squad_rows(21, 10)),
           write_jsonl(tmp_path / "mc_dev.jsonl", swag_rows(15, 10))]
    one = run_ranks(_evaluate_on_ranks, 1, tiny_model_dir, train, dev)[0]
    two = run_ranks(_evaluate_on_ranks, 2, tiny_model_dir, train, dev, timeout=180)
    assert two[0] == two[1]
    for name, scores in one.items():
        assert scores.keys() == two[0][name].keys()
        # torchmetrics' SQuAD means are float32: per-rank sums agree to float32 precision.
        assert all(two[0][name][m] == pytest.approx(v, abs=1e-6) for m, v in scores.items())
    assert one["qa-zero3"] == pytest.approx(one["qa"])
    assert 0 < one["qa"]["f1"] < 1  # a random head gets some right: the comparison means something
