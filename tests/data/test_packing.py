import numpy as np
import pytest
import torch

from evo.data.loader import TrainLoader
from evo.data.packing import IGNORE_INDEX as X
from evo.data.packing import Corpus, PackedRows, collate
from evo.parallel.context import ParallelContext


def rows_of(docs, seq_len, micro_bsz, types=0, pack_sample_into_one=False, min_length=0):
    return PackedRows(Corpus.from_documents(docs, types, min_length), seq_len, micro_bsz, pack_sample_into_one)


def test_documents_packed_with_boundaries_indexes_and_labels():
    # docs of 3, 5 and 6 tokens; rows of seq_len 4 x micro_bsz 2 = 8 tokens
    docs = [[10, 11, 12], [20, 21, 22, 23, 24], [30, 31, 32, 33, 34, 35]]
    rows = rows_of(docs, seq_len=4, micro_bsz=2, types=[0, 1, 1])
    assert len(rows) == 2  # 14 tokens: a full row and a padded one
    r = rows[0]
    assert r["input_ids"].tolist() == [10, 11, 12, 20, 21, 22, 23, 24]
    # doc 1 (5 tokens) is longer than seq_len: split into 4 + 1
    assert r["cu_seqlens"].tolist() == [0, 3, 7, 8]
    assert r["indexes"].tolist() == [0, 1, 2, 0, 1, 2, 3, 0]
    # next token; -100 at each document's end; the split inside a document keeps the true next token
    assert r["labels"].tolist() == [11, 12, X, 21, 22, 23, 24, X]
    assert r["type_ids"].tolist() == [0, 0, 0, 1, 1, 1, 1, 1]
    last = rows[1]  # the third document's 6 tokens, then 2 of padding (its own segment)
    assert last["input_ids"].tolist() == [30, 31, 32, 33, 34, 35, 0, 0]
    assert last["labels"].tolist() == [31, 32, 33, 34, 35, X, X, X]
    assert last["cu_seqlens"].tolist() == [0, 4, 6, 8]
    assert last["type_ids"].tolist() == [1, 1, 1, 1, 1, 1, -1, -1]


def test_row_end_label_is_true_next_token_and_continuation_restarts_positions():
    docs = [list(range(100, 112)), [7, 8]]  # 12 + 2 tokens, rows of 6
    rows = rows_of(docs, seq_len=6, micro_bsz=1)
    assert len(rows) == 3  # 12 tokens in two full rows, and 2 in a padded third
    first, second = rows[0], rows[1]
    assert first["labels"].tolist() == [101, 102, 103, 104, 105, 106]  # last label continues into row 2
    assert second["input_ids"].tolist() == [106, 107, 108, 109, 110, 111]
    assert second["labels"].tolist() == [107, 108, 109, 110, 111, X]
    assert second["cu_seqlens"].tolist() == [0, 6] and second["indexes"].tolist() == list(range(6))
    assert rows[2]["input_ids"].tolist() == [7, 8, 0, 0, 0, 0] and rows[2]["labels"].tolist() == [8, X, X, X, X, X]


def test_pack_sample_into_one_has_fixed_boundaries():
    docs = [[1, 2, 3], [4, 5, 6, 7, 8], [9, 10, 11, 12]]
    r = rows_of(docs, seq_len=4, micro_bsz=3, pack_sample_into_one=True)[0]
    assert r["cu_seqlens"].tolist() == [0, 4, 8, 12]
    assert r["indexes"].tolist() == [0, 1, 2, 3] * 3
    assert r["labels"].tolist() == [2, 3, X, 5, 6, 7, 8, X, 10, 11, 12, X]


def test_negative_tokens_are_input_only():
    docs = [[-1, -2, 3, 4, -5, 6]]
    r = rows_of(docs, seq_len=6, micro_bsz=1)[0]
    assert r["input_ids"].tolist() == [1, 2, 3, 4, 5, 6]
    assert r["labels"].tolist() == [X, 3, 4, X, 6, X]


