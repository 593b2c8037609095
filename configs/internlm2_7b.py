# InternLM2-7B's shapes (as in InternEvo's configs/7B_internlm2.py). Point data.train_folder at
# InternEvo-format tokenized data to train it.
JOB_NAME = "internlm2_7b"
model_type = "INTERNLM2_PUBLIC"

SEQ_LEN = 4096
HIDDEN_SIZE = 4096
NUM_ATTENTION_HEAD = 32
NUM_KV_ATTENTION_HEAD = 8
MLP_RATIO = 3.5
NUM_LAYER = 32
VOCAB_SIZE = 92544

model = dict(
    num_layers=NUM_LAYER,
    hidden_size=HIDDEN_SIZE,
    num_attention_heads=NUM_ATTENTION_HEAD,
    num_kv_attention_heads=NUM_KV_ATTENTION_HEAD,
    vocab_size=VOCAB_SIZE,
    mlp_ratio=MLP_RATIO,
    multiple_of=256,
    dtype="torch.bfloat16",
    norm_type="rmsnorm",
    layer_norm_epsilon=1e-5,
    rope_base=1000000,
    no_bias=True,
    checkpoint=0.2,
    num_chunks=1,
    embed_split_hidden=True,
    parallel_output=True,
    norm_head=False,
    qk_interleaved=False,
)

data = dict(
    seq_len=SEQ_LEN,
    micro_num=4,
    micro_bsz=1,
    valid_micro_num=4,
    valid_every=1000,
    total_steps=50000,
    min_length=50,
    pack_sample_into_one=False,
    skip_batches="",
)

adam = dict(lr=3e-4, adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8, weight_decay=0.1)
lr_scheduler = dict(total_steps=data["total_steps"], init_steps=0, warmup_ratio=0.01, eta_min=3e-5)
grad_scaler = dict(fp16=dict(initial_scale=2**16, min_scale=1, growth_interval=1000), growth_factor=2,
                   backoff_factor=0.5, max_scale=2**24, hysteresis=2)
hybrid_zero_optimizer = dict(overlap_sync_grad=True, overlap_sync_param=False, reduce_bucket_size=512 * 1024 * 1024,
                             clip_grad_norm=1.0)
loss = dict(label_smoothing=0)
parallel = dict(zero1=dict(size=-1), tensor=dict(size=1, mode="mtp"), pipeline=dict(size=1), weight=dict(size=1))
ckpt = dict(enable_save_ckpt=True, save_ckpt_folder="local:llm_ckpts/internlm2_7b", checkpoint_every=1000,
            auto_resume=True)
