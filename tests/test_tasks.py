"""The non-classification tasks: data formats, features, scoring, and launch/finetune.py runs with
tiny random models (BERT for QA / multiple choice, BART and T5 for summarization, Llama and GPT-2 for
causal LM)."""
import argparse
import json
import math
import random

import pytest
import torch

from conftest import WORDS_NEG, WORDS_POS, write_config
from test_finetune import run

from ds_autofreeze.data import DataError, group_texts, packaged_split, read_rows
from ds_autofreeze.tasks import CausalLM, EvalSet, QuestionAnswering, add_arguments, build_task

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


def text_rows(n: int, seed: int) -> list[dict]:
    """Texts of 4-12 words: a review's sentiment words then "the movie was" and more of them."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = WORDS_POS if rng.random() < 0.5 else WORDS_NEG
        rows.append({"text": " ".join([*rng.choices(words, k=rng.randint(1, 6)), "the", "movie", "was",
                                       *rng.choices(words, k=rng.randint(0, 3))])})
    return rows


def instruction_rows(n: int, seed: int) -> list[dict]:
    """Prompts of 3-5 words (sentiment words, then "the movie"); responses of 1-4 words of the same sentiment."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = WORDS_POS if rng.random() < 0.5 else WORDS_NEG
        rows.append({"prompt": " ".join([*rng.choices(words, k=rng.randint(1, 3)), "the", "movie"]),
                     "response": " ".join(rng.choices(words, k=rng.randint(1, 4)))})
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


def test_causal_lm_text_is_grouped_into_blocks_as_run_clm(tmp_path, causal_lm_dirs):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(causal_lm_dirs["llama"])
    rows = text_rows(40, 0)
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    train, evaluation = CausalLM(task_args(train_file=path, validation_file=path, block_size=8,
                                           max_train_samples=5)).load(tokenizer)
    tokens = [t for r in rows for t in tokenizer(r["text"])["input_ids"]]  # no separator between texts
    assert train.tensors["input_ids"].tolist() == [tokens[i:i + 8] for i in range(0, 40, 8)]  # 5 blocks
    assert evaluation.num_examples == len(tokens) // 8  # all of them, the remainder dropped
    held_out = evaluation.features.tensors
    assert torch.equal(held_out["labels"], held_out["input_ids"]) and held_out["attention_mask"].all()
    short = write_jsonl(tmp_path / "short.jsonl", rows[:2])  # under 32 tokens
    with pytest.raises(DataError, match="short.jsonl: the texts of 'text' hold fewer tokens than one block"):
        CausalLM(task_args(train_file=short, validation_file=path, block_size=32)).load(tokenizer)
    tokenizer.model_max_length = 64
    with pytest.raises(DataError, match="--block_size 65: must be between 2 .* model_max_length 64"):
        CausalLM(task_args(train_file=path, validation_file=path, block_size=65)).load(tokenizer)
    assert CausalLM(task_args())._block_size(tokenizer) == 64  # the default: min(1024, model_max_length)


def test_causal_lm_default_data_is_the_packaged_reviews_as_text(tiny_model_dir):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    train, evaluation = CausalLM(task_args(block_size=16, max_train_samples=4, max_eval_samples=2)).load(tokenizer)
    reviews, held_out = packaged_split()
    expected = group_texts((tokenizer(r["text"])["input_ids"] for r in reviews), 16, 4)
    assert torch.equal(train.tensors["input_ids"], expected) and len(train) == 4
    assert evaluation.num_examples == 2 and evaluation.features.tensors["input_ids"][0, 0] == tokenizer.cls_token_id
    assert torch.equal(evaluation.features.tensors["input_ids"][0],
                       torch.tensor(tokenizer(held_out[0]["text"])["input_ids"][:16]))
    with pytest.raises(DataError, match=r"causal_lm needs --train_file and --validation_file \(or neither"):
        CausalLM(task_args(train_file="x.jsonl")).load(tokenizer)


