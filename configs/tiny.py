# The default job: a ~3M-parameter InternLM2-style model trained on the built-in corpus (the Python
# standard library, byte-level tokens) on a CPU in about two minutes. `make train` runs it.
# (evo's built-in 4096-token BPE, tokenizer_path="bpe", learns slower at this size: with it, this
# model's validation loss after 400 steps was 65% of its first loss, against 44% with bytes.)
JOB_NAME = "tiny"

SEQ_LEN = 256
HIDDEN_SIZE = 256
NUM_ATTENTION_HEAD = 4
NUM_KV_ATTENTION_HEAD = 2
NUM_LAYER = 4
VOCAB_SIZE = 258  # the byte tokenizer: 256 bytes, BOS, EOS
TOTAL_STEPS = 500

model = dict(
    num_layers=NUM_LAYER,
    hidden_size=HIDDEN_SIZE,
    num_attention_heads=NUM_ATTENTION_HEAD,
    num_kv_attention_heads=NUM_KV_ATTENTION_HEAD,
    vocab_size=VOCAB_SIZE,
    mlp_ratio=8 / 3,
    multiple_of=64,
    dtype="torch.float32",
    layer_norm_epsilon=1e-5,
    rope_base=10000,
    checkpoint=False,
)

data = dict(
    type="builtin",  # the Python standard library of the running interpreter
    tokenizer_path="byte",
    seq_len=SEQ_LEN,
    micro_bsz=2,  # a packed row holds seq_len * micro_bsz tokens
    micro_num=2,  # micro-batches per step (gradient accumulation)
    valid_micro_num=4,
    valid_every=100,
    valid_max_batches=8,
    total_steps=TOTAL_STEPS,
    seed=1024,
)

adam = dict(lr=3e-3, adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8, weight_decay=0.01)
lr_scheduler = dict(warmup_ratio=0.05, eta_min=3e-4)  # over data.total_steps
hybrid_zero_optimizer = dict(clip_grad_norm=1.0)
loss = dict(label_smoothing=0.0)
grad_scaler = dict(fp16=dict(initial_scale=2**16, min_scale=1, growth_interval=1000), growth_factor=2,
                   backoff_factor=0.5, max_scale=2**24, hysteresis=2)
parallel = dict(zero1=dict(size=-1), tensor=dict(size=1, mode="mtp"), pipeline=dict(size=1), weight=dict(size=1))

# The run folder is runs/<JOB_NAME> (JOB_NAME=other on the command line gives another) and checkpoints
# go to its checkpoints/ folder. The same command again continues a stopped run (auto_resume).
ckpt = dict(
    enable_save_ckpt=True,
    checkpoint_every=100,
    keep_latest=2,  # the newest two complete checkpoints (a save on a signal counts); older ones are removed
    auto_resume=True,
)

monitor = dict(sample_prompt="def ", sample_tokens=160)
