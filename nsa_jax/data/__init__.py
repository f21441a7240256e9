"""Data for nsa-jax: pure numpy, offline, stateless.

Training and validation (the trainer's whole interface):
    cfg = DataConfig(corpora="shakespeare:1,python_stdlib:1", seq_len=256, batch_size=8,
                     validation_fraction=0.1, passkey_prob=0.0, mqar_prob=0.0, mqar_num_pairs=8)
    make_train_batch(cfg, seed, step, rows=None) -> dict   # tokens, targets, segment_ids: int32
                                                # [B, T]; loss_mask: float32 [B, T]; pure in
                                                # (cfg, seed, step); rows: only those rows
    validation_batches(cfg, corpus=None, max_batches=None) -> Iterator[dict]   # same dict layout
    validation_loss(eval_step, model_state, cfg, max_batches) -> dict  # eval_step(state, batch)
                                                # -> (summed token loss, token count)

Synthetic long-context tasks (training mix and evaluation):
    passkey_example(length, depth, rng, *, num_digits=5, haystack=None) -> SyntheticExample
    mqar_example(length, num_pairs, rng, *, haystack=None) -> SyntheticExample
    examples_to_batch(examples, seq_len=None) -> dict           # loss only on answer tokens
    answer_accuracy(logits_fn, examples, batch_size=8) -> float # exact match; logits_fn(batch) -> [B, T, V]
    answer_hits(logits, examples) -> bool per answer; answer_token_hits: bool per answer token
    padded_batches(examples, batch_size) -> (examples, batch) pairs of one [B, T] shape
    passkey_min_length(num_digits), mqar_min_length(num_pairs); PASSKEY_DIGITS (5)

Text and corpora:
    tokenize(text) / tokenize_document(text) / detokenize(ids); VOCAB_SIZE, PAD_ID, BOS_ID, EOS_ID
    load_documents(name) -> list[Document]    # name in CORPORA: "shakespeare", "python_stdlib"
    split_documents(documents, validation_fraction) -> (train, validation)
    corpus_streams(name, validation_fraction) -> {"train": TokenStream, "validation": TokenStream}
"""
from nsa_jax.data.corpora import CORPORA, Document, load_documents
from nsa_jax.data.data_config import DataConfig
from nsa_jax.data.evaluate import (answer_accuracy, answer_hits, answer_token_hits,
                                   padded_batches, validation_loss)
from nsa_jax.data.packing import examples_to_batch
from nsa_jax.data.sampler import make_train_batch, validation_batches
from nsa_jax.data.splits import split_documents
from nsa_jax.data.streams import TokenStream, corpus_streams
from nsa_jax.data.tasks import (PASSKEY_DIGITS, SyntheticExample, mqar_example, mqar_min_length,
                                passkey_example, passkey_min_length)
from nsa_jax.data.tokenizer import (BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE, detokenize, tokenize,
                                    tokenize_document)

__all__ = [
    "BOS_ID", "CORPORA", "DataConfig", "Document", "EOS_ID", "PAD_ID", "PASSKEY_DIGITS",
    "SyntheticExample", "TokenStream", "VOCAB_SIZE", "answer_accuracy", "answer_hits",
    "answer_token_hits", "corpus_streams", "detokenize", "examples_to_batch", "load_documents",
    "make_train_batch", "mqar_example", "mqar_min_length", "padded_batches", "passkey_example",
    "passkey_min_length", "split_documents", "tokenize", "tokenize_document", "validation_batches",
    "validation_loss",
]
