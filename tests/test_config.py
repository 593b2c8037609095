import textwrap

import pytest

from tests.helpers import ROOT, run_script, small_sections
from evo.config import config_from_dict, load_config, parse_skip_batches, parse_value
from evo.errors import ConfigError


def test_tiny_config_loads_with_typed_sections():
    cfg = load_config(ROOT / "configs" / "tiny.py")
    assert cfg.JOB_NAME == "tiny"
    assert cfg.model.num_layers == 4 and isinstance(cfg.model.mlp_ratio, float)
    assert cfg.data.type == "builtin"
    assert cfg.lr_scheduler.total_steps == cfg.data.total_steps
    assert cfg.model.kv_heads == 2 and cfg.model.head_dim == 64


def test_base_config_import_and_override(config_file):
    config_file(textwrap.dedent("""
        JOB_NAME = "base"
        model = dict(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=100)
        data = dict(seq_len=16, total_steps=5)
    """), name="base_cfg.py")
    child = config_file(textwrap.dedent("""
        from base_cfg import *
        JOB_NAME = "child"
        model["num_layers"] = 3
    """), name="child.py")
    cfg = load_config(child, ["data.total_steps=20", "data.train_folder=/data/x", "data.type='tokenized'",
                              "adam.lr=3e-4", "monitor.run_folder=out/run"])
    assert cfg.JOB_NAME == "child" and cfg.model.num_layers == 3
    assert cfg.data.total_steps == 20 and cfg.lr_scheduler.total_steps == 20
    assert cfg.data.train_folder == "/data/x"  # not a Python literal: taken as a plain string
    assert cfg.adam.lr == 3e-4 and cfg.monitor.run_folder == "out/run"
    # loading again sees the base unchanged: imports and overrides do not leak between loads
    assert load_config(child).data.total_steps == 5


def test_parallel_int_shorthand_and_nested_override():
    cfg = config_from_dict(small_sections(parallel=dict(tensor=2, pipeline=dict(size=1))))
    assert cfg.parallel.tensor.size == 2 and cfg.parallel.tensor.mode == "mtp"


@pytest.mark.parametrize("sections, message", [
    (dict(model=dict(hidden_size=None)), "'model.hidden_size' must be an int"),
    (dict(data=dict(seq_len="long")), "'data.seq_len' must be an int, got 'long'"),
    (dict(model=dict(hidden_size=66)), "'model.hidden_size' (66) must be divisible by 'model.num_attention_heads' (4)"),
    (dict(model=dict(num_kv_attention_heads=3)), "'model.num_kv_attention_heads' (3) must divide"),
    (dict(model=dict(dtype="torch.int8")), "'model.dtype' must be one of"),
    (dict(data=dict(micro_num=0)), "'data.micro_num' must be >= 1"),
    (dict(data=dict(type="parquet")), "'data.type' must be one of"),
    (dict(data=dict(skip_batches="3-1")), "'data.skip_batches'"),
    (dict(lr_scheduler=dict(warmup_ratio=1.5)), "'lr_scheduler.warmup_ratio' must be in [0, 1]"),
    (dict(grad_scaler=dict(backoff_factor=2.0)), "'grad_scaler.backoff_factor' must be in (0, 1)"),
    (dict(ckpt=dict(load_ckpt_info=dict(path="x", content=("weights",)))), "'ckpt.load_ckpt_info.content' must be one of"),
    (dict(model=dict(checkpoint=2.0)), "'model.checkpoint'"),
    (dict(data=dict(use_packed_dataset="yes")), "'data.use_packed_dataset' must be True or False"),
])
def test_bad_values_name_the_key(sections, message):
    with pytest.raises(ConfigError) as err:
        config_from_dict(small_sections(**sections))
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_required_key():
    raw = small_sections()
    del raw["model"]["vocab_size"]
    with pytest.raises(ConfigError, match=r"'model.vocab_size' is required \(an int\)"):
        config_from_dict(raw)
    with pytest.raises(ConfigError, match="'model' is required"):
        config_from_dict({"data": {}})


