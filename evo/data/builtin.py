"""Built-in data: the Python standard library as a real corpus, and InternEvo's random dummy data.

The built-in corpus is the ``.py`` files of the running interpreter's standard library (no
site-packages, no test folders): real text every Python installation has, nothing downloaded. Each
file is one document; a file goes to validation when the CRC32 of its relative path is 0 mod
``VALID_EVERY_NTH``, so the split is fixed for a given installation.
"""

from __future__ import annotations

import functools
import sysconfig
import zlib
from pathlib import Path

import numpy as np

from evo.data.packing import Corpus

VALID_EVERY_NTH = 40
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def stdlib_files(root: str | Path | None = None) -> list[Path]:
    """The standard library's .py files, sorted by relative path."""
    return list(_stdlib_files(Path(root or sysconfig.get_paths()["stdlib"])))


@functools.lru_cache(maxsize=4)  # train and validation splits walk the same tree
def _stdlib_files(root: Path) -> tuple[Path, ...]:
    files = []
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).parts[:-1]
        if any(p in _SKIP_DIRS or p.startswith("test") for p in parts):
            continue
        files.append(path)
    return tuple(sorted(files, key=lambda p: p.relative_to(root).as_posix()))


def is_valid_file(relative_path: str) -> bool:
    return zlib.crc32(relative_path.encode()) % VALID_EVERY_NTH == 0


def split_files(split: str, root: str | Path | None = None) -> list[Path]:
    """The files of the 'train' or 'valid' split."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    return [p for p in stdlib_files(root) if is_valid_file(p.relative_to(root).as_posix()) == (split == "valid")]


def builtin_corpus(split: str, tokenizer, min_length: int = 0, root: str | Path | None = None) -> Corpus:
    """The 'train' or 'valid' split of the standard-library corpus, tokenized, EOS after each file."""
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in split_files(split, root)]
    docs = [ids + [tokenizer.eos_id] for ids in tokenizer.encode_batch(texts)]
    return Corpus.from_documents(docs, 0, min_length)


def dummy_corpus(num_docs: int, seq_len: int, vocab_size: int, seed: int, min_length: int = 0) -> Corpus:
    """InternEvo's random dummy dataset: documents of random length (1 to 2 * seq_len) of random tokens; those
    shorter than ``min_length`` are left out (``data.min_length``, as for every other source)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 2 * seq_len + 1, size=num_docs)
    lengths = lengths[lengths >= min_length]
    num_docs = len(lengths)
    offsets = np.zeros(num_docs + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens = rng.integers(0, vocab_size, size=int(offsets[-1]), dtype=np.int32)
    return Corpus(tokens, offsets, np.zeros(num_docs, dtype=np.int32))
