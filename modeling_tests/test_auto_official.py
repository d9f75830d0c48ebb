"""Official-layout folders (`model_type: instructblip`, as on the Hub) through the Auto classes and the pipeline:
ours once `hf_instructblip` is imported, transformers' again after `use_for_official_checkpoints(False)`."""

from __future__ import annotations

import json

import pytest
import tiny
import torch
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor
from transformers import InstructBlipConfig as RefConfig
from transformers import InstructBlipForConditionalGeneration as RefModel
from transformers import InstructBlipProcessor as RefProcessor
from transformers import pipeline
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

import hf_instructblip
from hf_instructblip import InstructBlipConfig, InstructBlipForConditionalGeneration, InstructBlipProcessor

IMAGE_TOKEN = 300


@pytest.fixture(scope="module", params=["llama", "t5"])
def official(request, tmp_path_factory):
    """A folder as transformers and the Hub lay it out: transformers' model + processor files."""
    kind = request.param
    folder = tmp_path_factory.mktemp(f"official_{kind}")
    reference = tiny.randomize_(RefModel(RefConfig(**tiny.config_kwargs(kind, IMAGE_TOKEN)))).eval()
    reference.save_pretrained(folder)
    llm = tiny.llm_tokenizer(kind)
    llm.add_tokens(["<image>"], special_tokens=True)
    RefProcessor(tiny.image_processor(), llm, tiny.qformer_tokenizer(), num_query_tokens=tiny.NUM_QUERY_TOKENS
                 ).save_pretrained(folder)
    assert json.loads((folder / "config.json").read_text())["model_type"] == "instructblip"
    return kind, folder, reference


def test_auto_classes_give_ours_and_generate_as_transformers(official):
    kind, folder, reference = official
    assert type(AutoConfig.from_pretrained(folder)) is InstructBlipConfig
    model = AutoModel.from_pretrained(folder)  # transformers maps this to a model without `generate`
    assert type(model) is InstructBlipForConditionalGeneration
    assert type(AutoModelForImageTextToText.from_pretrained(folder)) is InstructBlipForConditionalGeneration
    processor = AutoProcessor.from_pretrained(folder)
    assert type(processor) is InstructBlipProcessor
    inputs = processor(images=tiny.images(1), text="what colour is it", return_tensors="pt")
    with torch.no_grad():
        ours = model.eval().generate(**inputs, max_new_tokens=4, do_sample=False)
        theirs = reference.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(ours, theirs)


def test_pipeline_runs_ours_and_captions_from_an_empty_prompt(official):
    kind, folder, _ = official
    pipe = pipeline("image-text-to-text", model=str(folder))
    assert type(pipe.model) is InstructBlipForConditionalGeneration and type(pipe.processor) is InstructBlipProcessor
    image = tiny.images(1)[0]
    processor = InstructBlipProcessor.from_pretrained(folder)
    for prompt in ("what colour is it", ""):  # "": captioning (transformers' pipeline requires some text)
        inputs = processor(images=image, text=prompt, return_tensors="pt")
        with torch.no_grad():
            ids = pipe.model.generate(**inputs, max_new_tokens=3)
        expected = processor.post_process_generation(ids, inputs["input_ids"] if kind == "llama" else None)[0]
        got = pipe(images=image, text=prompt, max_new_tokens=3, return_full_text=False)[0]["generated_text"]
        assert got.strip() == expected


def test_opting_out_gives_official_folders_back_to_transformers(official):
    _, folder, _ = official
    hf_instructblip.use_for_official_checkpoints(False)
    try:
        assert type(AutoConfig.from_pretrained(folder)) is RefConfig
        assert type(AutoModelForImageTextToText.from_pretrained(folder)) is RefModel
        assert type(AutoProcessor.from_pretrained(folder)) is RefProcessor
    finally:
        hf_instructblip.use_for_official_checkpoints(True)
    assert type(AutoProcessor.from_pretrained(folder)) is InstructBlipProcessor
    with pytest.raises(TypeError, match="enabled"):
        hf_instructblip.use_for_official_checkpoints("no")


def test_environment_variable_opts_out_before_the_import():
    import os
    import subprocess
    import sys

    code = ("import hf_instructblip; from transformers.models.auto.configuration_auto import CONFIG_MAPPING; "
            "print(CONFIG_MAPPING['instructblip'].__module__)")
    env = {**os.environ, "HF_INSTRUCTBLIP_OFFICIAL": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1].startswith("transformers.models.instructblip")
    assert CONFIG_MAPPING["instructblip"] is InstructBlipConfig  # this process: claimed at import
