# Qwen3-30B-A3B's shapes: 48 layers, each a mixture of 128 experts with 8 active per token (about 3.3B of its
# 30.5B parameters), GQA and per-head q/k RMSNorm, on top of the InternLM2-7B config (docs/moe.md).
from internlm2_7b import *  # noqa: F401,F403

JOB_NAME = "qwen3_30b_a3b"
model_type = "QWEN3MOE"

model = dict(model)  # a copy: the base's dict stays as it is
model.update(
    num_layers=48,
    hidden_size=2048,
    num_attention_heads=32,
    num_kv_attention_heads=4,
    head_dim=128,
    vocab_size=151936,
    intermediate_size=6144,  # a dense layer's MLP (none here: every layer is sparse)
    rope_base=1000000,
    layer_norm_epsilon=1e-6,
    qk_norm=True,
    max_position_embeddings=40960,
    num_experts=128,
    top_k=8,
    moe_type="Dropless",
    moe_intermediate_size=768,
    moe_layer_kwargs=dict(scoring_func="softmax", normalize_expert_weights=True),  # HF's norm_topk_prob=True
)
loss = dict(loss, moe_loss_coeff=0.001)  # HF's router_aux_loss_coef
data = dict(data, seq_len=4096)
ckpt = dict(ckpt, save_ckpt_folder="local:llm_ckpts/qwen3_30b_a3b")
