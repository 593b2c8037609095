import json

import pytest

from evo.config import config_from_dict
from evo.data.loader import build_train_loader
from evo.data.packing import Corpus, PackedRows
from evo.data.tokenizer import ByteTokenizer
from evo.errors import DataError
from evo.monitor import logger, setup_logging
from evo.parallel.context import ParallelContext
from tests.helpers import small_sections


def write_jsonl(path, texts):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


def texts(n, seed):
    return [f"document {seed}-{i}: " + "abc " * (i % 7 + 1) for i in range(n)]


def loader_for(tmp_path, ctx=None, **data):
    cfg = config_from_dict(small_sections(data=dict(type="streaming", train_folder=str(tmp_path / "train"),
                                                    tokenizer_path="byte", seq_len=16, micro_bsz=2, micro_num=2,
                                                    **data)))
    return build_train_loader(cfg.data, ctx or ParallelContext(), cfg.model.vocab_size)


def test_streaming_packs_like_the_indexed_corpus(tmp_path):
    a, b = texts(30, 1), texts(20, 2)
    write_jsonl(tmp_path / "train" / "code" / "x.jsonl", a)
    write_jsonl(tmp_path / "train" / "en" / "y.jsonl", b)
    loader, types = loader_for(tmp_path)
    assert types == ["code", "en"]
    tok = ByteTokenizer()
    docs = [tok.encode(t) + [tok.eos_id] for t in a + b]
    expected = PackedRows(Corpus.from_documents(docs, [0] * 30 + [1] * 20), 16, 2)
    for step in range(4):
        inputs, labels = next(loader)
        for i in range(2):
            row = expected[2 * step + i]
            assert inputs["input_ids"][i].tolist() == row["input_ids"].tolist()
            assert labels[i].tolist() == row["labels"].tolist()
            assert inputs["cu_seqlens"][i].tolist() == row["cu_seqlens"].tolist()
            assert inputs["type_ids"][i].tolist() == row["type_ids"].tolist()


def test_ranks_read_disjoint_shares_and_resume_where_they_stopped(tmp_path):
    write_jsonl(tmp_path / "train" / "x.jsonl", texts(60, 3))
    ranks = [loader_for(tmp_path, ParallelContext(world_size=2, rank=k, dp_size=2))[0] for k in range(2)]
    first = [next(r)[0]["input_ids"] for r in ranks]
    assert not (first[0] == first[1]).all()
    state = ranks[0].state_dict()
    expected = [next(ranks[0])[0]["input_ids"].tolist() for _ in range(20)]  # crosses into the next epoch
    resumed = loader_for(tmp_path, ParallelContext(world_size=2, rank=0, dp_size=2))[0]
    resumed.load_state_dict(state)
    assert [next(resumed)[0]["input_ids"].tolist() for _ in range(20)] == expected
    with pytest.raises(DataError, match="resume it with the same number"):
        loader_for(tmp_path)[0].load_state_dict(state)


def test_streaming_without_documents_is_a_clear_error(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "x.jsonl").write_text('{"content": "no text key"}\n\n')
    loader, _ = loader_for(tmp_path, max_bad_lines=1)
    with pytest.raises(DataError, match="holds no document for data-parallel rank 0") as err:
        next(loader)
    assert err.value.every_rank  # only some ranks may meet it: each that does prints it (evo.cli)


@pytest.mark.parametrize("line, why", [
    ('{"text": "cut sh', "not JSON"),
    ('["text", "a list"]', "not a JSON object with a string under 'text'"),
    ('{"content": "another key"}', "not a JSON object with a string under 'text'"),
    ('{"text": 42}', "not a JSON object with a string under 'text'"),
])
def test_a_malformed_line_is_an_error_naming_file_and_line(tmp_path, line, why):
    good = [json.dumps({"text": t}) for t in texts(5, 6)]
    path = tmp_path / "train" / "x.jsonl"
    path.parent.mkdir()
    path.write_text("\n".join(good[:3] + ["", line] + good[3:]) + "\n")  # a blank line is not malformed
    loader, _ = loader_for(tmp_path)
    with pytest.raises(DataError) as err:
        for _ in range(10):
            next(loader)
    assert str(err.value).startswith(f"{path}:5: {why}")
    assert "(bad line 1, data.max_bad_lines=0: raise it" in str(err.value) and "\n" not in str(err.value)