def test_unknown_keys_are_errors_naming_the_closest_key_and_known_internevo_keys_are_not(recwarn):
    """Issue 24: a typo does not train the default model; InternEvo's own keys and ALL_CAPS constants pass."""
    raw = small_sections(data=dict(rampup_batch_size=""), model=dict(use_flash_attn=True))
    raw["cudnn_deterministic"] = False
    raw["SEQ_LEN"] = 32
    raw["extra"] = {"notes": "a key of my own", "sweep": [1, 2]}
    cfg = config_from_dict(raw)
    assert cfg.extra == {"notes": "a key of my own", "sweep": [1, 2]} and cfg.to_dict()["extra"] == cfg.extra
    assert not recwarn.list
    for sections, line in [
        (dict(model=dict(num_layer=2)), "unknown config key 'model.num_layer': did you mean 'model.num_layers'?"),
        (dict(adam=dict(weight_decy=0.1)), "unknown config key 'adam.weight_decy': did you mean 'adam.weight_decay'?"),
        (dict(data=dict(my_typo=1)), "unknown config key 'data.my_typo': see docs/config.md for the keys"),
    ]:
        with pytest.raises(ConfigError) as err:
            config_from_dict(small_sections(**sections))
        assert str(err.value).startswith(line) and "'extra'" in str(err.value)
    with pytest.raises(ConfigError, match=r"^unknown config key 'surprise'"):
        config_from_dict({**small_sections(), "surprise": 1})


def test_cli_typo_exits_2_with_the_closest_key_and_trains_nothing(tmp_path):
    result = run_script("scripts/train.py", "--config", "configs/tiny.py", "model.num_layer=2",
                        f"monitor.run_folder={tmp_path}/run")
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("evo: error: unknown config key 'model.num_layer': did you mean 'model.num_layers'?")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("text, value", [
    ("dict(size=2, mode='1F1B')", {"size": 2, "mode": "1F1B"}), ("2**16", 65536), ("8/3", 8 / 3), ("-1", -1),
    ("dict(fp16=dict(initial_scale=2**16), hysteresis=2)", {"fp16": {"initial_scale": 65536}, "hysteresis": 2}),
    ("('model',)", ("model",)), ("[1, 2]", [1, 2]), ("None", None), ("1e-3", 1e-3),
    ("runs/x", "runs/x"), ("tok.json", "tok.json"), ("1F1B", "1F1B"),  # not literals: the plain string
    ("10-20", "10-20"), ("10-20,30-40", "10-20,30-40"), ("2024-12-16", "2024-12-16"), ("1/0", "1/0"),
    ("__import__('os').getcwd()", "__import__('os').getcwd()"), ("dict(**x)", "dict(**x)"),  # parsed, never run
])
def test_command_line_values_are_literals_dict_calls_included_and_never_run(text, value):
    assert parse_value(text) == value and type(parse_value(text)) is type(value)


def test_a_pasted_dict_works_as_an_override_and_a_wrong_one_names_the_dotted_form(config_file):
    path = config_file("model = dict(num_layers=4, hidden_size=64, num_attention_heads=4, vocab_size=100)\n"
                       "data = dict(micro_num=4)\n")
    cfg = load_config(path, ["parallel.pipeline=dict(size=2, mode='ZBH1')", "grad_scaler=dict(fp16=dict("
                                                                               "initial_scale=2**10))"])
    assert (cfg.parallel.pipeline.size, cfg.parallel.pipeline.mode) == (2, "ZBH1")
    assert cfg.grad_scaler.fp16.initial_scale == 1024.0
    with pytest.raises(ConfigError, match=r"^'parallel.pipeline' must be a dict, got 'dict\(size=2': write dict\(\.\.\.\) "
                                          r"with literal values, e.g. parallel.pipeline=dict\(size=\.\.\.\), or set one "
                                          r"key, e.g. parallel.pipeline.size=\.\.\.$"):
        load_config(path, ["parallel.pipeline=dict(size=2"])


