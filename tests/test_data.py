import pytest

from ds_autofreeze.data import DataError, ShardShuffleSampler, imdb_split, read_rows, select_examples


def test_sampler_shards_are_fixed_disjoint_and_reshuffled():
    world = [ShardShuffleSampler(101, 2, r, seed=7) for r in range(2)]
    epochs = []
    for epoch in range(3):
        orders = []
        for s in world:
            s.set_epoch(epoch)
            orders.append(list(s))
        epochs.append(orders)
    for r in range(2):
        assert all(set(e[r]) == set(epochs[0][r]) for e in epochs)  # a rank keeps its examples
        assert epochs[0][r] != epochs[1][r]  # but sees them in a new order
        assert len(epochs[0][r]) == 50  # equal shards (one example left out of 101)
    assert not set(epochs[0][0]) & set(epochs[0][1])


def test_sampler_is_deterministic():
    a, b = ShardShuffleSampler(50, 1, 0, seed=3), ShardShuffleSampler(50, 1, 0, seed=3)
    a.set_epoch(2)
    b.set_epoch(2)
    assert list(a) == list(b) and sorted(a) == list(range(50))


def test_imdb_split_is_fixed_and_disjoint():
    train, held_out = imdb_split()
    assert (len(train), len(held_out)) == (20000, 5000)
    assert not {id(r) for r in held_out} & {id(r) for r in train}  # a partition of the rows (IMDb has duplicate texts)
    assert imdb_split()[1][0]["text"] == held_out[0]["text"]


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
