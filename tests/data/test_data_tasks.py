import re

import numpy as np
import pytest

from nsa_jax.data import (BOS_ID, answer_accuracy, answer_hits, answer_token_hits, detokenize,
                          examples_to_batch, mqar_example, mqar_min_length, passkey_example,
                          passkey_min_length)
from nsa_jax.data.tokenizer import VOCAB_SIZE


@pytest.mark.parametrize("length", [passkey_min_length(), 300, 4096])
@pytest.mark.parametrize("depth", [0.0, 0.13, 0.5, 0.87, 1.0])
def test_passkey_length_depth_and_answer(length, depth):
    rng = np.random.default_rng()
    ex = passkey_example(length, depth, rng)
    assert ex.tokens.size == length and ex.tokens[0] == BOS_ID
    (a_start, a_end), = ex.answer_spans
    (e_start, e_end), = ex.evidence_spans
    assert (a_start, a_end) == (length - 5, length)
    key = detokenize(ex.tokens[a_start:a_end])
    assert re.fullmatch(r"\d{5}", key) and detokenize(ex.tokens[e_start:e_end]) == key
    text = detokenize(ex.tokens)
    assert text.endswith(f"What was the passkey? The passkey is {key}")
    needle_start = text.index(" The passkey is ") + 1  # +1: BOS is dropped by detokenize
    num_filler = length - passkey_min_length()
    assert needle_start == 1 + round(depth * num_filler)
    assert text.count(key) == 2


def test_passkey_in_a_haystack():
    haystack = np.arange(100, 140, dtype=np.int32).repeat(50)
    ex = passkey_example(1000, 0.25, np.random.default_rng(), haystack=haystack)
    (e_start, _), = ex.evidence_spans
    before_key = len(" The passkey is ")
    needle = len(" The passkey is 12345; keep it in mind. ")
    question = len(" What was the passkey? The passkey is 12345")
    filler = np.concatenate([ex.tokens[1:e_start - before_key],
                             ex.tokens[e_start - before_key + needle:-question]])
    assert filler.size == 1000 - passkey_min_length() and np.isin(filler, haystack).all()


def _parse_mqar(text):
    pairs_block, rest = text.split("\n", 1)
    pairs = dict(p.split("=") for p in pairs_block.split(";") if p)
    queries = re.findall(r"\n([a-z]{3})=(\d{3});", "\n" + rest)
    return pairs, queries


@pytest.mark.parametrize("length, num_pairs", [(mqar_min_length(1), 1), (512, 16), (2048, 64)])
def test_mqar_queries_every_key_once_with_its_value(length, num_pairs):
    ex = mqar_example(length, num_pairs, np.random.default_rng())
    assert ex.tokens.size == length and ex.tokens[0] == BOS_ID
    pairs, queries = _parse_mqar(detokenize(ex.tokens))
    assert len(pairs) == num_pairs and sorted(k for k, _ in queries) == sorted(pairs)
    answers = [detokenize(ex.tokens[s:e]) for s, e in ex.answer_spans]
    evidence = [detokenize(ex.tokens[s:e]) for s, e in ex.evidence_spans]
    assert answers == [v for _, v in queries] == evidence
    assert all(pairs[k] == v for k, v in queries)
    assert all(detokenize(ex.tokens[s - 4:s]) == f"{k}=" for (s, _), (k, _) in zip(ex.answer_spans, queries))
    assert ex.answer_mask().sum() == 3 * num_pairs


@pytest.mark.parametrize("make, match", [
    (lambda rng: passkey_example(passkey_min_length() - 1, 0.5, rng), "length must be >="),
    (lambda rng: passkey_example(500, 1.5, rng), "depth"),
    (lambda rng: mqar_example(mqar_min_length(8) - 1, 8, rng), "length must be >="),
    (lambda rng: mqar_example(500, 0, rng), "num_pairs"),
])
def test_bad_task_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make(np.random.default_rng())


def test_generators_are_pure_functions_of_the_rng_state():
    a = mqar_example(400, 8, np.random.default_rng(11))
    b = mqar_example(400, 8, np.random.default_rng(11))
    assert np.array_equal(a.tokens, b.tokens) and a.answer_spans == b.answer_spans


def _oracle_logits(batch):
    """Logits whose argmax is the true next token."""
    logits = np.zeros(batch["targets"].shape + (VOCAB_SIZE,), np.float32)
    np.put_along_axis(logits, batch["targets"][..., None], 1.0, axis=-1)
    return logits


def test_answer_accuracy_exact_match():
    rng = np.random.default_rng()
    examples = [passkey_example(int(rng.integers(100, 400)), rng.random(), rng) for _ in range(5)]
    examples += [mqar_example(300, 4, rng) for _ in range(2)]
    assert answer_accuracy(_oracle_logits, examples, batch_size=3) == 1.0

    def wrong_last_digit_of_first_example(batch):
        logits = _oracle_logits(batch)
        if np.array_equal(batch["tokens"][0, :examples[0].tokens.size - 1], examples[0].tokens[:-1]):
            logits[0, examples[0].tokens.size - 2] = np.roll(logits[0, examples[0].tokens.size - 2], 1)
        return logits
    total_answers = 5 + 2 * 4
    assert answer_accuracy(wrong_last_digit_of_first_example, examples, 3) == (total_answers - 1) / total_answers
    assert answer_accuracy(lambda b: np.zeros(b["tokens"].shape + (VOCAB_SIZE,)), examples) == 0.0


def test_answer_token_hits_mark_each_answer_token():
    rng = np.random.default_rng()
    examples = [passkey_example(120, rng.random(), rng), mqar_example(200, 3, rng)]
    logits = _oracle_logits(examples_to_batch(examples))
    start, end = examples[1].answer_spans[1]
    logits[1, start] = np.roll(logits[1, start], 1)  # the second digit of MQAR answer 1 is wrong
    tokens = answer_token_hits(logits, examples)
    assert [t.tolist() for t in tokens] == [[True] * 5, [True] * 3, [True, False, True],
                                            [True] * 3]
    assert answer_hits(logits, examples).tolist() == [True, True, False, True]


def test_examples_batch_trains_only_the_answers():
    rng = np.random.default_rng()
    examples = [passkey_example(200, 0.3, rng), mqar_example(260, 5, rng)]
    batch = examples_to_batch(examples)
    assert batch["tokens"].shape == (2, 260)
    for b, ex in enumerate(examples):
        np.testing.assert_array_equal(np.flatnonzero(batch["loss_mask"][b]),
                                      np.flatnonzero(ex.answer_mask()) - 1)
        np.testing.assert_array_equal(batch["segment_ids"][b], np.arange(260) < ex.tokens.size)