def test_min_length_drops_short_documents():
    rows = rows_of([[1], [2, 3, 4], [5, 6]], seq_len=5, micro_bsz=1, min_length=2)
    assert len(rows) == 1 and rows[0]["input_ids"].tolist() == [2, 3, 4, 5, 6]


def test_collate_builds_internevo_batch():
    rows = rows_of([[1, 2, 3, 4], [5, 6, 7, 8]], seq_len=4, micro_bsz=1)
    inputs, labels = collate([rows[0], rows[1]])
    assert inputs["input_ids"].shape == (2, 4) and labels.shape == (2, 4)
    assert isinstance(inputs["cu_seqlens"], list) and inputs["cu_seqlens"][0].dtype == torch.int32
    assert set(inputs) == {"input_ids", "cu_seqlens", "indexes", "type_ids"}


def _stream(loader, steps):
    return [tuple(next(loader)[0]["input_ids"][:, 0].tolist()) for _ in range(steps)]


def test_sampler_is_seeded_covers_each_epoch_and_resumes_exactly():
    rows = rows_of([[i] * 4 for i in range(10)], seq_len=4, micro_bsz=1)  # 10 rows, row r starts with r
    ctx = ParallelContext()
    a = TrainLoader(rows, micro_num=2, ctx=ctx, seed=3)
    firsts = [t for step in _stream(a, 5) for t in step]
    assert sorted(firsts) == list(range(10))  # one epoch = every row once
    assert firsts != list(range(10))  # shuffled
    b = TrainLoader(rows, micro_num=2, ctx=ctx, seed=3)
    _stream(b, 3)
    state = b.state_dict()
    c = TrainLoader(rows, micro_num=2, ctx=ctx, seed=3)
    c.load_state_dict(state)
    assert _stream(c, 4) == _stream(b, 4)  # crosses into the next epoch too


def test_data_parallel_ranks_split_the_same_global_batch():
    rows = rows_of([[i] * 4 for i in range(12)], seq_len=4, micro_bsz=1)
    single = TrainLoader(rows, micro_num=4, ctx=ParallelContext(), seed=0)
    ranks = [TrainLoader(rows, micro_num=2, ctx=ParallelContext(world_size=2, rank=k, dp_size=2), seed=0)
             for k in range(2)]
    for _ in range(4):
        whole = next(single)[0]["input_ids"][:, 0].tolist()
        parts = [next(r)[0]["input_ids"][:, 0].tolist() for r in ranks]
        assert whole == parts[0] + parts[1]


def test_skip_batches_skips_by_batch_index():
    rows = rows_of([[i] * 4 for i in range(10)], seq_len=4, micro_bsz=1)
    plain = _stream(TrainLoader(rows, 1, ParallelContext(), seed=1), 6)
    skipping = _stream(TrainLoader(rows, 1, ParallelContext(), seed=1, skip_batches="1-2"), 4)
    assert skipping == [plain[0], plain[3], plain[4], plain[5]]


def test_builtin_corpus_split_is_deterministic_and_disjoint():
    import sysconfig

    from evo.data.builtin import builtin_corpus, split_files, stdlib_files
    from evo.data.tokenizer import ByteTokenizer
    from tests.helpers import run_script

    files = stdlib_files()
    assert len(files) > 100 and not any("site-packages" in p.parts for p in files)
    train, valid = split_files("train"), split_files("valid")
    assert set(train).isdisjoint(valid)  # disjoint
    assert sorted(train + valid) == sorted(files) and len(train + valid) == len(files)  # complete, no file twice
    assert 0 < len(valid) < len(files) / 10
    # repeatable: the same split in another process with another string-hash seed (a hash() would differ)
    root = sysconfig.get_paths()["stdlib"]
    code = ("from evo.data.builtin import split_files; "
            f"print('\\n'.join(p.relative_to({root!r}).as_posix() for p in split_files('valid')))")
    other = run_script("-c", code, env={"PYTHONHASHSEED": "12345"})
    assert other.returncode == 0, other.stderr
    assert other.stdout.split() == [p.relative_to(root).as_posix() for p in valid]
    corpus = builtin_corpus("valid", ByteTokenizer())
    assert corpus.num_tokens > 10_000 and len(corpus.offsets) - 1 == len(valid)
    assert np.all(corpus.tokens[corpus.offsets[1:] - 1] == ByteTokenizer.eos_id)  # EOS ends each document


