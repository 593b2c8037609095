# The default job's model as a mixture of experts: each of the 4 layers routes every token to 2 of 8 SwiGLU experts
# (Qwen3-MoE's layout: softmax router, top-k weights renormalised), trained on the built-in corpus like
# configs/tiny.py. The step line shows moe_loss, and metrics.jsonl each layer's expert load (docs/moe.md).
from tiny import *  # noqa: F401,F403

JOB_NAME = "tiny_moe"
model_type = "QWEN3MOE"

model = dict(
    model,  # noqa: F405
    num_experts=8,
    top_k=2,
    moe_type="Dropless",
    moe_intermediate_size=256,  # an expert's width: 2 of 8 active per token
    moe_layer_kwargs=dict(scoring_func="softmax", normalize_expert_weights=True),
)
loss = dict(label_smoothing=0.0, moe_loss_coeff=0.01)
