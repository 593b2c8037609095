import json
import socket

import pytest

from helpers import run_script
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