def test_causal_lm_instruction_loss_is_on_the_response_only(tmp_path, causal_lm_dirs):
    """Labels are the response's tokens and the end of sequence; -100 exactly on the prompt and the
    padding. The tokenizer has no padding token: it pads with the end-of-sequence token, which is
    still learnt where it ends a response."""
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(causal_lm_dirs["gpt2"])
    assert tokenizer.pad_token_id is None
    rows = [{"prompt": "the movie was", "response": "great fun"},
            {"prompt": "the movie was good", "response": "great fun superb good love"},  # cut at the block
            {"prompt": "the movie", "response": ""}]
    path = write_jsonl(tmp_path / "i.jsonl", rows)
    train, _ = CausalLM(task_args(train_file=path, validation_file=path, block_size=8,
                                  prompt_column="prompt")).load(tokenizer)
    ids = dict(zip(WORDS, tokenizer.convert_tokens_to_ids(WORDS)))
    eos = tokenizer.eos_token_id

    def tok(text):
        return [ids[w] for w in text.split()]

    t = train.tensors
    assert t["input_ids"].tolist() == [tok("the movie was great fun") + [eos] * 3,
                                       tok("the movie was good great fun superb good"),
                                       tok("the movie") + [eos] * 6]
    assert t["labels"].tolist() == [[-100] * 3 + tok("great fun") + [eos] + [-100] * 2,
                                    [-100] * 4 + tok("great fun superb good"),
                                    [-100] * 2 + [eos] + [-100] * 5]
    assert t["attention_mask"].tolist() == [[1] * 6 + [0] * 2, [1] * 8, [1] * 3 + [0] * 5]
    with pytest.raises(DataError, match="row 1: the prompt takes 4 tokens, leaving none of the response"):
        CausalLM(task_args(train_file=path, validation_file=path, block_size=4, prompt_column="prompt")).load(tokenizer)


def test_causal_lm_eval_loss_is_the_mean_token_cross_entropy(tmp_path, causal_lm_dirs):
    """The held-out loss weighs every scored token alike (examples hold different numbers of them),
    whatever the batch size, and is what the model's own loss gives; perplexity is its exponential."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(causal_lm_dirs["llama"])
    path = write_jsonl(tmp_path / "i.jsonl", instruction_rows(7, 1))
    task = CausalLM(task_args(train_file=path, validation_file=path, block_size=12, prompt_column="prompt"))
    _, evaluation = task.load(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(causal_lm_dirs["llama"], **task.model_kwargs())
    features = evaluation.features
    counts = (features.tensors["labels"][:, 1:] != -100).sum(1)
    assert len(set(counts.tolist())) > 1
    with torch.no_grad():
        model.eval()
        per_example = torch.stack([model(**features.batch([i])).loss for i in range(len(features))])
        whole = model(**features.batch(range(len(features)))).loss  # one batch: the token mean
    expected = float((per_example.double() * counts).sum() / counts.sum())
    assert expected == pytest.approx(float(whole), rel=1e-6)
    for batch_size in (1, 3):
        scores = task.evaluate(model, evaluation, batch_size)
        assert scores["loss"] == pytest.approx(expected, rel=1e-6)
        assert scores["perplexity"] == math.exp(scores["loss"])
    assert model.training  # evaluate puts the model back in training mode


# ---------------------------------------------------------------- end to end, cache exactness
def save_word_tokenizer(path, specials: list[str], end_with_eos: bool, **special_tokens) -> dict[str, int]:
    """A word-level tokenizer over WORDS (``end_with_eos``: appending </s> to every text), saved to path; its vocab."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    vocab = {w: i for i, w in enumerate([*specials, *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if end_with_eos:
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", vocab["</s>"])])
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>",
                            **special_tokens).save_pretrained(path)
    return vocab


@pytest.fixture(scope="session")
def seq2seq_dirs(tmp_path_factory):
    """Tiny random BART and T5 with a word-level tokenizer, saved as local models."""
    from transformers import BartConfig, BartForConditionalGeneration, T5Config, T5ForConditionalGeneration
    dirs = {}
    for family, specials in (("bart", ["<s>", "<pad>", "</s>", "<unk>"]), ("t5", ["<pad>", "</s>", "<unk>"])):
        path = tmp_path_factory.mktemp(family)
        vocab = save_word_tokenizer(path, specials, True, pad_token="<pad>",
                                    **({"bos_token": "<s>"} if family == "bart" else {}))
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


