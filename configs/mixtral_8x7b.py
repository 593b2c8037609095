# Mixtral-8x7B-v0.1's shapes: 32 layers, each a mixture of 8 experts with 2 active per token (about 12.9B of its
# 46.7B parameters), GQA, on top of the InternLM2-7B config (docs/moe.md).
from internlm2_7b import *  # noqa: F401,F403

JOB_NAME = "mixtral_8x7b"
model_type = "MIXTRALMOE"

model = dict(model)  # a copy: the base's dict stays as it is
model.update(
    num_layers=32,
    hidden_size=4096,
    num_attention_heads=32,
    num_kv_attention_heads=8,
    vocab_size=32000,
    intermediate_size=14336,  # each expert's width (InternEvo's: its experts are as wide as the MLP)
    rope_base=1000000,
    layer_norm_epsilon=1e-5,
    max_position_embeddings=32768,
    num_experts=8,
    top_k=2,
    moe_type="Dropless",
    moe_layer_kwargs=dict(scoring_func="softmax", normalize_expert_weights=True),  # Mixtral renormalises always
)
loss = dict(loss, moe_loss_coeff=0.02)  # router_aux_loss_coef in Mixtral-8x7B-v0.1's config.json
data = dict(data, seq_len=4096)
ckpt = dict(ckpt, save_ckpt_folder="local:llm_ckpts/mixtral_8x7b")
