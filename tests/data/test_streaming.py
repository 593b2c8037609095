import json

import pytest

from evo.config import config_from_dict
from evo.data.loader import build_train_loader
from evo.data.packing import Corpus, PackedRows
from evo.data.tokenizer import ByteTokenizer
from evo.errors import DataError
from evo.parallel.context import ParallelContext
from helpers import small_sections


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
    ranks = [loader_for(tmp_path, ParallelContext(world_size=2, rank=k, dp_size=2, dp_rank=k))[0] for k in range(2)]
    first = [next(r)[0]["input_ids"] for r in ranks]
    assert not (first[0] == first[1]).all()
    state = ranks[0].state_dict()
    expected = [next(ranks[0])[0]["input_ids"].tolist() for _ in range(20)]  # crosses into the next epoch
    resumed = loader_for(tmp_path, ParallelContext(world_size=2, rank=0, dp_size=2, dp_rank=0))[0]
    resumed.load_state_dict(state)
    assert [next(resumed)[0]["input_ids"].tolist() for _ in range(20)] == expected
    with pytest.raises(DataError, match="resume it with the same number"):
        loader_for(tmp_path)[0].load_state_dict(state)


def test_streaming_without_documents_is_a_clear_error(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "x.jsonl").write_text('{"content": "no text key"}\n')
    loader, _ = loader_for(tmp_path)
    with pytest.raises(DataError, match="holds no document for data-parallel rank 0"):
        next(loader)


def test_streaming_run_stopped_and_resumed_matches_an_uninterrupted_one(tmp_path):
    from helpers import run_script

    write_jsonl(tmp_path / "train" / "x.jsonl", texts(200, 4))

    def train(name, steps):
        return run_script("scripts/train.py", "--config", "configs/tiny.py", "data.type='streaming'",
                          f"data.train_folder={tmp_path / 'train'}", "model.num_layers=1", "model.hidden_size=64",
                          "model.num_kv_attention_heads=4", f"data.total_steps={steps}", "lr_scheduler.total_steps=6",
                          "data.valid_every=0", "ckpt.auto_resume=True", f"monitor.run_folder={tmp_path / name}",
                          f"ckpt.save_ckpt_folder={tmp_path / name / 'ckpt'}", "monitor.sample_prompt=None")

    def losses(name):
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}

    assert train("straight", 6).returncode == 0
    first = train("resumed", 3)
    assert first.returncode == 0, first.stderr
    second = train("resumed", 6)
    assert second.returncode == 0, second.stderr
    assert "loaded model, optimizer, sampler, scheduler" in second.stderr
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