@pytest.fixture(scope="session")
def causal_lm_dirs(tmp_path_factory):
    """Tiny random causal LMs with a word-level tokenizer that adds no special tokens and, like
    GPT-2's, has no padding token: Llama (4 blocks, LM head untied) and GPT-2 (4 blocks, tied)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
    dirs = {}
    for family in ("llama", "gpt2"):
        path = tmp_path_factory.mktemp(family)
        vocab = save_word_tokenizer(path, ["<unk>", "</s>"], False)
        eos = vocab["</s>"]
        torch.manual_seed(0)
        if family == "llama":
            model = LlamaForCausalLM(LlamaConfig(
                vocab_size=len(vocab), hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                num_key_value_heads=1, intermediate_size=64, max_position_embeddings=64, bos_token_id=eos,
                eos_token_id=eos))
        else:
            model = GPT2LMHeadModel(GPT2Config(vocab_size=len(vocab), n_layer=4, n_embd=32, n_head=2, n_positions=64,
                                               bos_token_id=eos, eos_token_id=eos))
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


@pytest.mark.parametrize("family,data", [("llama", "text"), ("gpt2", "instructions")])
def test_causal_lm_end_to_end_with_cache(tmp_path, causal_lm_dirs, family, data):
    """Llama on grouped text; GPT-2 (LM head tied to the embeddings, dropout on) on instruction data."""
    if data == "text":
        train = write_jsonl(tmp_path / "train.jsonl", text_rows(80, 11))
        dev = write_jsonl(tmp_path / "dev.jsonl", text_rows(20, 12))
        common = ("--block_size", "12", "--max_train_samples", "48")
    else:
        train = write_jsonl(tmp_path / "train.jsonl", instruction_rows(48, 11))
        dev = write_jsonl(tmp_path / "dev.jsonl", instruction_rows(12, 12))
        common = ("--block_size", "12", "--prompt_column", "prompt")
    plain, out = run_task(tmp_path, "plain", "causal_lm", causal_lm_dirs[family], train, dev, SCHEDULE, *common)
    cached, _ = run_task(tmp_path, "cached", "causal_lm", causal_lm_dirs[family], train, dev, SCHEDULE_CACHE, *common)
    assert plain["task"] == "causal_lm" and plain["num_blocks"] == 4 and plain["train_steps"] == 18
    assert plain["eval_perplexity"] == math.exp(plain["eval_loss"]) and "eval_perplexity" in out
    assert plain["eval_loss"] < math.log(17)  # it learnt: below a uniform guess over the 17 tokens
    assert_cache_exact(plain, cached, ("eval_loss", "eval_perplexity"))


def _evaluate_on_ranks(rank, world, runs):
    """Each rank scores its share of the held-out examples of each run (name, task, model directory,
    train file, held-out file, task arguments), with a plain model, or, for a name ending in
    "zero3", a ZeRO-3 engine (weights partitioned over the ranks)."""
    import deepspeed
    from transformers import AutoTokenizer
    import ds_autofreeze
    from conftest import ds_config
    deepspeed.init_distributed(dist_backend="gloo")
    scores = {}
    for name, task_name, model_dir, train, dev, overrides in runs:
        task = build_task(task_args(task=task_name, train_file=train, validation_file=dev, **overrides))
        torch.manual_seed(0)  # the same random head on every rank
        model = task.model_class().from_pretrained(model_dir, ignore_mismatched_sizes=True, **task.model_kwargs())
        if name.endswith("zero3"):
            config = ds_config(3)
            config["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition every weight
            model, *_ = ds_autofreeze.initialize(model=model, config=config)
        _, evaluation = task.load(AutoTokenizer.from_pretrained(model_dir))
        scores[name] = task.evaluate(model, evaluation, batch_size=5)
    return scores


def test_evaluation_scores_do_not_depend_on_the_number_of_ranks(tmp_path, tiny_model_dir, causal_lm_dirs):
    """Held-out examples are split by example over the ranks (a QA example's windows stay together)
    and summed: two ranks report what one rank does. Under ZeRO-3 the ranks, which hold different
    numbers of QA windows (and of causal-LM examples), still run their forwards in lockstep (else
    they would hang)."""
    from multirank import run_ranks
    qa = (write_jsonl(tmp_path / "qa.jsonl", squad_rows(8, 9)),
          write_jsonl(tmp_path / "qa_dev.jsonl", squad_rows(21, 10)))
    mc = (write_jsonl(tmp_path / "mc.jsonl", swag_rows(8, 9)), write_jsonl(tmp_path / "mc_dev.jsonl", swag_rows(15, 10)))
    lm = (write_jsonl(tmp_path / "lm.jsonl", instruction_rows(8, 9)),
          write_jsonl(tmp_path / "lm_dev.jsonl", instruction_rows(15, 10)))
    short = {"max_seq_length": 24, "doc_stride": 8}
    instructions = {"block_size": 10, "prompt_column": "prompt"}
    runs = [("qa", "question_answering", tiny_model_dir, *qa, short),
            ("mc", "multiple_choice", tiny_model_dir, *mc, short),
            ("qa-zero3", "question_answering", tiny_model_dir, *qa, short),
            ("lm", "causal_lm", causal_lm_dirs["llama"], *lm, instructions),
            ("lm-zero3", "causal_lm", causal_lm_dirs["llama"], *lm, instructions)]
    one = run_ranks(_evaluate_on_ranks, 1, runs)[0]
    two = run_ranks(_evaluate_on_ranks, 2, runs, timeout=180)
    assert two[0] == two[1]
    for name, scores in one.items():
        assert scores.keys() == two[0][name].keys()
        # torchmetrics' SQuAD means and the model's loss sums are float32: per-rank sums agree to
        # float32 precision.
        assert all(two[0][name][m] == pytest.approx(v, rel=1e-6, abs=1e-6) for m, v in scores.items())
    assert one["qa-zero3"] == pytest.approx(one["qa"])
    assert one["lm-zero3"] == pytest.approx(one["lm"], rel=1e-6)
    assert 0 < one["qa"]["f1"] < 1  # a random head gets some right: the comparison means something
