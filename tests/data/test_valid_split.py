"""data.valid_split (issue 24): whole documents of the training data held out as the validation set 'valid',
chosen by data.seed alone, never trained on."""

import json
import string

import numpy as np
import pytest

from evo.config import ConfigError, config_from_dict
from evo.data import build_train_loader, build_valid_loaders
from evo.parallel.context import ParallelContext
from tests.helpers import run_script, small_sections, write_config

LETTERS = string.ascii_letters  # document i is one letter repeated: its bytes say which document a token is from


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("split")
    (tmp / "raw.txt").write_text("".join(LETTERS[i] * (5 + 3 * i) + "\n" for i in range(40)))
    result = run_script("scripts/tokenize.py", "--input", tmp / "raw.txt", "--output", tmp / "data",
                        "--tokenizer", "byte")
    assert result.returncode == 0, result.stderr
    return tmp / "data"


def data_config(folder, **data):
    sections = small_sections(data=dict(type="tokenized", train_folder=str(folder), seq_len=16, micro_bsz=1,
                                        micro_num=1, **data), model=dict(vocab_size=258))
    return config_from_dict(sections).data


def letters_in(rows) -> set:
    """The documents (letters) whose tokens appear in any row, padding and EOS left out."""
    seen = set()
    for r in range(len(rows)):
        ids = rows[r]["input_ids"][rows[r]["type_ids"] >= 0]
        seen |= {chr(i) for i in np.unique(ids) if chr(i) in LETTERS}
    return seen


def test_held_out_documents_are_never_trained_on_and_the_split_follows_the_seed(folder):
    ctx = ParallelContext()
    cfg = data_config(folder, valid_split=0.25)
    train, _ = build_train_loader(cfg, ctx, 258)
    valid = build_valid_loaders(cfg, ctx, 258)
    assert list(valid) == ["valid"]
    trained, held = letters_in(train.rows), letters_in(valid["valid"].rows)
    assert len(held) == 10 and trained | held == set(LETTERS[:40]) and not trained & held
    again = letters_in(build_valid_loaders(data_config(folder, valid_split=0.25), ctx, 258)["valid"].rows)
    other = letters_in(build_valid_loaders(data_config(folder, valid_split=0.25, seed=7), ctx, 258)["valid"].rows)
    assert again == held and other != held
    # what is trained on comes in the batches the loader yields too, over more than an epoch
    batches = [next(train) for _ in range(2 * len(train.rows))]
    yielded = {chr(i) for inputs, _ in batches for i in np.unique(inputs["input_ids"]) if chr(i) in LETTERS}
    assert yielded == trained


@pytest.mark.parametrize("data, message", [
    (dict(type="builtin", tokenizer_path="byte", valid_split=0.1), "it has its own validation set"),
    (dict(valid_split=1.0), "'data.valid_split' must be in [0, 1)"),
    (dict(valid_split=0.1, valid_folder="x"), "'data.valid_split' and 'data.valid_folder' both name"),
])
def test_a_split_that_cannot_be_made_is_one_line(data, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        config_from_dict(small_sections(data=data, model=dict(vocab_size=258)))


@pytest.mark.slow  # over 5 s (make test stays under 10 minutes; .ci/run runs it after)
def test_a_run_with_a_split_reports_its_validation_loss(folder, tmp_path):
    config = write_config(tmp_path / "c.py", small_sections(
        data=dict(type="tokenized", train_folder=str(folder), seq_len=16, micro_bsz=1, micro_num=1, total_steps=2,
                  valid_split=0.25, valid_every=1), model=dict(vocab_size=258),
        monitor=dict(run_folder=str(tmp_path / "run"))))
    result = run_script("scripts/train.py", "--config", config)
    assert result.returncode == 0, result.stderr
    evals = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if "val/valid_loss" in line]
    assert [e["step"] for e in evals] == [1, 2] and all(e["val/valid_loss"] > 0 for e in evals)


def test_without_validation_data_the_start_says_no_evaluation_will_run(tmp_path):
    config = write_config(tmp_path / "c.py", small_sections(data=dict(total_steps=1, valid_every=1),
                                                            monitor=dict(run_folder=str(tmp_path / "run"))))
    result = run_script("scripts/train.py", "--config", config)
    assert result.returncode == 0, result.stderr
    assert "no validation data (data.valid_folder, or data.valid_split of the training data): no evaluation will " \
           "run" in result.stderr


def test_a_split_of_fewer_than_two_documents_is_one_line():
    from evo.errors import DataError

    cfg = config_from_dict(small_sections(data=dict(num_dummy_samples=1, valid_split=0.5))).data
    with pytest.raises(DataError, match=r"^data.valid_split=0.5 holds out whole documents, and the training data has 1"):
        build_train_loader(cfg, ParallelContext(), 300)
