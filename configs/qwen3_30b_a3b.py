# Qwen3-30B-A3B's shapes: Qwen3-8B's attention (32 query heads of 128, per-head q/k RMSNorm) in 48 narrower layers,
# each a mixture of 128 experts with 8 active per token (about 3.3B of its 30.5B parameters) (docs/moe.md).
from qwen3_8b import *  # noqa: F401,F403

JOB_NAME = "qwen3_30b_a3b"
model_type = "QWEN3MOE"

model = dict(model)  # a copy: the base's dict stays as it is
model.update(
    num_layers=48,
    hidden_size=2048,
    num_kv_attention_heads=4,
    intermediate_size=6144,  # a dense layer's MLP (none here: every layer is sparse)
    num_experts=128,
    top_k=8,
    moe_type="Dropless",
    moe_intermediate_size=768,
    moe_layer_kwargs=dict(scoring_func="softmax", normalize_expert_weights=True),  # HF's norm_topk_prob=True
)
loss = dict(loss, moe_loss_coeff=0.001)  # HF's router_aux_loss_coef
ckpt = dict(ckpt, save_ckpt_folder="local:llm_ckpts/qwen3_30b_a3b")
