# Mistral-7B-v0.1's shapes: GQA and a 4096-token sliding window, on top of the InternLM2-7B config.
from internlm2_7b import *  # noqa: F401,F403

JOB_NAME = "mistral_7b"
model_type = "LLAMA2"  # InternEvo's name for the Llama decoder

model = dict(model)  # a copy: the base's dict stays as it is
model.update(
    num_layers=32,
    hidden_size=4096,
    num_attention_heads=32,
    num_kv_attention_heads=8,
    vocab_size=32000,
    intermediate_size=14336,
    rope_base=10000,
    layer_norm_epsilon=1e-5,
    sliding_window=4096,
    max_position_embeddings=32768,
)
data = dict(data, seq_len=8192)
ckpt = dict(ckpt, save_ckpt_folder="local:llm_ckpts/mistral_7b")
