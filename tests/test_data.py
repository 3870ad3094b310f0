import pytest
import torch

from ds_autofreeze.data import DataError, epoch_steps, group_texts, packaged_split, rank_share, read_rows, select_examples


def _rank_orders(epoch, world=2, per_rank=5, n=101, seed=7):
    steps = epoch_steps(n, seed, epoch, world, per_rank)
    return [[x for step in steps for x in rank_share(step, world, r)] for r in range(world)]


def test_rank_shards_are_fixed_disjoint_and_reshuffled():
    epochs = [_rank_orders(e) for e in range(3)]
    for r in range(2):
        assert all(set(e[r]) == set(epochs[0][r]) for e in epochs)  # a rank keeps its examples
        assert epochs[0][r] != epochs[1][r]  # but sees them in a new order
        assert len(epochs[0][r]) == 50  # equal shards (one example left out of 101)
    assert not set(epochs[0][0]) & set(epochs[0][1])


def test_epoch_steps_are_deterministic_and_cover_the_data():
    assert epoch_steps(50, 3, 2, 1, 10) == epoch_steps(50, 3, 2, 1, 10)
    assert sorted(x for step in epoch_steps(50, 3, 2, 1, 10) for x in step) == list(range(50))
    assert epoch_steps(50, 3, 2, 1, 10) != epoch_steps(50, 3, 1, 1, 10)


def test_a_global_step_resplits_over_another_world():
    step = epoch_steps(64, 1, 0, 2, 8)[3]  # 16 examples: 8 per rank on 2 ranks
    assert rank_share(step, 1, 0) == step
    assert rank_share(step, 2, 0) + rank_share(step, 2, 1) == step
    assert rank_share(step, 4, 3) == step[12:]
    with pytest.raises(ValueError):
        rank_share(step, 3, 0)


@pytest.mark.parametrize("source,sizes", [("imdb", (20000, 5000)), ("rotten_tomatoes", (6530, 2000))])
def test_packaged_split_is_fixed_and_disjoint(source, sizes):
    train, held_out = packaged_split(source)
    assert (len(train), len(held_out)) == sizes
    assert {r["source"] for r in train + held_out} == {source}
    assert not {id(r) for r in held_out} & {id(r) for r in train}  # a partition of the rows (IMDb has duplicate texts)
    assert packaged_split(source)[1][0]["text"] == held_out[0]["text"]
    with pytest.raises(DataError, match="no source 'sst2'"):
        packaged_split("sst2")


def test_read_rows_jsonl_and_errors(tmp_path):
    good = tmp_path / "d.jsonl"
    good.write_text('{"text": "a", "label": 1}\n\n{"text": "b", "label": "0"}\n')
    rows = read_rows(str(good))
    assert select_examples(rows, ["text"], "label", "d").labels == [1, 0]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "label": 1}\n{"text": \n')
    with pytest.raises(DataError, match="bad.jsonl:2: not a JSON object"):
        read_rows(str(bad))
    (tmp_path / "x.parquet").write_text("")
    with pytest.raises(DataError, match="unsupported file type"):
        read_rows(str(tmp_path / "x.parquet"))


def test_select_examples_pairs_and_label_checks():
    rows = [{"a": "x", "b": "y", "label": 2.0}, {"a": "z", "b": "w", "label": 0}]
    ex = select_examples(rows, ["a", "b"], "label", "src")
    assert ex.texts == [("x", "y"), ("z", "w")] and ex.labels == [2, 0]
    with pytest.raises(DataError, match="label -1 is negative"):
        select_examples([{"a": "x", "label": -1}], ["a"], "label", "src")
    with pytest.raises(DataError, match="must hold integer class ids, got 0.5"):
        select_examples([{"a": "x", "label": 0.5}], ["a"], "label", "src")


def test_group_texts_concatenates_drops_the_remainder_and_reads_only_what_it_needs():
    sequences = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10]]
    assert group_texts(sequences, 4).tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert group_texts(sequences, 4, max_blocks=9).tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert group_texts(sequences, 11).shape == (0, 11)

    def tokenized():  # a tokenizer's output, read lazily
        yield from sequences[:2]
        raise AssertionError("read past the texts the first block needs")

    assert group_texts(tokenized(), 4, max_blocks=1).tolist() == [[1, 2, 3, 4]]


def test_tokenized_dataset_trims_a_batch_to_its_longest_row():
    from ds_autofreeze.data import TokenizedDataset
    mask = torch.zeros(3, 10, dtype=torch.long)
    for row, n in enumerate([4, 7, 2]):
        mask[row, :n] = 1
    data = TokenizedDataset({"input_ids": torch.arange(30).view(3, 10) * mask, "attention_mask": mask,
                             "labels": torch.tensor([0, 1, 0])})
    assert data.batch([0, 2])["input_ids"].shape == (2, 10)  # off by default
    data.trim_padding = True
    batch = data.batch([0, 2])
    assert batch["input_ids"].shape == (2, 4) and batch["attention_mask"].shape == (2, 4)
    assert torch.equal(batch["labels"], torch.tensor([0, 0]))  # not a sequence: untouched
    assert data.batch([1])["input_ids"].shape == (1, 7)
