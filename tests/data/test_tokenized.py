"""InternEvo's tokenized format: reading, dataset types, unpacked rows, and every bad input."""

import numpy as np
import pytest

from evo.config import config_from_dict
from evo.data.loader import build_train_loader, build_valid_loaders
from evo.data.packing import IGNORE_INDEX as X
from evo.data.packing import Corpus, PackedRows, UnpackedRows
from evo.data.tokenized import TokenizedCorpus, TokenizedFile, find_types, tokenized_corpus, write_tokenized
from evo.errors import DataError
from evo.parallel.context import ParallelContext
from tests.helpers import run_script, small_sections


def random_docs(n, seed, vocab=300, max_len=50):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, vocab, size=int(rng.integers(1, max_len))).tolist() for _ in range(n)]


def data_cfg(tmp_path, **data):
    return config_from_dict(small_sections(data=dict(type="tokenized", train_folder=str(tmp_path / "train"), **data)))


def test_round_trip_and_packing_equal_the_in_memory_corpus(tmp_path):
    docs_a, docs_b = random_docs(30, 0), random_docs(20, 1)
    write_tokenized(tmp_path / "a.bin", docs_a)
    write_tokenized(tmp_path / "b.bin", docs_b)
    files = [TokenizedFile(tmp_path / "a.bin"), TokenizedFile(tmp_path / "b.bin")]
    assert files[0].tokens(7).tolist() == docs_a[7] and len(files[1]) == 20
    lazy = TokenizedCorpus(files, [0, 1], min_length=3)
    memory = Corpus.from_documents(docs_a + docs_b, [0] * 30 + [1] * 20, min_length=3)
    np.testing.assert_array_equal(lazy.offsets, memory.offsets)
    np.testing.assert_array_equal(lazy.doc_types, memory.doc_types)
    for a, b in zip(PackedRows(lazy, 16, 2), PackedRows(memory, 16, 2)):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_dataset_types_are_sorted_subfolders_with_their_own_losses(tmp_path):
    write_tokenized(tmp_path / "train" / "en" / "part0.bin", random_docs(40, 2))
    write_tokenized(tmp_path / "train" / "code" / "x" / "part0.bin", random_docs(40, 3))
    write_tokenized(tmp_path / "valid" / "code" / "v.bin", random_docs(30, 4))
    write_tokenized(tmp_path / "valid" / "en" / "v.bin", random_docs(30, 5))
    cfg = data_cfg(tmp_path, valid_folder=str(tmp_path / "valid"))
    loader, types = build_train_loader(cfg.data, ParallelContext(), cfg.model.vocab_size)
    assert types == ["code", "en"]
    seen = set()
    for _ in range(10):
        inputs, _ = next(loader)
        seen |= set(inputs["type_ids"].unique().tolist())
    assert seen - {-1} == {0, 1}  # -1: the padding of the epoch's last row
    valid = build_valid_loaders(cfg.data, ParallelContext(), cfg.model.vocab_size)
    assert sorted(valid) == ["code", "en"]


def test_unpacked_rows_one_document_per_slot():
    corpus = Corpus.from_documents([[1, 2, 3], [4, 5, 6, 7, 8, 9], [10, 11], [12]], [0, 1, 0, 1])
    rows = UnpackedRows(corpus, seq_len=4, micro_bsz=2)
    assert len(rows) == 2
    r = rows[0]
    assert r["input_ids"].tolist() == [1, 2, 3, 0, 4, 5, 6, 7]
    assert r["labels"].tolist() == [2, 3, X, X, 5, 6, 7, 8]  # truncated: the last label is the true next token
    assert r["cu_seqlens"].tolist() == [0, 3, 4, 8]
    assert r["type_ids"].tolist() == [0, 0, 0, -1, 1, 1, 1, 1]
    assert r["indexes"].tolist() == [0, 1, 2, 0, 0, 1, 2, 3]


def corrupt_meta(path, row, col, value):
    meta = np.load(str(path) + ".meta")
    meta[row, col] = value
    np.save(str(path) + ".meta.npy", meta)
    (path.parent / (path.name + ".meta.npy")).replace(str(path) + ".meta")


@pytest.mark.parametrize("case, message", [
    ("missing", "data folder '{root}/train' not found"),
    ("empty", "holds no .bin files"),
    ("no_meta", "'{root}/train/a.bin' has no 'a.bin.meta' beside it"),
    ("offset", "'{root}/train/a.bin.meta': document 2 has offset 999999, past the end of 'a.bin'"),
    ("count", "'{root}/train/a.bin': document 1 (byte offset"),
    ("vocab", "'{root}/train/a.bin': document 0 (byte offset 0) has token id 300, not below 'model.vocab_size' (300)"),
    ("min_length", "has no document of at least data.min_length=1000 tokens"),
])
def test_bad_data_is_one_clear_error_naming_the_file(tmp_path, case, message):
    root = tmp_path
    path = root / "train" / "a.bin"
    if case != "missing":
        (root / "train").mkdir()
    if case not in ("missing", "empty"):
        write_tokenized(path, [[300 if case == "vocab" else 5] * 4, [1, 2, 3], [7] * 10])
    if case == "no_meta":
        (root / "train" / "a.bin.meta").unlink()
    if case == "offset":
        corrupt_meta(path, 2, 0, 999999)
    if case == "count":
        corrupt_meta(path, 1, 1, 4)
    extra = {"min_length": 1000} if case == "min_length" else {}
    cfg = data_cfg(tmp_path, **extra)
    with pytest.raises(DataError) as err:
        build_train_loader(cfg.data, ParallelContext(), cfg.model.vocab_size)
    assert message.format(root=root) in str(err.value)