def test_internevo_settings_evo_does_not_have_are_accepted_with_a_warning_naming_them(config_file):
    raw = small_sections(adam=dict(lr=1e-3, adam_beta2_c=0),
                         parallel=dict(pipeline=dict(size=1, interleaved_overlap=True),
                                       weight=dict(size=1, overlap=True, memory_pool=True)),
                         lr_scheduler=dict(last_epoch=-1), ckpt=dict(load_ckpt_folder="old/run"),
                         monitor=dict(tensorboard=dict(queue_max_length=10)))
    with pytest.warns(UserWarning) as record:
        cfg = config_from_dict(raw)
    assert sorted(str(w.message) for w in record) == [
        f"config key '{key}' has no effect in evo (InternEvo's; accepted and ignored)"
        for key in ("adam.adam_beta2_c", "ckpt.load_ckpt_folder", "lr_scheduler.last_epoch", "monitor.tensorboard",
                    "parallel.pipeline.interleaved_overlap", "parallel.weight.memory_pool", "parallel.weight.overlap")]
    assert not hasattr(cfg.parallel.pipeline, "interleaved_overlap") and not hasattr(cfg.adam, "adam_beta2_c")
    path = config_file("model = dict(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=100)\n")
    with pytest.warns(UserWarning, match="'parallel.pipeline.interleaved_overlap' has no effect"):
        load_config(path, ["parallel.pipeline.interleaved_overlap=True"])  # an override stays accepted


def test_experts_need_a_moe_model_type(tmp_path):
    assert config_from_dict(small_sections(model=dict(num_experts=1))).model.num_layers == 2  # dense: accepted
    with pytest.raises(ConfigError, match=r"^'model.num_experts' is 4 but model_type 'INTERNLM2_PUBLIC' is a dense"):
        config_from_dict(small_sections(model=dict(num_experts=4)))
    with pytest.raises(ConfigError, match=r"^'model.num_experts' must be >= 1 \(1: a dense model\), got 0"):
        config_from_dict(small_sections(model=dict(num_experts=0)))
    result = run_script("scripts/train.py", "--config", "configs/tiny.py", "model.num_experts=4",
                        f"monitor.run_folder={tmp_path}/run")
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line == ("evo: error: 'model.num_experts' is 4 but model_type 'INTERNLM2_PUBLIC' is a dense model: set "
                    "model_type to one of QWEN3MOE, MIXTRALMOE, QWEN2MOE, INTERNLM_MoE")
    assert not (tmp_path / "run").exists()


def test_bad_overrides(config_file):
    path = config_file("model = dict(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=100)\n")
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(path, ["data.total_steps"])
    with pytest.raises(ConfigError, match="'model.num_layers' is a int, not a section"):
        load_config(path, ["model.num_layers.x=1"])


