import pytest

from nsa_jax.config import from_mapping
from nsa_jax.data import DataConfig, mqar_min_length


def test_corpora_forms_agree():
    expected = (("shakespeare", 3.0), ("python_stdlib", 1.0))
    assert DataConfig(corpora="shakespeare:3, python_stdlib").corpora == expected
    assert DataConfig(corpora={"shakespeare": 3, "python_stdlib": 1}).corpora == expected
    assert DataConfig(corpora=[("shakespeare", 3), ("python_stdlib", 1.0)]).corpora == expected
    hash(DataConfig())  # hashable, so it can key caches


@pytest.mark.parametrize("kwargs, key", [
    (dict(corpora="enwik8"), "corpora"),
    (dict(corpora="shakespeare:0"), "corpora"),
    (dict(corpora="shakespeare:heavy"), "corpora"),
    (dict(corpora="shakespeare,shakespeare"), "corpora"),
    (dict(corpora=""), "corpora"),
    (dict(seq_len=0), "seq_len"),
    (dict(seq_len=256.0), "seq_len"),
    (dict(batch_size=True), "batch_size"),
    (dict(validation_fraction=0.0), "validation_fraction"),
    (dict(validation_fraction=1.0), "validation_fraction"),
    (dict(passkey_prob=-0.1), "passkey_prob"),
    (dict(mqar_prob=float("nan")), "mqar_prob"),
    (dict(passkey_prob=0.6, mqar_prob=0.6), "passkey_prob \\+ mqar_prob"),
    (dict(mqar_num_pairs=0), "mqar_num_pairs"),
    (dict(seq_len=64, passkey_prob=0.1), "passkey_prob > 0 needs seq_len"),
    (dict(seq_len=mqar_min_length(8) - 1, mqar_prob=0.1), "mqar_prob > 0 needs seq_len"),
])
def test_bad_values_name_the_key(kwargs, key):
    with pytest.raises(ValueError, match=f"DataConfig.{key}"):
        DataConfig(**kwargs)


def test_from_mapping_names_the_valid_keys():
    assert from_mapping(DataConfig, {"seq_len": 128}, "data").seq_len == 128
    with pytest.raises(ValueError, match=r"\['seqlen'\] in config section 'data'; valid keys.*seq_len"):
        from_mapping(DataConfig, {"seqlen": 128}, "data")


def test_synthetic_tasks_fit_at_their_minimum_length():
    DataConfig(seq_len=mqar_min_length(8), mqar_prob=0.5, mqar_num_pairs=8)
