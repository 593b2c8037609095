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


def sequence_2d(tp=4, mode="isp", **fields):
    return dict(tensor=dict(size=tp, mode=mode), sequence_2D=dict(dict(enable=True, head_size=1, context_size=tp),
                                                                  **fields))


@pytest.mark.parametrize("parallel, data, line", [
    (sequence_2d(head_size=2), {}, "'parallel.sequence_2D.head_size' (2) x 'parallel.sequence_2D.context_size' (4) "
                                   "must equal 'parallel.tensor.size' (4)"),
    (sequence_2d(mode="msp"), {}, "'parallel.sequence_2D.enable' needs 'parallel.tensor.mode' 'isp'"),
    (sequence_2d(window_size=3), {}, "'parallel.sequence_2D.window_size' (3) must divide "
                                     "'parallel.sequence_2D.context_size' (4)"),
    (sequence_2d(head_size=2, context_size=2, device_placement_strategy=dict(head_first=True, interleaved=True)), {},
     "'parallel.sequence_2D.device_placement_strategy.interleaved' must be False when head_first is True and "
     "head_size (2) > 1"),
    (sequence_2d(tp=8, context_size=8), dict(seq_len=4, micro_bsz=2, packed_length=None),
     "'data.seq_len' x 'data.micro_bsz' (8 tokens a row) is too short for a sequence group of 8 ranks"),
    (sequence_2d(kv_exchange="gather"), {}, "'parallel.sequence_2D.kv_exchange' must be one of ring, all_gather"),
    (sequence_2d(), "compile", "'model.compile' with 'parallel.sequence_2D' is not supported yet"),
    (dict(sequence_2d(tp=2), pipeline=dict(size=2)), "checkpoint",
     "'model.checkpoint' with 'parallel.pipeline.size' > 1 under 'parallel.sequence_2D' is not supported yet"),
    (sequence_2d(tp=4, head_size=4, context_size=1), {}, "'parallel.sequence_2D.head_size' (4) must divide "
                                                        "'model.num_kv_attention_heads' (2)"),
])
def test_bad_sequence_2d_layouts_are_config_errors(parallel, data, line):
    model = {"compile": dict(compile=True), "checkpoint": dict(checkpoint=True)}.get(data, {}) if isinstance(
        data, str) else {}
    data = {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else {}
    with pytest.raises(ConfigError) as err:
        config_from_dict(small_sections(parallel=parallel, data=data, model=model), world_size=8)
    assert str(err.value).startswith(line)


def test_sequence_2d_splits_heads_over_head_size_only():
    """tensor.size 4 with 2 kv heads is valid under sequence_2D when head_size is 1 (InternEvo's rule)."""
    cfg = config_from_dict(small_sections(parallel=sequence_2d()), world_size=4)
    assert cfg.parallel.sequence_2D.context_size == 4
    with pytest.raises(ConfigError, match="'model.sliding_window' .* with 'parallel.sequence_2D.kv_exchange' 'ring'"):
        config_from_dict(small_sections(model=dict(sliding_window=8), parallel=sequence_2d()), world_size=4)
    assert config_from_dict(small_sections(model=dict(sliding_window=8), parallel=sequence_2d(kv_exchange="all_gather")),
                            world_size=4).parallel.sequence_2D.kv_exchange == "all_gather"


@pytest.mark.parametrize("value", ["{'enable': True, 'head_size': 1, 'context_size': 2, 'window_size': 1}",
                                   "dict(enable=True, head_size=1, context_size=2, window_size=3)"])
def test_a_bad_sequence_2d_layout_on_the_command_line_exits_2(tmp_path, value):
    """The section as a literal and as dict(...) on the command line: read (the literal with tensor.mode mtp is
    refused for it; the dict for its window), one line, exit 2, nothing written."""
    mode = "mtp" if "{" in value else "isp"
    result = run_script("scripts/train.py", "--config", "configs/tiny.py", "parallel.tensor.size=2",
                        f"parallel.tensor.mode={mode}", f"parallel.sequence_2D={value}",
                        f"monitor.run_folder={tmp_path / 'run'}")
    line = result.stderr.strip().splitlines()[-1]
    expected = "'parallel.sequence_2D.enable' needs 'parallel.tensor.mode' 'isp'" if "{" in value else \
        "'parallel.sequence_2D.window_size' (3) must divide 'parallel.sequence_2D.context_size' (2)"
    assert result.returncode == 2 and line.startswith(f"evo: error: {expected}"), result.stderr
    assert not (tmp_path / "run").exists()
