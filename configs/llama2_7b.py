# Llama-2-7B's shapes, written on top of the InternLM2-7B config (a base-config import).
from internlm2_7b import *  # noqa: F401,F403

JOB_NAME = "llama2_7b"
model_type = "LLAMA2"

model = dict(model)  # a copy: the base's dict stays as it is
model.update(
    num_layers=32,
    hidden_size=4096,
    num_attention_heads=32,
    num_kv_attention_heads=32,
    vocab_size=32000,
    mlp_ratio=8 / 3,  # 4096 * 8/3 rounded up to a multiple of 256 = 11008
    multiple_of=256,
    rope_base=10000,
    layer_norm_epsilon=1e-5,
)
data = dict(data, seq_len=4096)
ckpt = dict(ckpt, save_ckpt_folder="local:llm_ckpts/llama2_7b")
