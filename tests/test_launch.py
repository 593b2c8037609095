import json
import socket

import numpy as np
import pytest

from tests.helpers import run_script
from evo.initialize import ConfigArg, _slurm_master, detect_launcher, parse_args


@pytest.mark.parametrize("env, expected", [
    ({}, "local"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "torch"),
    ({"SLURM_PROCID": "1", "SLURM_NTASKS": "4"}, "slurm"),
    # sbatch + torchrun: both sets present, torchrun's win
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3"}, "torch"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "TORCHELASTIC_RUN_ID": "x"}, "torch"),
])
def test_launcher_detection(env, expected):
    assert detect_launcher(env) == expected


def test_slurm_master_without_scontrol():
    assert _slurm_master("gpu[03-05,09],cpu1") in ("gpu03",)  # first host of the list
    assert _slurm_master("node7") == "node7"


def test_parse_args_carries_overrides_on_the_config_path():
    args = parse_args(["--config", "c.py", "--seed", "5", "--profiling", "data.total_steps=3", "model.dtype=x"])
    assert isinstance(args.config, ConfigArg) and args.config == "c.py"
    assert args.config.overrides == ("data.total_steps=3", "model.dtype=x")
    assert args.seed == 5 and args.profiling and args.launcher is None and args.port == 8888


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dp_config(tmp_path, name, micro_num):
    path = tmp_path / f"{name}.py"
    path.write_text(f"""
model = dict(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=300, multiple_of=32, dtype="torch.float32")
data = dict(type="dummy", seq_len=32, micro_bsz=2, micro_num={micro_num}, total_steps=4, num_dummy_samples=100)
adam = dict(lr=1e-3)
ckpt = dict(save_ckpt_folder="{tmp_path / name / 'ckpt'}", auto_resume=False)
monitor = dict(run_folder="{tmp_path / name}")
""")
    return path


def losses(folder):
    return [json.loads(line)["loss"] for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_torchrun_data_parallel_matches_one_process_with_doubled_micro_num(tmp_path):
    single = run_script("scripts/train.py", "--config", dp_config(tmp_path, "single", 4))
    assert single.returncode == 0, single.stderr
    dp = run_script("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
                    "scripts/train.py", "--config", dp_config(tmp_path, "dp", 2), env={"OMP_NUM_THREADS": "1"})
    assert dp.returncode == 0, dp.stderr
    assert "launcher=torch world_size=2" in dp.stderr
    assert losses(tmp_path / "dp") == pytest.approx(losses(tmp_path / "single"), rel=1e-5)
    assert (tmp_path / "dp" / "ckpt" / "4" / "train_state.pt").is_file()


@pytest.mark.parametrize("env, every_rank, printed", [
    ({}, False, True),
    ({"RANK": "0", "WORLD_SIZE": "2"}, False, True),
    ({"RANK": "1", "WORLD_SIZE": "2"}, False, False),  # the same error on every rank: rank 0 says it
    ({"SLURM_PROCID": "3"}, False, False),
    ({"RANK": "1", "WORLD_SIZE": "2"}, True, True),  # an error only this rank may meet: it says it itself
])
def test_an_input_error_is_printed_once_and_exits_2_on_every_rank(monkeypatch, capsys, tmp_path, env, every_rank,
                                                                   printed):
    from evo.cli import run
    from evo.errors import DataError

    for key in ("RANK", "WORLD_SIZE", "SLURM_PROCID"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / "error.json"))

    def main():
        err = DataError("bad data")
        if every_rank:
            err.every_rank = True
        raise err

    with pytest.raises(SystemExit) as exit_:
        run(main)
    assert exit_.value.code == 2
    assert capsys.readouterr().err == ("evo: error: bad data\n" if printed else "")
    # torchrun's report reads the error file: every rank names the line there, printed or not, so an error met
    # only by a rank other than 0 still reaches the user
    record = json.loads((tmp_path / "error.json").read_text())
    assert record["message"]["extraInfo"]["py_callstack"] == "evo: error: bad data"


