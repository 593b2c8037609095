# Qwen3-8B's shapes: GQA, per-head RMSNorm on queries and keys, on top of the InternLM2-7B config.
from internlm2_7b import *  # noqa: F401,F403

JOB_NAME = "qwen3_8b"
model_type = "LLAMA2"  # InternEvo's name for the Llama decoder

model = dict(model)  # a copy: the base's dict stays as it is
model.update(
    num_layers=36,
    hidden_size=4096,
    num_attention_heads=32,
    num_kv_attention_heads=8,
    head_dim=128,
    vocab_size=151936,
    intermediate_size=12288,
    rope_base=1000000,
    layer_norm_epsilon=1e-6,
    qk_norm=True,
    max_position_embeddings=40960,
)
data = dict(data, seq_len=4096)
ckpt = dict(ckpt, save_ckpt_folder="local:llm_ckpts/qwen3_8b")
