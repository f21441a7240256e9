import numpy as np
import pytest

from nsa_jax.data import BOS_ID, EOS_ID, Document, DataConfig, detokenize, make_train_batch
from nsa_jax.data.packing import corpus_row, padding_row, renumber_segments, rows_to_batch
from nsa_jax.data.streams import build_stream


def _runs(ids):
    """(start, end) of each maximal run of equal values."""
    cuts = np.flatnonzero(np.diff(ids)) + 1
    return list(zip(np.concatenate([[0], cuts]), np.concatenate([cuts, [ids.size]])))


def test_renumber_segments_neighbours_differ():
    doc_index = np.array([[4, 4, 9, 9, 9, 4, 5], [0, 0, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(renumber_segments(doc_index),
                                  [[1, 1, 2, 2, 2, 3, 4], [1, 1, 1, 1, 1, 1, 1]])


def test_packed_rows_hold_whole_documents_and_never_cross_boundaries():
    rng = np.random.default_rng()
    texts = ["".join(rng.choice(list("abc xyz\n"), size=rng.integers(1, 40))) for _ in range(30)]
    stream = build_stream([Document(f"d{i}", t.encode()) for i, t in enumerate(texts)])
    seq_len = 64
    offsets = rng.integers(stream.tokens.size - seq_len, size=16)
    batch = rows_to_batch([corpus_row(stream, int(o), seq_len) for o in offsets])
    for b, offset in enumerate(offsets):
        tokens, targets = batch["tokens"][b], batch["targets"][b]
        seg, mask = batch["segment_ids"][b], batch["loss_mask"][b]
        np.testing.assert_array_equal(tokens, stream.tokens[offset:offset + seq_len])
        np.testing.assert_array_equal(targets, stream.tokens[offset + 1:offset + seq_len + 1])
        runs = _runs(seg)
        assert seg[0] == 1 and all(seg[s] == i + 1 for i, (s, _) in enumerate(runs))
        # a new segment starts exactly at each BOS (past position 0)
        np.testing.assert_array_equal(np.flatnonzero(np.diff(seg)) + 1,
                                      np.flatnonzero(tokens[1:] == BOS_ID) + 1)
        # no target crosses a document: masked exactly where the target is the next BOS
        np.testing.assert_array_equal(mask == 0, targets == BOS_ID)
        assert np.all(tokens[mask == 0] == EOS_ID)
        for start, end in runs:  # every complete segment is one whole document
            if tokens[start] == BOS_ID and end < seq_len:
                assert detokenize(tokens[start:end]) in texts


def test_stdlib_batches_pack_many_documents():
    cfg = DataConfig(corpora="python_stdlib", seq_len=2048, batch_size=32)
    batch = make_train_batch(cfg, seed=0, step=3)
    seg, mask, targets = batch["segment_ids"], batch["loss_mask"], batch["targets"]
    assert (seg.max(1) > 1).sum() >= 2  # stdlib files are short (median ~8 kB): some rows hold several
    assert np.all((seg[:, 1:] != seg[:, :-1]) == (batch["tokens"][:, 1:] == BOS_ID))
    np.testing.assert_array_equal(mask == 0, targets == BOS_ID)


def test_padding_row_has_no_loss():
    batch = rows_to_batch([padding_row(8)])
    assert batch["loss_mask"].sum() == 0 and np.all(batch["segment_ids"] == 0)


def test_corpus_row_rejects_out_of_range_offset():
    stream = build_stream([Document("a", b"abcdef")])
    with pytest.raises(ValueError, match="offset"):
        corpus_row(stream, 2, 6)
