"""A layout that does not fit the world or the model is refused before any collective: one line naming the
keys and the numbers, printed once, exit 2 on every rank."""

import re

import pytest

from tests.helpers import run_script, small_sections
from tests.test_launch import free_port
from evo.config import config_from_dict
from evo.errors import ConfigError
from evo.config import layout_error


@pytest.mark.parametrize("world, pp, tp, zero, line", [
    (2, 1, 4, 1, "'parallel.tensor.size' (4) x 'parallel.pipeline.size' (1) must divide the world size (2 processes)"),
    (6, 1, 4, 1, "'parallel.tensor.size' (4) x 'parallel.pipeline.size' (1) must divide the world size (6 processes)"),
    (8, 1, 2, 3, "'parallel.zero1.size' (3) must divide the data-parallel size (4 = 8 processes / tensor 2 / "
                 "pipeline 1)"),
])
def test_layout_errors_name_the_keys_and_numbers(world, pp, tp, zero, line):
    assert layout_error(world, pp, None, tp, zero).startswith(line)


def test_a_weight_group_must_divide_a_stage():
    assert layout_error(4, 1, None, 2, 1, weight=3) == ("'parallel.weight.size' (3) must divide a pipeline stage's "
                                                        "ranks (4 = data 2 x 'parallel.tensor.size' 2)")
    assert layout_error(4, 1, None, 2, 1, weight=4) is None


@pytest.mark.parametrize("parallel, line", [
    (dict(tensor=dict(size=3)), "'parallel.tensor.size' (3) must divide 'model.num_attention_heads' (4)"),
    (dict(tensor=dict(size=4)), "'parallel.tensor.size' (4) must divide 'model.num_kv_attention_heads' (2)"),
    (dict(tensor=dict(size=3, mode="isp")), "'parallel.tensor.size' (3) must divide 'model.num_attention_heads' (4)"),
    (dict(tensor=dict(size=2, mode="isp"), zero1=2), "'parallel.zero1.size' = 2 with tensor.mode 'isp'"),
    (dict(tensor=dict(size=2, mode="msp"), sequence_parallel=False), "'parallel.sequence_parallel' = False "
                                                                      "contradicts 'parallel.tensor.mode' 'msp'"),
    (dict(weight=dict(size=2)), "'parallel.weight.size' = 2 needs 'parallel.tensor.mode' 'isp'"),
    (dict(timeout_s=0), "'parallel.timeout_s' must be > 0 seconds, got 0"),
])
def test_bad_parallel_keys_are_config_errors(parallel, line):
    with pytest.raises(ConfigError) as err:
        config_from_dict(small_sections(parallel=parallel))
    assert str(err.value).startswith(line)


def test_vocab_that_tp_does_not_divide_is_refused():
    with pytest.raises(ConfigError, match=r"'parallel.tensor.size' \(2\) must divide 'model.vocab_size' \(301\)"):
        config_from_dict(small_sections(model=dict(vocab_size=301), parallel=dict(tensor=dict(size=2))))


def test_sequence_parallel_switch_of_older_configs_means_msp():
    cfg = config_from_dict(small_sections(parallel=dict(tensor=dict(size=2), sequence_parallel=True)))
    assert cfg.parallel.tensor.mode == "msp"