def test_max_bad_lines_skips_that_many_counts_them_once_and_logs_each(tmp_path, caplog):
    docs = texts(12, 7)
    lines = [json.dumps({"text": t}) for t in docs]
    lines[2], lines[7] = "not json", '{"id": 7}'
    setup_logging(None, True)  # as in a run: evo's logger does not propagate
    path = tmp_path / "train" / "x.jsonl"
    path.parent.mkdir()
    path.write_text("\n".join(lines) + "\n")
    kept = [t for i, t in enumerate(docs) if i not in (2, 7)]
    clean = tmp_path / "clean"
    write_jsonl(clean / "train" / "x.jsonl", kept)
    logger.addHandler(caplog.handler)  # evo's logger does not propagate to the root logger caplog watches
    try:
        loader, _ = loader_for(tmp_path, max_bad_lines=2)
        reference, _ = loader_for(clean)
        for _ in range(15):  # several epochs: the same two lines met again are not counted again
            assert next(loader)[0]["input_ids"].tolist() == next(reference)[0]["input_ids"].tolist()
    finally:
        logger.removeHandler(caplog.handler)
    assert loader.state_dict()["bad_lines"] == 2
    warnings = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert warnings == [f"data: skipped {path}:3: not JSON (Expecting value: line 1 column 1 (char 0)) "
                        "(bad line 1 of data.max_bad_lines=2)",
                        f"data: skipped {path}:8: not a JSON object with a string under 'text' "
                        "(bad line 2 of data.max_bad_lines=2)"]
    one_allowed, _ = loader_for(tmp_path, max_bad_lines=1)
    with pytest.raises(DataError, match=f"^{path}:8: .* \\(bad line 2, data.max_bad_lines=1: "):
        for _ in range(15):
            next(one_allowed)


def test_the_bad_line_count_continues_across_a_resume(tmp_path):
    lines = [json.dumps({"text": t}) for t in texts(40, 8)]
    lines[1] = lines[30] = "{"
    path = tmp_path / "train" / "x.jsonl"
    path.parent.mkdir()
    path.write_text("\n".join(lines) + "\n")
    loader, _ = loader_for(tmp_path, max_bad_lines=1)
    next(loader)
    state = loader.state_dict()
    assert state["bad_lines"] == 1 and state["line"] < 31
    resumed, _ = loader_for(tmp_path, max_bad_lines=1)
    resumed.load_state_dict(state)
    with pytest.raises(DataError, match=f"^{path}:31: not JSON"):
        for _ in range(20):
            next(resumed)
    del state["line"]  # a checkpoint from before line numbers: counted from the offset
    again, _ = loader_for(tmp_path, max_bad_lines=1)
    again.load_state_dict(state)
    with pytest.raises(DataError, match=f"^{path}:31: not JSON"):
        for _ in range(20):
            next(again)


@pytest.mark.slow  # over 15 s on the 2-core machine; .ci/run runs it after `make test`
def test_streaming_run_stopped_and_resumed_matches_an_uninterrupted_one(tmp_path):
    from tests.helpers import run_script
    from tests.resume import assert_resumed, read_records

    write_jsonl(tmp_path / "train" / "x.jsonl", texts(200, 4))

    def train(name, steps):
        return run_script("scripts/train.py", "--config", "configs/tiny.py", "data.type='streaming'",
                          f"data.train_folder={tmp_path / 'train'}", "model.num_layers=1", "model.hidden_size=64",
                          "model.num_kv_attention_heads=4", f"data.total_steps={steps}", "lr_scheduler.total_steps=6",
                          "data.valid_every=0", "ckpt.auto_resume=True", f"monitor.run_folder={tmp_path / name}",
                          f"ckpt.save_ckpt_folder={tmp_path / name / 'ckpt'}", "monitor.sample_prompt=None")

    def losses(name):
        return [(r["step"], r["loss"]) for r in read_records(tmp_path / name / "metrics.jsonl") if "loss" in r]

    assert train("straight", 6).returncode == 0
    first = train("resumed", 3)
    assert first.returncode == 0, first.stderr
    before = read_records(tmp_path / "resumed" / "metrics.jsonl")
    second = train("resumed", 6)
    assert second.returncode == 0, second.stderr
    assert_resumed(second.stderr, tmp_path / "resumed" / "ckpt" / "3", before,
                   read_records(tmp_path / "resumed" / "metrics.jsonl"))
    # same batches after the resume: the same losses, bit for bit
    assert losses("resumed") == losses("straight")


def test_a_hugging_face_dataset_streams_like_the_same_jsonl(tmp_path):
    datasets = pytest.importorskip("datasets")  # in the dev extra: CI has it
    docs = texts(50, 5)
    datasets.Dataset.from_dict({"text": docs, "id": list(range(50))}).save_to_disk(str(tmp_path / "hf"))
    write_jsonl(tmp_path / "train" / "x.jsonl", docs)
    from_jsonl, _ = loader_for(tmp_path)
    cfg = config_from_dict(small_sections(data=dict(type="streaming", train_folder=str(tmp_path / "hf"),
                                                    tokenizer_path="byte", seq_len=16, micro_bsz=2, micro_num=2)))
    from_hf, types = build_train_loader(cfg.data, ParallelContext(), cfg.model.vocab_size)
    assert types == ["hf"]
    for _ in range(3):
        next(from_hf)
    state = from_hf.state_dict()
    expected = [next(from_hf)[0]["input_ids"].tolist() for _ in range(30)]  # wraps into the next epoch
    for _ in range(3):
        next(from_jsonl)
    assert [next(from_jsonl)[0]["input_ids"].tolist() for _ in range(30)] == expected
    resumed, _ = build_train_loader(cfg.data, ParallelContext(), cfg.model.vocab_size)
    resumed.load_state_dict(state)
    assert [next(resumed)[0]["input_ids"].tolist() for _ in range(30)] == expected
