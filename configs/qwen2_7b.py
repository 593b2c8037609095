# Qwen2-7B's shapes: GQA, biases on q, k and v (not on the output projection), on top of the InternLM2-7B config.
from internlm2_7b import *  # noqa: F401,F403

JOB_NAME = "qwen2_7b"
model_type = "LLAMA2"  # InternEvo's name for the Llama decoder

model = dict(model)  # a copy: the base's dict stays as it is
model.update(
    num_layers=28,
    hidden_size=3584,
    num_attention_heads=28,
    num_kv_attention_heads=4,
    vocab_size=152064,
    intermediate_size=18944,
    rope_base=1000000,
    layer_norm_epsilon=1e-6,
    qkv_bias=True,
    max_position_embeddings=32768,
)
data = dict(data, seq_len=4096)
ckpt = dict(ckpt, save_ckpt_folder="local:llm_ckpts/qwen2_7b")