def test_a_layout_error_under_torchrun_is_printed_once_and_every_rank_exits_2(tmp_path):
    result = run_script("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
                        "scripts/train.py", "--config", "configs/tiny.py", "parallel.zero1.size=3",
                        f"monitor.run_folder={tmp_path / 'run'}", env={"OMP_NUM_THREADS": "1"})
    line = ("evo: error: 'parallel.zero1.size' (3) must divide the data-parallel size (2 = 2 processes / tensor 1 / "
            "pipeline 1); -1 or 0 shards over the whole data group, 1 turns ZeRO off")
    # torchrun's own log lines ("W1201 11:52:18.679000 ... closing signal SIGTERM" when one rank ends first) may
    # come before rank 0's line: the first line of evo's is the error
    lines = [x for x in result.stderr.splitlines() if not re.match(r"[WIE]\d{4} \d\d:\d\d:", x)]
    assert result.returncode != 0 and lines[0] == line
    assert lines.count(line) == 1  # printed by rank 0 only; torchrun's report quotes it per rank, as "traceback :"
    assert all(x == line or x.strip() == f"traceback : {line}" for x in lines if line in x)
    assert "exitcode  : 2" in result.stderr and "exitcode  : 1" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_more_processes_on_a_node_than_gpus_is_one_line(monkeypatch, tmp_path):
    import torch

    from evo.initialize import initialize_distributed_env

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for key, value in dict(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1").items():
        monkeypatch.setenv(key, value)
    sections = small_sections(monitor=dict(run_folder=str(tmp_path / "run")))
    with pytest.raises(ConfigError, match=r"^this process is local rank 1 of its node, which has 1 GPU: start at most "
                                          r"1 process per node \(torchrun --nproc_per_node 1; srun"):
        initialize_distributed_env(config=sections, launcher="torch")


def moe_sections(experts=6, compile=False, **parallel):
    return {**small_sections(model=dict(num_experts=experts, top_k=2, compile=compile), parallel=parallel),
            "model_type": "QWEN3MOE"}


@pytest.mark.parametrize("world, parallel, line", [
    (8, dict(expert=dict(size=4)), "'parallel.expert.size' (4) must divide 'model.num_experts' (6): experts are not "
                                   "split"),
    (4, dict(expert=dict(size=3)), "'parallel.expert.size' (3) must divide the data-parallel size (4): expert groups "
                                   "are runs of data ranks"),
    (4, dict(expert=dict(size=2), zero1=dict(size=2)), "'parallel.zero1.size' (2) must be -1 or the data-parallel "
                                                       "size (4) with expert parallelism (InternEvo's rule)"),
    (2, dict(expert=dict(size=0)), "'parallel.expert.size' must be >= 1, or -1"),
    (2, dict(expert=dict(size=2), compile=True), "'model.compile' with 'parallel.expert.size' 2 is not supported yet"),
])
def test_bad_expert_layouts_are_config_errors(world, parallel, line):
    with pytest.raises(ConfigError) as err:
        config_from_dict(moe_sections(**parallel), world_size=world)
    assert str(err.value).startswith(line)
    dense = small_sections(parallel=dict(expert=dict(size=2)))
    with pytest.raises(ConfigError, match=r"'parallel.expert.size' = 2 needs a mixture of experts"):
        config_from_dict(dense, world_size=2)


def test_expert_size_minus_one_is_the_data_ranks_capped_at_the_experts():
    assert config_from_dict(moe_sections(8, expert=dict(size=-1)), world_size=4).parallel.expert.size == 4
    assert config_from_dict(moe_sections(expert=dict(size=-1)), world_size=12).parallel.expert.size == 6  # capped
    assert config_from_dict(moe_sections(), world_size=4).parallel.expert.size == 1  # evo's default: experts whole
    dense = small_sections(parallel=dict(expert=dict(size=-1)))
    assert config_from_dict(dense, world_size=4).parallel.expert.size == 1


def test_a_bad_expert_layout_under_torchrun_exits_2(tmp_path):
    result = run_script("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
                        "scripts/train.py", "--config", "configs/tiny_moe.py", "parallel.expert.size=3",
                        f"monitor.run_folder={tmp_path / 'run'}", env={"OMP_NUM_THREADS": "1"})
    line = ("evo: error: 'parallel.expert.size' (3) must divide 'model.num_experts' (8): experts are not split")
    lines = [x for x in result.stderr.splitlines() if not re.match(r"[WIE]\d{4} \d\d:\d\d:", x)]
    assert lines[0] == line and "exitcode  : 2" in result.stderr and not (tmp_path / "run").exists()