@pytest.mark.parametrize("text", ["def f(x):\n    return x  # ü", ""])
def test_byte_tokenizer_round_trip(text):
    from evo.data.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    assert tok.decode(tok.encode(text)) == text


def test_builtin_bpe_trains_from_a_cold_cache_then_loads_from_it(tmp_path, monkeypatch):
    from evo.data.tokenizer import BPE_VOCAB_SIZE, builtin_bpe_path, load_tokenizer

    monkeypatch.setenv("EVO_CACHE_DIR", str(tmp_path / "cache"))
    assert not (tmp_path / "cache").exists()
    tok = load_tokenizer("bpe")
    path = builtin_bpe_path()
    assert path.is_file() and path.is_relative_to(tmp_path / "cache")
    assert tok.vocab_size == BPE_VOCAB_SIZE and tok.eos_id is not None and tok.bos_id is not None
    text = "def main(argv):\n    return sorted(argv)  # ünïcode"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert len(ids) < len(text.encode()) / 2  # it learned merges, not bytes
    mtime = path.stat().st_mtime_ns
    again = load_tokenizer("bpe")  # from the cache: not trained again
    assert path.stat().st_mtime_ns == mtime and again.encode(text) == ids


def test_resume_with_another_data_parallel_size_continues_exactly():
    rows = rows_of([[i] * 4 for i in range(40)], seq_len=4, micro_bsz=1)
    single = TrainLoader(rows, micro_num=4, ctx=ParallelContext(), seed=5)
    for _ in range(3):
        next(single)
    state = single.state_dict()
    expected = [next(single)[0]["input_ids"][:, 0].tolist() for _ in range(4)]
    ranks = [TrainLoader(rows, micro_num=2, ctx=ParallelContext(world_size=2, rank=k, dp_size=2), seed=5)
             for k in range(2)]
    for r in ranks:
        r.load_state_dict(state)  # same global batch (4 rows), split over two ranks
    got = [sum((next(r)[0]["input_ids"][:, 0].tolist() for r in ranks), []) for _ in range(4)]
    assert got == expected


def test_resume_with_another_global_batch_warns_and_keeps_the_position():
    rows = rows_of([[i] * 4 for i in range(40)], seq_len=4, micro_bsz=1)
    a = TrainLoader(rows, micro_num=2, ctx=ParallelContext(), seed=5)
    for _ in range(3):
        next(a)
    state = a.state_dict()
    following = [t for _ in range(2) for t in next(a)[0]["input_ids"][:, 0].tolist()]  # the next 4 rows
    b = TrainLoader(rows, micro_num=4, ctx=ParallelContext(), seed=5)
    with pytest.warns(UserWarning, match="global batch changed from 2 to 4 rows"):
        b.load_state_dict(state)
    assert next(b)[0]["input_ids"][:, 0].tolist() == following  # no row repeated or skipped


def test_dummy_data_honours_min_length():
    from evo.data.builtin import dummy_corpus

    full, long = dummy_corpus(200, 16, 300, seed=1), dummy_corpus(200, 16, 300, seed=1, min_length=10)
    lengths = np.diff(full.offsets)
    assert np.array_equal(np.diff(long.offsets), lengths[lengths >= 10]) and 0 < len(long.offsets) - 1 < 200
    assert len(long.doc_types) == len(long.offsets) - 1
