"""Stage-1 Q-Former pretraining (pretraining/): the ITC, ITM and ITG losses and their gradients equal LAVIS's own
`Blip2Qformer.forward` (read from the salesforce-lavis wheel) given the same weights, batch and negatives."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import blip2_sources
import lavis_stage1
import stage1_cases

TOL = dict(atol=1e-5, rtol=1e-5)
LOSSES = {"loss_itc": "loss_itc", "loss_itm": "loss_itm", "loss_itg": "loss_lm"}  # ours -> LAVIS's name


class _PreLayerNormVision(nn.Module):
    """LAVIS's `visual_encoder`: our (frozen) EVA without its final LayerNorm, which LAVIS holds as `ln_vision`."""

    def __init__(self, vision_model):
        super().__init__()
        self.model = copy.deepcopy(vision_model)
        self.model.post_layernorm = nn.Identity()

    def forward(self, image):
        return self.model(pixel_values=image).last_hidden_state


def lavis_twin(ours, lavis) -> nn.Module:
    """LAVIS's `Blip2Qformer` (its `forward` unchanged) holding our weights, built without its `__init__`
    (which downloads BERT and EVA)."""
    q = ours.config.qformer_config
    bert = lavis.Qformer.BertConfig(
        vocab_size=q.vocab_size, hidden_size=q.hidden_size, num_hidden_layers=q.num_hidden_layers,
        num_attention_heads=q.num_attention_heads, intermediate_size=q.intermediate_size,
        max_position_embeddings=q.max_position_embeddings, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        layer_norm_eps=q.layer_norm_eps, pad_token_id=q.pad_token_id, hidden_act=q.hidden_act)
    bert.encoder_width, bert.add_cross_attention = ours.config.vision_config.hidden_size, True
    bert.cross_attention_freq, bert.query_length = q.cross_attention_frequency, ours.config.num_query_tokens
    twin = lavis.blip2_qformer.Blip2Qformer.__new__(lavis.blip2_qformer.Blip2Qformer)
    nn.Module.__init__(twin)
    twin.tokenizer, twin.max_txt_len = stage1_cases.qformer_tokenizer(), stage1_cases.MAX_TXT_LEN
    twin.visual_encoder = _PreLayerNormVision(ours.vision_model).requires_grad_(False)
    twin.ln_vision = lavis.blip2.LayerNorm(ours.config.vision_config.hidden_size)
    twin.Qformer = lavis.Qformer.BertLMHeadModel(bert)
    twin.query_tokens = nn.Parameter(torch.zeros_like(ours.query_tokens))
    width = ours.config.image_text_hidden_size
    twin.vision_proj, twin.text_proj = nn.Linear(q.hidden_size, width), nn.Linear(q.hidden_size, width)
    twin.itm_head, twin.temp = nn.Linear(q.hidden_size, 2), nn.Parameter(torch.ones([]))
    predictions = twin.Qformer.cls.predictions
    predictions.decoder.weight = twin.Qformer.bert.embeddings.word_embeddings.weight  # BERT's tie
    state = lavis_keys(ours, dict(ours.state_dict()))
    missing, unexpected = twin.load_state_dict(state, strict=False)
    aliases = {"Qformer.bert.embeddings.position_ids",  # LAVIS's arange buffer
               "Qformer.cls.predictions.decoder.weight", "Qformer.cls.predictions.decoder.bias"}  # tied above / bias
    missing = [k for k in missing if not k.startswith("visual_encoder.") and k not in aliases]  # ViT: our copy
    assert unexpected == [] and missing == [], (missing, unexpected)
    return twin


