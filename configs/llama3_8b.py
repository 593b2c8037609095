# Llama-3-8B's shapes (Llama 3.1 8B adds the llama3 rotary scaling below), on top of the InternLM2-7B config.
from internlm2_7b import *  # noqa: F401,F403

JOB_NAME = "llama3_8b"
model_type = "LLAMA2"  # InternEvo's name for the Llama decoder

model = dict(model)  # a copy: the base's dict stays as it is
model.update(
    num_layers=32,
    hidden_size=4096,
    num_attention_heads=32,
    num_kv_attention_heads=8,
    vocab_size=128256,
    intermediate_size=14336,
    rope_base=500000,
    layer_norm_epsilon=1e-5,
    max_position_embeddings=8192,
    # Llama 3.1: rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
    #                              original_max_position_embeddings=8192), max_position_embeddings=131072
)
data = dict(data, seq_len=8192)
ckpt = dict(ckpt, save_ckpt_folder="local:llm_ckpts/llama3_8b")