def test_a_config_error_under_torchrun_is_printed_once(tmp_path):
    result = run_script("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
                        "scripts/train.py", "--config", "configs/tiny.py", f"data.train_folder={tmp_path}",
                        f"monitor.run_folder={tmp_path / 'run'}", env={"OMP_NUM_THREADS": "1"})
    line = (f"evo: error: 'data.train_folder' '{tmp_path}' holds neither tokenized data (.bin files, from "
            "scripts/tokenize.py) nor .jsonl text, and 'data.type' is 'builtin' (the Python standard library): "
            f"tokenize your text (python scripts/tokenize.py --input TEXT --output {tmp_path} --tokenizer byte) and "
            "add data.type=tokenized")  # issue 24's one line for a folder of no data over the built-in corpus
    lines = result.stderr.splitlines()
    assert result.returncode != 0 and lines[0] == line
    # once from rank 0, then in torchrun's report: the root cause, and rank 1's failure when it exited before
    # torchrun stopped it
    assert sum(line in x for x in lines) in (2, 3)
    assert f"traceback : {line}" in lines[lines.index("Root Cause (first observed failure):") + 1:][6]
    assert not (tmp_path / "run").exists()


def dp_eval_config(tmp_path, name, micro_num, valid_micro_num, data_type="tokenized"):
    """Two layouts' config: tokenized training data (rows, a global order), or streaming (documents dealt to the
    ranks, each rank with its own position); tokenized validation data."""
    from evo.data.tokenized import write_tokenized

    data = tmp_path / "data"
    if not data.exists():
        rng = np.random.default_rng(0)
        for split, n in (("train", 80), ("valid", 40)):
            docs = [rng.integers(1, 300, size=int(rng.integers(2, 60))).tolist() for _ in range(n)]
            write_tokenized(data / split / "web" / "p.bin", docs)
        words = ["alpha", "beta", "gamma", "delta", "x = 1", "def f():", "return"]
        (data / "jsonl" / "web").mkdir(parents=True)
        texts = [" ".join(rng.choice(words, size=int(rng.integers(1, 30)))) for _ in range(200)]
        (data / "jsonl" / "web" / "p.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    train = dict(tokenized=f'train_folder="{data / "train"}"',
                 streaming=f'type="streaming", train_folder="{data / "jsonl"}", tokenizer_path="byte"')[data_type]
    path = tmp_path / f"{name}.py"
    path.write_text(f"""
model = dict(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=300, multiple_of=32, dtype="torch.float32")
data = dict({train}, valid_folder="{data / 'valid'}", seq_len=32, micro_bsz=2, micro_num={micro_num},
            valid_micro_num={valid_micro_num}, total_steps=4, valid_every=2)
adam = dict(lr=1e-3)
lr_scheduler = dict(total_steps=4, warmup_ratio=0.25, eta_min=1e-4)
ckpt = dict(checkpoint_every=2)
monitor = dict(run_folder="{tmp_path / name}")
""")
    return path


def records(folder):
    timing = {"tgs", "tflops"}  # wall-clock measurements differ between runs
    return [{k: v for k, v in json.loads(line).items() if k not in timing}
            for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_data_parallel_resume_and_evaluation_match_uninterrupted_runs(tmp_path):
    def torchrun(config, *overrides):
        result = run_script("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
                            "scripts/train.py", "--config", config, *overrides, env={"OMP_NUM_THREADS": "1"})
        assert result.returncode == 0, result.stderr
        return result

    # resume on 2 ranks, each with its own data position (streaming), against an uninterrupted run
    torchrun(dp_eval_config(tmp_path, "straight", 2, 1, "streaming"))
    stopped = dp_eval_config(tmp_path, "stopped", 2, 1, "streaming")
    torchrun(stopped, "data.total_steps=2")
    assert [r["step"] for r in records(tmp_path / "stopped")] == [1, 2, 2]
    resumed = torchrun(stopped)  # the same command with the full length: it continues from step 2
    assert "loaded model, optimizer, sampler, scheduler from checkpoint" in resumed.stderr
    straight = records(tmp_path / "straight")
    assert [r["step"] for r in straight] == [1, 2, 2, 3, 4, 4]  # steps, with an evaluation at 2 and 4
    assert records(tmp_path / "stopped") == straight  # exact: every loss, norm, lr and evaluation

    # training and evaluation on 2 ranks cover the same rows as one process with twice the batches
    torchrun(dp_eval_config(tmp_path, "dp", 2, 1))
    single = run_script("scripts/train.py", "--config", dp_eval_config(tmp_path, "single", 4, 2))
    assert single.returncode == 0, single.stderr
    one, dp = records(tmp_path / "single"), records(tmp_path / "dp")
    assert [sorted(r) for r in one] == [sorted(r) for r in dp] and "val/web_loss" in one[-1]
    for a, b in zip(one, dp):
        assert a == pytest.approx(b, rel=1e-5)
    assert [r["val/web_acc"] for r in one if "val/web_acc" in r] == [r["val/web_acc"] for r in dp if "val/web_acc" in r]
