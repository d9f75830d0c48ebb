"""The LAVIS -> Hugging Face key tables: which LAVIS key becomes which of ours, and which are dropped and why. Read
by the InstructBLIP converter (`lavis_mapping`) and by the BLIP-2 assembly (`blip2.sources`)."""

from __future__ import annotations

# (LAVIS key pattern, HF key template). Patterns are anchored; the first match wins.
RENAMES: tuple[tuple[str, str], ...] = (
    # EVA ViT-g
    (r"visual_encoder\.cls_token", "vision_model.embeddings.class_embedding"),
    (r"visual_encoder\.pos_embed", "vision_model.embeddings.position_embedding"),
    (r"visual_encoder\.patch_embed\.proj\.(weight|bias)", r"vision_model.embeddings.patch_embedding.\1"),
    (r"visual_encoder\.blocks\.(\d+)\.norm([12])\.(weight|bias)", r"vision_model.encoder.layers.\1.layer_norm\2.\3"),
    (r"visual_encoder\.blocks\.(\d+)\.attn\.qkv\.weight", r"vision_model.encoder.layers.\1.self_attn.qkv.weight"),
    (r"visual_encoder\.blocks\.(\d+)\.attn\.proj\.(weight|bias)",
     r"vision_model.encoder.layers.\1.self_attn.projection.\2"),
    (r"visual_encoder\.blocks\.(\d+)\.mlp\.(fc[12])\.(weight|bias)", r"vision_model.encoder.layers.\1.mlp.\2.\3"),
    # LAVIS applies `ln_vision` to the ViT output; in HF it is the vision model's final LayerNorm.
    (r"ln_vision\.(weight|bias)", r"vision_model.post_layernorm.\1"),
    # Q-Former
    (r"query_tokens", "query_tokens"),
    (r"Qformer\.bert\.embeddings\.(word_embeddings|position_embeddings)\.weight", r"qformer.embeddings.\1.weight"),
    (r"Qformer\.bert\.embeddings\.LayerNorm\.(weight|bias)", r"qformer.embeddings.layernorm.\1"),
    (r"Qformer\.bert\.encoder\.layer\.(\d+)\.(attention|crossattention)\.self\.(query|key|value)\.(weight|bias)",
     r"qformer.encoder.layer.\1.\2.attention.\3.\4"),
    (r"Qformer\.bert\.encoder\.layer\.(\d+)\.(attention|crossattention)\.output\.(dense|LayerNorm)\.(weight|bias)",
     r"qformer.encoder.layer.\1.\2.output.\3.\4"),
    (r"Qformer\.bert\.encoder\.layer\.(\d+)\.(intermediate|intermediate_query)\.dense\.(weight|bias)",
     r"qformer.encoder.layer.\1.\2.dense.\3"),
    (r"Qformer\.bert\.encoder\.layer\.(\d+)\.(output|output_query)\.(dense|LayerNorm)\.(weight|bias)",
     r"qformer.encoder.layer.\1.\2.\3.\4"),
    # Q-Former -> LLM projection, and the LLM (its HF state dict under a LAVIS prefix)
    (r"(?:t5_proj|llm_proj|opt_proj)\.(weight|bias)", r"language_projection.\1"),  # opt_proj: BLIP-2 OPT
    (r"(?:t5_model|llm_model)\.(.+)", r"language_model.\1"),
)

# (LAVIS key pattern, why it is not converted). Checked before the renames.
DROPS: tuple[tuple[str, str], ...] = (
    (r"Qformer\.bert\.embeddings\.position_ids",
     "buffer arange(max_positions): the HF Q-Former computes position ids"),
    (r"Qformer\.cls\..+", "BERT masked-LM head: unused by InstructBLIP (LAVIS sets Qformer.cls = None)"),
    (r"llm_model\..*rotary_emb\.inv_freq",
     "rotary frequencies: a buffer transformers recomputes from the LLM config"),
    (r"visual_encoder\.(norm|fc_norm|head)\..+",
     "EVA classification norm/head: not built by LAVIS (commented out in eva_vit.py), never used"),
)
