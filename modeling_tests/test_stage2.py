"""BLIP-2 stage 2 (pretraining/stage2.py): a stage-1 folder -> `from_blip2` with `instruction_aware=False` -> caption
training through the instruction-tuning collator -> export to transformers' `Blip2ForConditionalGeneration` with
the same logits; T5 captions split into prefix and suffix."""

from __future__ import annotations

import pytest
import torch
from transformers import Blip2ForConditionalGeneration

import blip2_sources
import stage1_cases
import tiny
from hf_instructblip import InstructBlipDataCollator
from hf_instructblip.pretraining.stage2 import caption_records, export_blip2, stage2_model

CAPTIONS = [{"image": image, "caption": caption} for image, caption in zip(tiny.images(3, seed=5),
                                                                            stage1_cases.CAPTIONS)]


def test_captions_become_collator_records():
    decoder_only = caption_records(CAPTIONS, encoder_decoder=False)
    assert [r["answer"] for r in decoder_only] == [c["caption"] for c in CAPTIONS]
    assert {r["instruction"] for r in decoder_only} == {""}
    split = caption_records(CAPTIONS, encoder_decoder=True, seed=1)
    for record, source in zip(split, CAPTIONS):
        assert record["answer"] and " ".join(filter(None, [record["instruction"], record["answer"]])) == \
            source["caption"]
    assert split == caption_records(CAPTIONS, encoder_decoder=True, seed=1)
    assert any(r["instruction"] for r in split)
    with pytest.raises(ValueError, match="record 0: expected a mapping with 'image' and a non-empty str 'caption'"):
        caption_records([{"image": None, "caption": " "}], encoder_decoder=False)
    with pytest.raises(TypeError, match="`encoder_decoder` must be a bool, found str"):
        caption_records(CAPTIONS, encoder_decoder="False")  # a truthy string would split every caption
    with pytest.raises(ValueError, match="`seed` must be an int >= 0, found -1"):
        caption_records(CAPTIONS, encoder_decoder=True, seed=-1)


@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_stage1_to_stage2_to_blip2_export_same_logits(tmp_path, kind):
    stage1 = stage1_cases.model(seed=2)
    stage1.save_pretrained(tmp_path / "stage1")
    stage1_cases.qformer_tokenizer().save_pretrained(tmp_path / "stage1")
    blip2_sources.llm_folder(tmp_path / "llm", kind)
    model, processor = stage2_model(str(tmp_path / "stage1"), str(tmp_path / "llm"))
    assert model.config.instruction_aware is False
    torch.testing.assert_close(model.query_tokens, stage1.query_tokens)
    torch.testing.assert_close(model.qformer.encoder.layer[0].output_query.dense.weight,
                               stage1.qformer.encoder.layer[0].output_query.dense.weight)
    records = caption_records(CAPTIONS, encoder_decoder=kind == "t5")
    collator = InstructBlipDataCollator(processor, decoder_only=model.config.use_decoder_only_language_model)
    batch = collator(records)
    batch.pop("qformer_input_ids"), batch.pop("qformer_attention_mask")  # BLIP-2 reads no instruction
    with torch.no_grad():
        ours = model(**batch)
    assert torch.isfinite(ours.loss)
    export_blip2(model, tmp_path / "blip2", processor)
    theirs, info = Blip2ForConditionalGeneration.from_pretrained(tmp_path / "blip2", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        reference = theirs.eval()(**batch)
    torch.testing.assert_close(ours.logits, reference.logits, atol=1e-5, rtol=1e-5)
    model.config.instruction_aware = True
    with pytest.raises(ValueError, match="export_blip2: the model is instruction-aware"):
        export_blip2(model, tmp_path / "again")