def test_config_file_errors(config_file, tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.py")
    broken = config_file("model = dict(\n", name="broken.py")
    with pytest.raises(ConfigError, match="failed to execute: SyntaxError"):
        load_config(broken)


def test_skip_batches_parsing():
    assert parse_skip_batches("10-12,30") == {10, 11, 12, 30}
    assert parse_skip_batches("") == set()


def test_cli_bad_config_value_exits_2_with_one_line(tmp_path):
    result = run_script("scripts/train.py", "--config", "configs/tiny.py", "model.hidden_size=258",
                        f"monitor.run_folder={tmp_path}/run")
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()  # the one line, nothing else
    assert line.startswith("evo: error: 'model.hidden_size' (258) must be divisible by 'model.num_attention_heads' (4)")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()  # rejected before any work started


@pytest.mark.parametrize("override, line", [
    ("parallel.tensor.size=2",
     "'parallel.tensor.size' (2) x 'parallel.pipeline.size' (1) must divide the world size (1 process)"),
    # issue 24: the world comes first (a tp of 3 on 1 process is a layout that cannot fit, whatever the heads)
    ("parallel.tensor.size=3", "'parallel.tensor.size' (3) x 'parallel.pipeline.size' (1) must divide the world "
                               "size (1 process)"),
    ("parallel.tensor.mode='xsp'", "'parallel.tensor.mode' must be one of mtp, msp, fsp, isp; got 'xsp'"),
    ("parallel.pipeline.size=8", "'parallel.tensor.size' (1) x 'parallel.pipeline.size' (8) must divide the world "
                                 "size (1 process)"),
    ("parallel.pipeline.size=2", "'parallel.tensor.size' (1) x 'parallel.pipeline.size' (2) must divide the world "
                                 "size (1 process)"),
])
def test_cli_bad_parallel_layout_exits_2_with_one_line(tmp_path, override, line):
    result = run_script("scripts/train.py", "--config", "configs/tiny.py", override, f"monitor.run_folder={tmp_path}/run")
    assert result.returncode == 2
    (printed,) = result.stderr.strip().splitlines()
    assert printed.startswith(f"evo: error: {line}")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("data, message", [
    # issue 24: a train_folder over 'builtin' is the user's own data, read as what it holds, or one line on what to do
    (dict(type="builtin", train_folder="/x"), "'data.train_folder' '/x' holds neither tokenized data"),
    (dict(type="builtin", valid_folder="/v"), "'data.valid_folder' ('/v') is not used with 'data.type' 'builtin'"),
    (dict(type="dummy", train_folder="/x"), "'data.train_folder' ('/x') is not used with 'data.type' 'dummy'"),
    (dict(type="dummy", tokenizer_path="byte"), "'data.tokenizer_path' ('byte') is not used with 'data.type' 'dummy'"),
    (dict(type="tokenized", train_folder="/t", num_dummy_samples=5), "'data.num_dummy_samples' (5) is not used"),
    (dict(type="builtin", max_bad_lines=3), "'data.max_bad_lines' (3) is not used with 'data.type' 'builtin'"),
    (dict(pack_sample_into_one=True, use_packed_dataset=False), "'data.pack_sample_into_one' is True but "
                                                                "'data.use_packed_dataset' is False"),
    (dict(type="streaming", train_folder="/t", max_bad_lines=-1), "'data.max_bad_lines' must be >= 0"),
])
def test_data_keys_the_type_does_not_read_are_errors(data, message):
    with pytest.raises(ConfigError) as err:
        config_from_dict(small_sections(data=data))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_keys_the_type_reads_are_accepted():
    config_from_dict(small_sections(data=dict(type="streaming", train_folder="/t", valid_folder="/v", max_bad_lines=3,
                                              tokenizer_path="byte", min_length=2)))
    config_from_dict(small_sections(data=dict(type="builtin", tokenizer_path="bpe", min_length=2)))
    config_from_dict(small_sections(data=dict(type="tokenized", train_folder="/t", valid_folder="/v",
                                              tokenizer_path="byte", pack_sample_into_one=True)))


def test_cli_conflicting_data_keys_exit_2_naming_both(tmp_path):
    result = run_script("scripts/train.py", "--config", "configs/tiny.py", f"data.train_folder={tmp_path}/nowhere",
                        f"monitor.run_folder={tmp_path}/run")
    assert result.returncode == 2
    # issue 24: over configs/tiny.py's 'builtin', a folder of no data says how to tokenize and what to add
    assert result.stderr.strip().splitlines() == [
        f"evo: error: 'data.train_folder' '{tmp_path}/nowhere' holds neither tokenized data (.bin files, from "
        "scripts/tokenize.py) nor .jsonl text, and 'data.type' is 'builtin' (the Python standard library): tokenize "
        f"your text (python scripts/tokenize.py --input TEXT --output {tmp_path}/nowhere --tokenizer byte) and add "
        "data.type=tokenized"]
    assert not (tmp_path / "run").exists()


def test_folders_derive_from_job_name_unless_set():
    tiny = ROOT / "configs" / "tiny.py"
    cfg = load_config(tiny, ["JOB_NAME=foo"])
    assert cfg.monitor.run_folder == "runs/foo" and cfg.ckpt.save_ckpt_folder == "runs/foo/checkpoints"
    assert cfg.ckpt.auto_resume  # InternEvo's default: the same command continues a stopped run
    cfg = load_config(tiny, ["monitor.run_folder=/x/run"])
    assert cfg.ckpt.save_ckpt_folder == "/x/run/checkpoints"
    cfg = load_config(tiny, ["ckpt.save_ckpt_folder=local:/y/ckpt"])
    assert cfg.monitor.run_folder == "runs/tiny" and cfg.ckpt.save_ckpt_folder == "local:/y/ckpt"
    for name in ("", "a/b", ".."):
        with pytest.raises(ConfigError, match="'JOB_NAME' .* must be a plain folder name"):
            load_config(tiny, [f"JOB_NAME='{name}'"])


def test_the_lr_schedule_follows_data_total_steps():
    cfg = load_config(ROOT / "configs" / "tiny.py", ["data.total_steps=30"])
    assert cfg.lr_scheduler.total_steps == 30


def test_run_differences_compare_what_the_run_computes():
    from evo.run_folder import run_differences

    base = config_from_dict(small_sections()).to_dict()
    same = config_from_dict(small_sections(data=dict(total_steps=9, valid_every=3, skip_batches="2"),
                                           monitor=dict(run_folder="elsewhere", log_every=5),
                                           ckpt=dict(checkpoint_every=2), model=dict(checkpoint=True))).to_dict()
    same["JOB_NAME"], same["source"] = "other", "other.py"
    assert run_differences(base, same) == []
    same_but_lr = config_from_dict(small_sections(adam=dict(lr=2e-3))).to_dict()
    assert run_differences(base, same_but_lr) == []  # a resume may change the lr (the schedule continues with it)
    other = config_from_dict(small_sections(data=dict(seed=5), adam=dict(weight_decay=0.5),
                                            model=dict(dtype="torch.bfloat16"))).to_dict()
    assert run_differences(base, other) == ["model.dtype: 'torch.float32' there, 'torch.bfloat16' here",
                                            "data.seed: 1024 there, 5 here", "adam.weight_decay: 0.01 there, 0.5 here"]
    older = dict(base, model={k: v for k, v in base["model"].items() if k != "head_dim"})
    assert run_differences(older, base) == []  # a key an older evo did not write is not compared


def test_your_own_folder_over_the_builtin_corpus_is_read_as_what_it_holds(tmp_path):
    """Issue 24: data.train_folder on the command line over configs/tiny.py (data.type 'builtin')."""
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match=r"^'data.train_folder' '.*empty' holds neither tokenized data \(.bin files, "
                                          r"from scripts/tokenize.py\) nor .jsonl text.*add data.type=tokenized$"):
        config_from_dict(small_sections(data=dict(type="builtin", tokenizer_path="byte", train_folder=str(empty))))
    for name, kind in (("text/a.jsonl", "streaming"), ("tok/sub/a.bin", "tokenized")):
        (tmp_path / name).parent.mkdir(parents=True)
        (tmp_path / name).write_text("")
        folder = tmp_path / name.split("/")[0]
        with pytest.warns(UserWarning, match=f"is read as data.type='{kind}', what it holds"):
            cfg = config_from_dict(small_sections(data=dict(type="builtin", tokenizer_path="byte",
                                                            train_folder=str(folder))))
        assert cfg.data.type == kind


def test_internevo_sample_config_keys_pass(recwarn):
    """InternEvo's configs/7B_internlm2.py: ckpt.universal_ckpt, and pipeline mode written "1f1b"."""
    cfg = config_from_dict(small_sections(ckpt=dict(universal_ckpt=dict(enable=False, aysnc_save=True)),
                                          parallel=dict(pipeline=dict(size=1, mode="1f1b"))))
    assert cfg.parallel.pipeline.mode == "1F1B" and not recwarn.list