def test_bad_data_from_the_command_line_exits_2(tmp_path):
    (tmp_path / "train").mkdir()
    write_tokenized(tmp_path / "train" / "a.bin", [[5] * 40])
    (tmp_path / "train" / "a.bin.meta").unlink()
    result = run_script("scripts/train.py", "--config", "configs/tiny.py", f"data.train_folder={tmp_path / 'train'}",
                        "data.type='tokenized'", f"monitor.run_folder={tmp_path / 'run'}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"evo: error: '{tmp_path / 'train' / 'a.bin'}' has no 'a.bin.meta' beside it "
        "(InternEvo's index of offsets and counts)")


def test_check_is_remembered_per_dataset(tmp_path):
    write_tokenized(tmp_path / "t" / "a.bin", random_docs(5, 0))
    types = find_types(tmp_path / "t")
    corpus = tokenized_corpus(types, 0, 300, "x")
    marker = corpus._marker(300)
    assert marker.exists()
    write_tokenized(tmp_path / "t" / "a.bin", [[400]])  # rewritten: a new size and mtime, checked again
    with pytest.raises(DataError, match="token id 400"):
        tokenized_corpus(find_types(tmp_path / "t"), 0, 300, "x")


def test_training_on_tokenized_data_reports_each_type(tmp_path):
    import json

    write_tokenized(tmp_path / "train" / "en" / "p.bin", random_docs(60, 2, max_len=200))
    write_tokenized(tmp_path / "train" / "code" / "p.bin", random_docs(60, 3, max_len=200))
    write_tokenized(tmp_path / "valid" / "en" / "v.bin", random_docs(30, 4, max_len=200))
    result = run_script("scripts/train.py", "--config", "configs/tiny.py", "data.type='tokenized'",
                        f"data.train_folder={tmp_path / 'train'}", f"data.valid_folder={tmp_path / 'valid'}",
                        "model.vocab_size=300", "model.num_layers=1", "data.total_steps=2", "data.valid_every=2",
                        "data.use_packed_dataset=False", f"monitor.run_folder={tmp_path / 'run'}",
                        f"ckpt.save_ckpt_folder={tmp_path / 'ckpt'}", "monitor.sample_tokens=4")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert all({"tokens/code", "tokens/en"} <= set(r) for r in steps)
    # the step's loss is a token-weighted mean of the per-type losses (their values: the test below); a type without
    # labelled tokens in a step has no loss key
    for r in steps:
        present = [r[f"loss/{t}"] for t in ("code", "en") if f"loss/{t}" in r and r[f"tokens/{t}"] > 0]
        assert present and min(present) * (1 - 1e-12) <= r["loss"] <= max(present) * (1 + 1e-12)
    assert sum(steps[0][f"tokens/{t}"] for t in ("code", "en")) < 2 * 512  # unpacked rows carry padding
    assert {"val/en_loss", "val/en_acc", "val/en_plex"} <= set(records[-1])


def test_per_type_losses_are_the_per_type_means_of_the_token_losses(tmp_path):
    import copy

    import torch
    import torch.nn.functional as F

    from evo import (TrainerBuilder, build_train_loader_with_data_type, build_valid_loader_with_data_type,
                     initialize_distributed_env, initialize_model_and_parallel_communicator)

    write_tokenized(tmp_path / "train" / "en" / "p.bin", random_docs(60, 2, max_len=40))
    write_tokenized(tmp_path / "train" / "code" / "p.bin", [[d % 7 + 1 for d in doc] for doc in random_docs(60, 3)])
    sections = small_sections(data=dict(type="tokenized", train_folder=str(tmp_path / "train"), total_steps=1),
                              monitor=dict(run_folder=str(tmp_path / "run")))
    initialize_distributed_env(config=sections, launcher="local", seed=3)
    model = initialize_model_and_parallel_communicator()
    train_dl, types = build_train_loader_with_data_type()
    trainer = TrainerBuilder(model, train_dl, build_valid_loader_with_data_type(), dataset_types=types)
    before = copy.deepcopy(trainer.model)
    inputs, labels = next(build_train_loader_with_data_type()[0])  # the same first batch
    record = trainer.train()

    token_losses, token_types = [], []
    with torch.no_grad():
        for i in range(labels.shape[0]):
            logits = before(inputs["input_ids"][i], inputs["cu_seqlens"][i])
            token_losses.append(F.cross_entropy(logits.double(), labels[i], ignore_index=X, reduction="none"))
            token_types.append(torch.where(labels[i] != X, inputs["type_ids"][i], -1))
    token_losses, token_types = torch.cat(token_losses), torch.cat(token_types)
    assert types == ["code", "en"] and set(token_types.tolist()) == {-1, 0, 1}  # both types in the step
    for t, name in enumerate(types):
        expected = float(token_losses[token_types == t].mean())
        assert record[f"loss/{name}"] == pytest.approx(expected, rel=1e-5), name
    assert record["loss"] == pytest.approx(float(token_losses[token_types >= 0].mean()), rel=1e-5)
    assert record["loss/code"] != pytest.approx(record["loss/en"], rel=1e-3)  # swapped or mixed values would show