def lavis_keys(ours, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our (= transformers' BLIP-2 stage-1) names -> LAVIS's, by the tests' hand-written LAVIS layout, plus the two
    tensors transformers lacks: `temp` and the ITG head (LAVIS `Qformer.cls.predictions`)."""
    extra = {"temp": "temp", "itg_head.dense.weight": "Qformer.cls.predictions.transform.dense.weight",
             "itg_head.dense.bias": "Qformer.cls.predictions.transform.dense.bias",
             "itg_head.LayerNorm.weight": "Qformer.cls.predictions.transform.LayerNorm.weight",
             "itg_head.LayerNorm.bias": "Qformer.cls.predictions.transform.LayerNorm.bias",
             "itg_head.bias": "Qformer.cls.predictions.bias"}
    mapped = {k: v for k, v in tensors.items() if k not in extra and (not k.startswith("vision_model.")
                                                                     or k.startswith("vision_model.post_layernorm"))}
    out = blip2_sources.lavis_blip2_state_dict(mapped, stage=2)
    out.pop("Qformer.bert.embeddings.position_ids", None)
    out.update({extra[k]: v for k, v in tensors.items() if k in extra})
    return out


@pytest.fixture(scope="module")
def process_group(tmp_path_factory):
    """A one-process gloo group: LAVIS's forward asks `dist.get_rank()` and the world size unconditionally."""
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{tmp_path_factory.mktemp('pg') / 'store'}", rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()


def run_lavis(twin, batch, captions, negatives):
    """LAVIS's forward with `torch.multinomial` answering our negatives (images for texts first, as it draws)."""
    queue = [int(i) for i in negatives[0]] + [int(i) for i in negatives[1]]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "multinomial", lambda weights, n: torch.tensor([queue.pop(0)]))
        out = twin({"image": batch["pixel_values"], "text_input": captions})
    assert queue == []
    return out


def grads(module, names) -> dict[str, torch.Tensor]:
    params = dict(module.named_parameters())
    return {name: params[name].grad.clone() if params[name].grad is not None else torch.zeros_like(params[name])
            for name in names}


def test_losses_and_gradients_equal_lavis(tmp_path, monkeypatch, process_group):
    lavis = lavis_stage1.load_lavis(tmp_path, monkeypatch)
    ours = stage1_cases.model()
    twin = lavis_twin(ours, lavis)
    n = 4
    captions, batch = stage1_cases.CAPTIONS[:n], stage1_cases.batch(n)
    negatives = (torch.tensor([2, 0, 3, 1]), torch.tensor([1, 3, 0, 2]))
    trained = [k for k, p in ours.named_parameters() if p.requires_grad]
    assert "vision_model.post_layernorm.weight" in trained and "vision_model.encoder.layers.0.mlp.fc1.weight" \
        not in trained
    for name, lavis_name in LOSSES.items():
        ours.zero_grad(), twin.zero_grad()
        out = ours(**batch, negative_image_indices=negatives[0], negative_text_indices=negatives[1])
        getattr(out, name).backward()
        reference = run_lavis(twin, batch, captions, negatives)
        getattr(reference, lavis_name).backward()
        torch.testing.assert_close(getattr(out, name), getattr(reference, lavis_name), **TOL)
        ours_grads = lavis_keys(ours, grads(ours, trained))
        theirs = grads(twin, list(ours_grads))
        assert len(ours_grads) == len(trained) > 100
        for key, grad in ours_grads.items():
            torch.testing.assert_close(grad, theirs[key], **TOL, msg=lambda m, key=key: f"{name} {key}: {m}")
        assert any(g.abs().sum() > 0 for g in ours_grads.values())
    torch.testing.assert_close(out.loss, reference.loss, **TOL)


def test_drawn_negatives_never_pick_the_positive_and_given_ones_are_checked():
    ours = stage1_cases.model()
    batch = stage1_cases.batch(4)
    torch.manual_seed(0)
    for _ in range(3):
        out = ours(**batch)
        assert torch.isfinite(out.loss) and out.loss == out.loss_itc + out.loss_itm + out.loss_itg
    from hf_instructblip.pretraining.losses import hard_negatives

    sim = torch.randn(4, 4) * 50  # peaked: the positive would win without the exclusion
    sim.fill_diagonal_(100.0)
    for _ in range(20):
        images, texts = hard_negatives(sim, sim)
        assert (images != torch.arange(4)).all() and (texts != torch.arange(4)).all()
    with pytest.raises(ValueError, match=r"`negative_image_indices` must not pick a row's own positive"):
        ours(**batch, negative_image_indices=torch.tensor([0, 2, 3, 1]))
    with pytest.raises(ValueError, match=r"`negative_text_indices` must index the global batch \[0, 4\)"):
        ours(**batch, negative_text_indices=torch.tensor([1, 2, 3, 4]))
    with pytest.raises(ValueError, match="exactly one of `pixel_values` / `image_embeds`"):
        ours(input_ids=batch["input_ids"])
    with pytest.raises(ValueError, match=r"`negative_image_indices` must be an integer tensor of shape \[4\]"):
        ours(**batch, negative_image_indices=torch.tensor([False, True, True, True]))
    one = stage1_cases.batch(1)
    with pytest.raises(ValueError, match="at least 2 image-caption pairs in the global batch.*found 1"):
        ours(**one)  # ITM would have no negative to draw (torch.multinomial fails on all-zero weights)
    with pytest.raises(ValueError, match="one caption per image: 4 images, found 1 captions"):
        ours(pixel_values=batch["pixel_values"], input_ids=one["input_ids"])


def test_stage1_trainer_refuses_the_glue_options_of_instructblip_models(tmp_path):
    from transformers import TrainingArguments

    from hf_instructblip import QFormerPretrainingTrainer, VisionFeatureCache

    args = TrainingArguments(str(tmp_path), use_cpu=True, report_to=[])
    for option in ({"save_trainable_only": True}, {"vision_feature_cache": VisionFeatureCache()}):
        with pytest.raises(ValueError, match=f"`{next(iter(option))}`: expected"):
            QFormerPretrainingTrainer(model=stage1_cases.model(), args=args, **option)
    trainer = QFormerPretrainingTrainer(model=stage1_cases.model(), args=args)
    assert trainer.args.dataloader_drop_last and not args.dataloader_drop_last  # the caller's arguments untouched


def test_round_trip_with_transformers_blip2_for_image_text_retrieval(tmp_path):
    """Our save -> transformers' `Blip2ForImageTextRetrieval` gives the same ITM scores and embeddings; a
    transformers stage-1 folder (the `blip2-itm-vit-g` layout) loads into ours with the same outputs."""
    from transformers import Blip2ForImageTextRetrieval

    from hf_instructblip.pretraining.modeling import QFormerForPretraining

    ours = stage1_cases.model().eval()
    ours.save_pretrained(tmp_path / "ours")
    theirs, info = Blip2ForImageTextRetrieval.from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert info["missing_keys"] == set() or info["missing_keys"] == []
    assert sorted(info["unexpected_keys"]) == ["itg_head.LayerNorm.bias", "itg_head.LayerNorm.weight",
                                               "itg_head.bias", "itg_head.dense.bias", "itg_head.dense.weight", "temp"]
    theirs.eval()
    batch = stage1_cases.batch(3)
    theirs_from_folder = blip2_sources.blip2_folder(tmp_path / "hf", stage=1, seed=3)
    loaded, info = QFormerForPretraining.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert sorted(info["missing_keys"]) == ["itg_head.LayerNorm.bias", "itg_head.LayerNorm.weight", "itg_head.bias",
                                            "itg_head.dense.bias", "itg_head.dense.weight", "temp"]
    loaded.eval()
    assert loaded.temp.item() == pytest.approx(0.07)  # absent there: LAVIS's initial value
    for mine, reference in ((ours, theirs), (loaded, theirs_from_folder)):
        with torch.no_grad():
            itm = reference(**batch, use_image_text_matching_head=True)
            itc = reference(**batch, use_image_text_matching_head=False)
            image_embeds = mine.image_embeds(batch["pixel_values"])
            logits = mine.itm_logits(image_embeds, batch["input_ids"], batch["attention_mask"])
            image_feats = mine.image_features(image_embeds)
            text_feat = mine.text_features(batch["input_ids"], batch["attention_mask"])
        torch.testing.assert_close(logits, itm.logits_per_image, **TOL)
        torch.testing.assert_close(image_feats, itc.image_embeds, **TOL)
        torch.testing.assert_close(text_feat, itc.text_embeds, **TOL)
        sim = torch.einsum("iqe,je->ijq", image_feats, text_feat).max(-1).values
        torch.testing.assert_close(sim, itc.logits_per_image, **TOL)
