# Mixtral-8x7B-v0.1's shapes: Mistral-7B's attention (without its window) with each MLP a mixture of 8 experts,
# 2 active per token (about 12.9B of its 46.7B parameters) (docs/moe.md).
from mistral_7b import *  # noqa: F401,F403

JOB_NAME = "mixtral_8x7b"
model_type = "MIXTRALMOE"

model = dict(model)  # a copy: the base's dict stays as it is
model.update(
    sliding_window=None,
    rope_base=1000000,
    num_experts=8,
    top_k=2,
    moe_type="Dropless",
    moe_intermediate_size=14336,  # each expert as wide as Mistral-7B's MLP
    moe_layer_kwargs=dict(scoring_func="softmax", normalize_expert_weights=True),  # Mixtral renormalises always
)
loss = dict(loss, moe_loss_coeff=0.02)  # router_aux_loss_coef in Mixtral-8x7B-v0.1's config.json
data = dict(data, seq_len=4096)
ckpt = dict(ckpt, save_ckpt_folder="local:llm_ckpts/mixtral_8x7b")
