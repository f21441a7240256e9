import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from nsa_jax.data import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE, detokenize, tokenize, tokenize_document


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_round_trip_any_text(text):
    ids = tokenize(text)
    assert ids.max(initial=0) < 256
    assert ids.size == len(text.encode("utf-8"))
    assert detokenize(ids) == text


def test_round_trip_multilingual_and_bytes():
    text = "Ünïcödé — 日本語, emoji 🎭, tabs\tand\r\nnewlines\x00"
    assert detokenize(tokenize(text)) == text
    assert detokenize(tokenize(text.encode("utf-8"))) == text


def test_document_framing_and_specials_dropped():
    doc = tokenize_document("To be")
    assert doc[0] == BOS_ID and doc[-1] == EOS_ID and doc.size == 7
    assert detokenize(np.concatenate([doc, [PAD_ID]])) == "To be"
    assert len({PAD_ID, BOS_ID, EOS_ID}) == 3 and max(PAD_ID, BOS_ID, EOS_ID) == VOCAB_SIZE - 1


def test_decode_invalid_utf8_is_replaced_not_raised():
    assert detokenize([0xE6, 0x97]) == "\ufffd"


@pytest.mark.parametrize("bad", [[-1], [VOCAB_SIZE]])
def test_decode_rejects_out_of_vocab(bad):
    with pytest.raises(ValueError, match="token ids"):
        detokenize(bad)
