import dataclasses

import numpy as np
import pytest

from nsa_jax.data import (BOS_ID, DataConfig, corpus_streams, detokenize, make_train_batch,
                          validation_batches)

MIXED = DataConfig(corpora={"shakespeare": 2.0, "python_stdlib": 1.0}, seq_len=192, batch_size=6,
                   passkey_prob=0.2, mqar_prob=0.2, mqar_num_pairs=4)


def _equal(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_batch_layout():
    batch = make_train_batch(MIXED, seed=1, step=2)
    assert set(batch) == {"tokens", "targets", "segment_ids", "loss_mask"}
    for key, dtype in [("tokens", np.int32), ("targets", np.int32), ("segment_ids", np.int32),
                       ("loss_mask", np.float32)]:
        assert batch[key].shape == (6, 192) and batch[key].dtype == dtype


def test_same_seed_and_step_give_the_same_batch_even_after_reloading():
    seed, step = np.random.default_rng().integers(1 << 31, size=2)
    first = make_train_batch(MIXED, int(seed), int(step))
    corpus_streams.cache_clear()  # as in a fresh process after a restart
    assert _equal(first, make_train_batch(MIXED, int(seed), int(step)))


def test_steps_and_seeds_give_different_batches():
    base = make_train_batch(MIXED, 0, 0)
    assert not np.array_equal(base["tokens"], make_train_batch(MIXED, 0, 1)["tokens"])
    assert not np.array_equal(base["tokens"], make_train_batch(MIXED, 1, 0)["tokens"])


def test_rows_do_not_depend_on_batch_size():
    small = make_train_batch(dataclasses.replace(MIXED, batch_size=2), 5, 7)
    large = make_train_batch(MIXED, 5, 7)
    assert all(np.array_equal(small[k], large[k][:2]) for k in small)


def _row_kinds(batch):
    """Synthetic rows train only their answers: 5 passkey digits, 4 MQAR values of 3 digits."""
    kinds = {5: "passkey", 12: "mqar"}
    return [kinds.get(int(mask.sum()), "text") for mask in batch["loss_mask"]]


def test_mix_probabilities_pick_row_kinds():
    only_passkey = make_train_batch(dataclasses.replace(MIXED, passkey_prob=1.0, mqar_prob=0.0), 0, 0)
    assert _row_kinds(only_passkey) == ["passkey"] * 6
    assert all("What was the passkey?" in detokenize(row) for row in only_passkey["tokens"])
    counts = {"passkey": 0, "mqar": 0, "text": 0}
    for step in range(20):
        for kind in _row_kinds(make_train_batch(MIXED, 3, step)):
            counts[kind] += 1
    # 120 rows at 0.2 / 0.2 / 0.6: each count is far from 0 and from the others' expectations
    assert 8 <= counts["passkey"] <= 40 and 8 <= counts["mqar"] <= 40 and counts["text"] >= 50


def test_validation_covers_each_token_once_and_is_deterministic():
    cfg = DataConfig(corpora="shakespeare", seq_len=1024, batch_size=8)
    stream = corpus_streams("shakespeare", cfg.validation_fraction)["validation"]
    batches = list(validation_batches(cfg))
    assert all(_equal(a, b) for a, b in zip(batches, validation_batches(cfg)))
    windows = (stream.tokens.size - 1) // cfg.seq_len
    assert len(batches) == -(-windows // cfg.batch_size)
    targets = sum(b["loss_mask"].sum() for b in batches)
    boundaries = len(stream.names) - 1
    assert targets == windows * cfg.seq_len - boundaries
    capped = list(validation_batches(cfg, max_batches=3))
    assert len(capped) == 3 and all(b["loss_mask"].sum() == 8 * 1024 - np.sum(b["targets"] == BOS_ID)
                                    for b in capped)


def test_validation_and_train_come_from_disjoint_documents():
    streams = corpus_streams("shakespeare", 0.1)
    assert not set(streams["train"].names) & set(streams["validation"].names)


def test_too_long_seq_len_for_the_validation_split():
    cfg = DataConfig(corpora="shakespeare", seq_len=10_000_000, batch_size=1)
    with pytest.raises(ValueError, match="fewer than seq_len"):
        next(validation_batches(cfg))


@pytest.mark.parametrize("seed, step", [(-1, 0), (0, -2), (0.5, 0)])
def test_bad_seed_or_step(seed, step):
    with pytest.raises(ValueError, match="seed|step"):
        make_train_batch(MIXED, seed, step)


def test_unpacked_rows_are_the_packed_rows_without_segment_ids():
    step = int(np.random.default_rng().integers(1 << 20))
    unpacked = dataclasses.replace(MIXED, packed=False)
    packed_batch = make_train_batch(MIXED, 0, step)
    assert _equal(make_train_batch(unpacked, 0, step),
                  {k: v for k, v in packed_batch.items() if k != "segment_ids"})
    for packed_val, unpacked_val in zip(validation_batches(MIXED, max_batches=1),
                                        validation_batches(unpacked, max_batches=1)):
        assert set(packed_val) - set(unpacked_val) == {"segment_ids"}


def test_packed_must_be_a_bool():
    with pytest.raises(ValueError, match="DataConfig.packed"):
        dataclasses.replace(MIXED, packed="no")
