"""Video InstructBLIP: parity with transformers' InstructBlipVideo (the oracle), T = 1 is the image model, folders
and Auto classes, the video processor, video records in the collator, training on a frame-order task, and the video
QA tasks of the evaluation runner."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tiny
import torch
from PIL import Image
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor, TrainingArguments
from transformers import InstructBlipConfig as RefImageConfig
from transformers import InstructBlipForConditionalGeneration as RefImageModel
from transformers import InstructBlipVideoConfig as RefConfig
from transformers import InstructBlipVideoForConditionalGeneration as RefModel

from hf_instructblip import (
    InstructBlipConfig,
    InstructBlipDataCollator,
    InstructBlipForConditionalGeneration,
    InstructBlipProcessor,
    InstructBlipTrainer,
    InstructBlipVideoConfig,
    InstructBlipVideoForConditionalGeneration,
    InstructBlipVideoProcessor,
    freeze_for_instruction_tuning,
    make_instruction_record,
    rank_candidates,
    sync_image_token,
)
from hf_instructblip.evaluate.cli import main
from hf_instructblip.evaluate.runner import evaluate
from hf_instructblip.evaluate.tasks import load_records, prepare_examples
from hf_instructblip.model.processing_video import uniform_indices

Q = tiny.NUM_QUERY_TOKENS
TOKEN = 319
KINDS = ("llama", "t5")  # a decoder-only and an encoder-decoder LLM


def reference_kwargs(kind: str) -> dict:
    kwargs = tiny.config_kwargs(kind, TOKEN)
    kwargs["video_token_index"] = kwargs.pop("image_token_index")  # transformers' video config names it so
    return kwargs


def make_reference(kind: str, seed: int = 0) -> RefModel:
    return tiny.randomize_(RefModel(RefConfig(**reference_kwargs(kind))), seed).eval()


def make_ours(kind: str, seed: int = 0) -> InstructBlipVideoForConditionalGeneration:
    config = InstructBlipVideoConfig(**tiny.config_kwargs(kind, TOKEN))
    return tiny.randomize_(InstructBlipVideoForConditionalGeneration(config), seed).eval()


def clip_inputs(frames: int, batch: int = 3, seed: int = 0) -> dict:
    """Left-padded prompts of different lengths, each with frames x Q placeholders, one Q-Former row padded."""
    gen = torch.Generator().manual_seed(seed)
    lengths = [5, 3, 7][:batch]
    width = frames * Q + max(lengths)
    input_ids = torch.zeros(batch, width, dtype=torch.long)
    attention_mask = torch.zeros(batch, width, dtype=torch.long)
    for row, length in enumerate(lengths):
        ids = torch.cat([torch.full((frames * Q,), TOKEN), torch.randint(4, 300, (length,), generator=gen)])
        input_ids[row, width - len(ids):] = ids
        attention_mask[row, width - len(ids):] = 1
    qformer_input_ids = torch.randint(1, 64, (batch, 6), generator=gen)
    qformer_attention_mask = torch.ones_like(qformer_input_ids)
    qformer_attention_mask[1, -2:] = 0
    pixel_values = torch.randn(batch, frames, 3, tiny.IMAGE_SIZE, tiny.IMAGE_SIZE, generator=gen)
    return dict(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask,
                qformer_input_ids=qformer_input_ids, qformer_attention_mask=qformer_attention_mask)


def labels_for(kind: str, inputs: dict) -> torch.Tensor:
    if kind == "t5":
        return torch.randint(4, 300, (inputs["input_ids"].shape[0], 4), generator=torch.Generator().manual_seed(1))
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    return labels.masked_fill(labels == TOKEN, -100)


@pytest.fixture(scope="module", params=KINDS)
def pair(request, tmp_path_factory):
    """transformers' video model saved with `save_pretrained`, ours loaded from that folder."""
    folder = tmp_path_factory.mktemp(f"ref_video_{request.param}")
    reference = make_reference(request.param)
    reference.save_pretrained(folder)
    ours, info = InstructBlipVideoForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
    return request.param, reference, ours.eval(), info


# --- parity with transformers' InstructBlipVideo ---------------------------------------------------------------
def test_loads_transformers_video_folder(pair):
    _, reference, ours, info = pair
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert set(ours.state_dict()) == set(reference.state_dict())
    assert type(ours.config) is InstructBlipVideoConfig and ours.config.image_token_index == TOKEN


@pytest.mark.parametrize("frames", [1, 2, 4])
def test_logits_and_loss_match_reference(pair, frames):
    kind, reference, ours, _ = pair
    inputs = clip_inputs(frames, seed=frames)
    labels = labels_for(kind, inputs)
    with torch.no_grad():
        expected, actual = reference(**inputs, labels=labels), ours(**inputs, labels=labels)
    torch.testing.assert_close(actual.logits, expected.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(actual.loss, expected.loss, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("frames", "num_beams"), [(1, 1), (3, 1), (2, 3), (4, 2)])
def test_generate_matches_reference(pair, frames, num_beams):
    _, reference, ours, _ = pair
    inputs = clip_inputs(frames, seed=10 + frames)
    settings = dict(max_new_tokens=5, min_new_tokens=5, num_beams=num_beams, do_sample=False)
    assert torch.equal(ours.generate(**inputs, **settings), reference.generate(**inputs, **settings))


def test_reference_loads_our_folder(pair, tmp_path):
    kind, _, ours, _ = pair
    ours.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["video_token_index"] == TOKEN
    reference, info = RefModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert reference.config.video_token_index == TOKEN
    inputs = clip_inputs(3, seed=3)
    inputs["labels"] = labels_for(kind, inputs)
    with torch.no_grad():
        torch.testing.assert_close(reference.eval()(**inputs).logits, ours(**inputs).logits, atol=1e-5, rtol=0)


def test_loads_the_official_image_checkpoint_layout(tmp_path):
    """The official `Salesforce/instructblip-*` folders are image-model folders (`model_type: instructblip`)."""
    image_reference = tiny.randomize_(RefImageModel(RefImageConfig(**tiny.config_kwargs("llama", TOKEN))), 5).eval()
    image_reference.save_pretrained(tmp_path)
    ours, info = InstructBlipVideoForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert ours.config.image_token_index == TOKEN
    video_reference = make_reference("llama")
    video_reference.load_state_dict(image_reference.state_dict())
    inputs = clip_inputs(2, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(**inputs).logits, video_reference(**inputs).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_one_frame_is_the_image_model_on_that_frame(kind):
    video = make_ours(kind, seed=6)
    image = InstructBlipForConditionalGeneration(InstructBlipConfig(**tiny.config_kwargs(kind, TOKEN))).eval()
    image.load_state_dict(video.state_dict())
    clip = clip_inputs(1, seed=6)
    frame = {**clip, "pixel_values": clip["pixel_values"][:, 0]}  # [B, 3, H, W]
    labels = labels_for(kind, clip)
    with torch.no_grad():
        expected, actual = image(**frame, labels=labels), video(**clip, labels=labels)
    torch.testing.assert_close(actual.logits, expected.logits, atol=0, rtol=0)
    torch.testing.assert_close(actual.loss, expected.loss, atol=0, rtol=0)
    settings = dict(max_new_tokens=4, num_beams=2, do_sample=False)
    assert torch.equal(video.generate(**clip, **settings), image.generate(**frame, **settings))
    candidates = [[[5, 6], [7]], [[8]], [[9, 10, 11], [5]]]
    ranked_video = rank_candidates(video, **clip, candidates=candidates)
    ranked_image = rank_candidates(image, **frame, candidates=candidates)
    for got, want in zip(ranked_video.scores, ranked_image.scores):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_frames_are_kept_in_time_order():
    model = make_ours("llama", seed=7)
    inputs = clip_inputs(3, seed=7)
    with torch.no_grad():
        features = model.get_image_features(inputs["pixel_values"], inputs["qformer_input_ids"],
                                            inputs["qformer_attention_mask"]).pooler_output
        for t in range(3):  # frame t alone gives the queries at [t*Q, (t+1)*Q)
            alone = model.get_image_features(inputs["pixel_values"][:, t : t + 1], inputs["qformer_input_ids"],
                                             inputs["qformer_attention_mask"]).pooler_output
            torch.testing.assert_close(features[:, t * Q : (t + 1) * Q], alone, atol=1e-6, rtol=0)
        reversed_clip = {**inputs, "pixel_values": inputs["pixel_values"].flip(1)}
        assert not torch.allclose(model(**reversed_clip).logits, model(**inputs).logits)
    assert features.shape == (3, 3 * Q, model.config.text_config.hidden_size)


@pytest.mark.parametrize("kind", KINDS)
def test_generate_without_a_prompt_places_every_frames_placeholders(kind):
    model, reference = make_ours(kind), make_reference(kind, seed=8)
    model.load_state_dict(reference.state_dict())
    clip = clip_inputs(4, batch=2, seed=8)
    clip = {k: clip[k] for k in ("pixel_values", "qformer_input_ids", "qformer_attention_mask")}
    settings = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False)
    out = model.generate(**clip, **settings)
    if kind == "llama":  # transformers writes 4 frames' placeholders + BOS (it cannot for T5, which has no BOS)
        assert out.shape == (2, 4 * Q + 1 + 3) and (out[:, : 4 * Q] == TOKEN).all()
        assert torch.equal(out, reference.generate(**clip, **settings))
    else:
        assert out.shape == (2, 1 + 3)
    two_frames = {**clip, "pixel_values": clip["pixel_values"][:, :2]}
    assert model.generate(**two_frames, **settings).shape[1] == (2 * Q + 1 + 3 if kind == "llama" else 4)


def test_fused_head_loss_and_image_embeds():
    model = make_ours("llama", seed=9)
    inputs = clip_inputs(2, seed=9)
    labels = labels_for("llama", inputs)
    with torch.no_grad():
        plain = model(**inputs, labels=labels)
        fused = model(**inputs, labels=labels, fused_head_loss=True)
        embeds = model.vision_model(inputs["pixel_values"].flatten(0, 1)).last_hidden_state  # [B*T, N, D]
        cached = model(**{**inputs, "pixel_values": None}, image_embeds=embeds.unflatten(0, (3, 2)), labels=labels)
    assert fused.logits is None
    torch.testing.assert_close(fused.loss, plain.loss, atol=1e-6, rtol=0)
    torch.testing.assert_close(cached.logits, plain.logits, atol=0, rtol=0)


def test_errors_name_the_argument():
    model = make_ours("llama", seed=10)
    inputs = clip_inputs(2, seed=10)
    with pytest.raises(ValueError, match=r"`pixel_values` must have shape \[batch, frames, 3, height, width\], found "
                                         r"\[3, 3, 28, 28\] \(a batch of images\?"):
        model(**{**inputs, "pixel_values": inputs["pixel_values"][:, 0]})
    one_frame_prompts = {**clip_inputs(1, seed=10), "pixel_values": inputs["pixel_values"]}  # Q placeholders, T = 2
    with pytest.raises(ValueError, match=r"exactly 8 image placeholder tokens .* found \(row: count\) "
                                         r"\{0: 4, 1: 4, 2: 4\}"):
        model(**one_frame_prompts)
    with pytest.raises(ValueError, match=r"`qformer_input_ids` must have shape \[3, length\] \(one instruction per "
                                         r"clip\), found \[2, 6\]"):
        model.get_image_features(inputs["pixel_values"], inputs["qformer_input_ids"][:2])


# --- folders and Auto classes ------------------------------------------------------------------------------------
def video_processor(kind: str = "llama", **kwargs) -> InstructBlipVideoProcessor:
    return InstructBlipVideoProcessor(tiny.image_processor(), tiny.llm_tokenizer(kind), tiny.qformer_tokenizer(),
                                      num_query_tokens=Q, **kwargs)


def test_auto_classes_and_remote_code_load_the_video_model(tmp_path):
    processor = video_processor(num_frames=3)
    model = make_ours("llama", seed=11)
    sync_image_token(model, processor)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "hf_instructblip_video"
    assert config["auto_map"]["AutoModel"] == "modeling_video.InstructBlipVideoForConditionalGeneration"
    assert config["auto_map"]["AutoConfig"] == "configuration_video.InstructBlipVideoConfig"
    shipped = {p.name for p in tmp_path.iterdir()}
    assert {"modeling_video.py", "configuration_video.py", "processing_video.py"} <= shipped
    assert isinstance(AutoConfig.from_pretrained(tmp_path), InstructBlipVideoConfig)
    for auto in (AutoModel, AutoModelForImageTextToText):
        assert type(auto.from_pretrained(tmp_path)) is InstructBlipVideoForConditionalGeneration
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded) is type(processor) and (loaded.num_frames, loaded.pad_frames) == (3, False)

    clips = [tiny.images(5, seed=1), tiny.images(3, seed=2)]
    inputs = processor(videos=clips, text=tiny.CORPUS[:2], return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    torch.save({"inputs": dict(inputs), "logits": logits}, tmp_path / "expected.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        sys.modules["hf_instructblip"] = None  # the folder must suffice
        from transformers import AutoModel, AutoProcessor
        model = AutoModel.from_pretrained({str(tmp_path)!r}, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained({str(tmp_path)!r}, trust_remote_code=True)
        assert type(model).__name__ == "InstructBlipVideoForConditionalGeneration", type(model)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import tiny  # no hf_instructblip inside
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        clips = [tiny.images(5, seed=1), tiny.images(3, seed=2)]
        inputs = processor(videos=clips, text=tiny.CORPUS[:2], return_tensors="pt")
        for key, value in expected["inputs"].items():
            torch.testing.assert_close(inputs[key], value, rtol=0, atol=0, msg=key)
        with torch.no_grad():
            torch.testing.assert_close(model(**expected["inputs"]).logits, expected["logits"], atol=2e-5, rtol=1e-5)
        print("REMOTE-OK", processor.num_frames)
    """)
    env = {"HF_HUB_OFFLINE": "1", "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path),
           "HF_MODULES_CACHE": str(tmp_path / "modules"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env,
                            timeout=120)
    assert "REMOTE-OK 3" in result.stdout, result.stderr[-3000:]


# --- processor ---------------------------------------------------------------------------------------------------
def numbered_frames(count: int, size: int = 40) -> list[Image.Image]:
    """Frame i is a flat grey of value 20 * i: which frames were sampled shows in the pixels."""
    return [Image.new("RGB", (size, size), (20 * i,) * 3) for i in range(count)]


def per_frame(frames: list[Image.Image]) -> torch.Tensor:
    """transformers' BLIP image processor applied to each frame: the reference pixels `[T, 3, H, W]`."""
    return tiny.image_processor()(frames, return_tensors="pt")["pixel_values"]


def test_processor_accepts_every_clip_form_with_the_image_processors_pixels(tmp_path):
    processor = video_processor()
    frames = tiny.images(4, seed=3)
    array = np.stack([np.asarray(f) for f in frames])  # [T, H, W, C] uint8
    for i, frame in enumerate(frames):
        frame.save(tmp_path / f"frame_{i}.png")
    want = per_frame(frames)  # no torchvision here: transformers' video processor cannot run, its image one can
    forms = {"PIL list": frames, "THWC array": array, "TCHW tensor": torch.from_numpy(array).permute(0, 3, 1, 2),
             "folder": str(tmp_path), "paths": [str(tmp_path / f"frame_{i}.png") for i in range(4)]}
    for name, clip in forms.items():
        pixels = processor(videos=clip, return_tensors="pt")["pixel_values"]
        assert pixels.shape == (1, 4, 3, tiny.IMAGE_SIZE, tiny.IMAGE_SIZE), name
        torch.testing.assert_close(pixels[0], want, rtol=0, atol=0, msg=name)
    batch = processor(videos=[forms["PIL list"], forms["THWC array"]], return_tensors="pt")["pixel_values"]
    five_d = processor(videos=np.stack([array, array]), return_tensors="pt")["pixel_values"]
    assert batch.shape == five_d.shape == (2, 4, 3, tiny.IMAGE_SIZE, tiny.IMAGE_SIZE)
    torch.testing.assert_close(batch, five_d, rtol=0, atol=0)
    torch.testing.assert_close(processor(images=frames, return_tensors="pt")["pixel_values"][0], want)  # alias


def test_processor_samples_frames_uniformly_and_pads_only_when_asked():
    processor = video_processor()
    assert uniform_indices(10, 4) == [0, 2, 5, 7] and uniform_indices(4, 4) == [0, 1, 2, 3]
    assert uniform_indices(2, 4) == [0, 0, 1, 1]
    frames = numbered_frames(10)
    pixels = processor(videos=frames, return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(pixels, per_frame([frames[i] for i in (0, 2, 5, 7)]), rtol=0, atol=0)
    three = processor(videos=frames, num_frames=3, return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(three, per_frame([frames[i] for i in (0, 3, 6)]), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"`videos\[1\]` has 2 frames, fewer than num_frames=4; pass "
                                         r"`pad_frames=True`"):
        processor(videos=[frames, frames[:2]])
    padded = processor(videos=frames[:2], pad_frames=True, return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(padded, per_frame([frames[i] for i in (0, 0, 1, 1)]), rtol=0, atol=0)
    every = video_processor(num_frames=None)
    assert every(videos=frames[:3], return_tensors="pt")["pixel_values"].shape[1] == 3
    with pytest.raises(ValueError, match=r"same number of frames, found \(clip: frames\) \{0: 3, 1: 2\}"):
        every(videos=[frames[:3], frames[:2]])


def test_processor_refuses_bad_clips():
    processor = video_processor()
    mixed = numbered_frames(3) + [Image.new("RGB", (30, 40))]
    with pytest.raises(ValueError, match=r"`videos\[0\]`: the frames of a clip must share one size, found "
                                         r"\(frame: \(width, height\)\) \{0: \(40, 40\), .*3: \(30, 40\)\}"):
        processor(videos=mixed)
    with pytest.raises(ValueError, match=r"`videos` must be a clip .* found Image"):
        processor(videos=numbered_frames(1)[0])
    with pytest.raises(ValueError, match=r"`num_frames` must be an int >= 1 or None, found 0"):
        processor(videos=numbered_frames(4), num_frames=0)
    with pytest.raises(ValueError, match="Pass the clips as `videos` or as `images`, not both"):
        processor(videos=numbered_frames(4), images=numbered_frames(4))
    with pytest.raises(ValueError, match=r"Got 2 clips in `videos` for 3 prompts"):
        processor(videos=[numbered_frames(4)] * 2, text=["a", "b", "c"])


@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_processor_places_frames_times_queries_placeholders(kind):
    processor, image_processor = video_processor(kind, num_frames=3), tiny.processor(kind)
    prompts = ["what is in the picture ?", "how many shapes are there ? there are two"]
    got = processor(videos=[numbered_frames(6)] * 2, text=prompts, return_tensors="pt")
    want = image_processor(images=numbered_frames(2), text=prompts, return_tensors="pt")  # Q placeholders
    extra = torch.full((2, 2 * Q), processor.image_token_id)
    assert torch.equal(got["input_ids"], torch.cat([extra, want["input_ids"]], dim=1))  # [B, 3Q + L], left padded
    assert torch.equal(got["attention_mask"], torch.cat([torch.ones_like(extra), want["attention_mask"]], dim=1))
    for key in ("qformer_input_ids", "qformer_attention_mask"):
        assert torch.equal(got[key], want[key]), key
    assert got["pixel_values"].shape == (2, 3, 3, tiny.IMAGE_SIZE, tiny.IMAGE_SIZE)
    one = processor(videos=numbered_frames(6), text=prompts, return_tensors="pt")  # one clip for every prompt
    torch.testing.assert_close(one["pixel_values"], got["pixel_values"], rtol=0, atol=0)
    limited = processor(videos=numbered_frames(6), text=prompts[1], max_length=3 * Q + 4, truncation=True)
    assert len(limited["input_ids"][0]) == 3 * Q + 4  # max_length counts the placeholders
    with pytest.raises(ValueError, match=r"`max_length` counts the 12 video placeholders"):
        processor(videos=numbered_frames(6), text=prompts[0], max_length=12)


def test_processor_save_load_round_trip(tmp_path):
    processor = video_processor(num_frames=6, pad_frames=True, qformer_max_length=20)
    processor.save_pretrained(tmp_path)
    for loaded in (InstructBlipVideoProcessor.from_pretrained(tmp_path), AutoProcessor.from_pretrained(tmp_path)):
        assert type(loaded) is type(processor)
        assert (loaded.num_frames, loaded.pad_frames, loaded.qformer_max_length,
                loaded.num_query_tokens) == (6, True, 20, Q)
    image_folder = tmp_path / "image"
    tiny.processor("llama").save_pretrained(image_folder)  # an image-model folder (the official layout's kind)
    from_image = InstructBlipVideoProcessor.from_pretrained(image_folder)
    assert (from_image.num_frames, from_image.num_query_tokens) == (4, Q)


# --- collator and training ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_collator_lays_out_video_records_like_image_records(kind):
    processor, image_processor = video_processor(kind, num_frames=2), tiny.processor(kind)
    answers = ["a red circle .", "two ."]
    videos = [{"video": numbered_frames(5), "instruction": tiny.CORPUS[i], "answer": a} for i, a in enumerate(answers)]
    images = [{"image": numbered_frames(1)[0], "instruction": tiny.CORPUS[i], "answer": a}
              for i, a in enumerate(answers)]
    got = InstructBlipDataCollator(processor, decoder_only=kind != "t5")(videos)
    want = InstructBlipDataCollator(image_processor, decoder_only=kind != "t5")(images)
    extra = torch.full((2, Q), processor.image_token_id)  # the second frame's placeholders, in front
    assert torch.equal(got["input_ids"], torch.cat([extra, want["input_ids"]], dim=1))
    assert torch.equal(got["attention_mask"], torch.cat([torch.ones_like(extra), want["attention_mask"]], dim=1))
    want_labels = want["labels"] if kind == "t5" else torch.cat([torch.full_like(extra, -100), want["labels"]], 1)
    assert torch.equal(got["labels"], want_labels)  # same answer tokens learned, nothing on placeholders
    assert got["pixel_values"].shape == (2, 2, 3, tiny.IMAGE_SIZE, tiny.IMAGE_SIZE)
    with pytest.raises(ValueError, match="mixes 'image' and 'video' records"):
        InstructBlipDataCollator(processor, decoder_only=kind != "t5")([videos[0], images[1]])
    with pytest.raises(TypeError, match="Video records need an InstructBlipVideoProcessor"):
        InstructBlipDataCollator(image_processor, decoder_only=kind != "t5")(videos)
    with pytest.raises(ValueError, match=r"record 0: field 'video' is None"):
        InstructBlipDataCollator(processor, decoder_only=kind != "t5")([{**videos[0], "video": None}])


def test_video_records_use_the_vqa_templates_unless_given_their_own():
    record = make_instruction_record({"video": ["f0.png", "f1.png"], "question": "what happens?", "answer": "a"},
                                     "msvd_qa", index=3)
    assert record["video"] == ["f0.png", "f1.png"] and "image" not in record
    vqa = make_instruction_record({"image": None, "question": "what happens?", "answer": "a"}, "vqa", index=3,
                                  dataset="msvd_qa")
    assert record["instruction"] == vqa["instruction"]  # the "vqa" family's template, drawn as for any dataset
    own = make_instruction_record({"video": ["f0.png"], "question": "what happens?", "answer": "a"},
                                  "instruction", index=3)
    assert own["instruction"] == "what happens?"


# The order task: 4 frames, one red, one blue, two grey, in every arrangement; "is the red frame before the blue one?"
FRAMES = 4
ARRANGEMENTS = [(red, blue) for red in range(FRAMES) for blue in range(FRAMES) if red != blue]
COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "grey": (128, 128, 128)}
ORDER_QUESTION = "is the red frame before the blue one ?"


def order_clip(red: int, blue: int, rng: np.random.Generator) -> list[Image.Image]:
    colours = ["grey"] * FRAMES
    colours[red], colours[blue] = "red", "blue"
    noise = lambda: rng.integers(-25, 25, (tiny.IMAGE_SIZE, tiny.IMAGE_SIZE, 3))  # noqa: E731
    return [Image.fromarray(np.clip(np.array(COLOURS[c]) + noise(), 0, 255).astype(np.uint8)) for c in colours]


def order_answer(red: int, blue: int) -> str:
    return "yes" if red < blue else "no"


def single_frame_ceiling() -> float:
    """The best accuracy from any one frame, its position known: per position, answer each colour's majority."""
    best = 0.0
    for position in range(FRAMES):
        votes: dict[str, list[int]] = {}
        for red, blue in ARRANGEMENTS:
            colour = "red" if position == red else "blue" if position == blue else "grey"
            votes.setdefault(colour, [0, 0])[order_answer(red, blue) == "yes"] += 1
        best = max(best, sum(max(v) for v in votes.values()) / len(ARRANGEMENTS))
    return best


def order_accuracy(model, processor, clips: list, answers: list[str]) -> float:
    model.eval()
    inputs = processor(videos=clips, text=[ORDER_QUESTION] * len(clips), return_tensors="pt")
    ranked = rank_candidates(model, **inputs, candidates=[["yes", "no"]] * len(clips), tokenizer=processor.tokenizer)
    return sum(["yes", "no"][best] == answer for best, answer in zip(ranked.best, answers)) / len(answers)


def test_qformer_only_training_learns_frame_order(tmp_path):
    """Only the order of the frames tells the answer: an end frame (red there: yes, blue: no, grey: a coin) reaches
    1/2 + 1/T = 0.75, every other single frame less, an order-blind bag of frames 0.5. Q-Former-only training with
    `InstructBlipTrainer` (fused head loss) on video records must do far better."""
    assert single_frame_ceiling() == 0.75
    rng = np.random.default_rng(0)
    processor = video_processor(num_frames=FRAMES)
    torch.manual_seed(0)
    model = InstructBlipVideoForConditionalGeneration(
        InstructBlipVideoConfig(**tiny.config_kwargs("llama", image_token_index=processor.image_token_id)))
    tiny.randomize_(model, seed=0)
    tiny.randomize_(model.language_model, seed=0, std=0.3)  # a frozen LLM with enough signal to be steered
    freeze_for_instruction_tuning(model)
    records = [{"video": order_clip(r, b, rng), "instruction": ORDER_QUESTION, "answer": order_answer(r, b),
                "dataset": "order"} for r, b in ARRANGEMENTS * 8]
    test_clips = [order_clip(r, b, rng) for r, b in ARRANGEMENTS]  # fresh noise
    test_answers = [order_answer(r, b) for r, b in ARRANGEMENTS]
    before = order_accuracy(model, processor, test_clips, test_answers)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, disable_tqdm=True,
                             save_strategy="no", logging_steps=20, lr_scheduler_type="constant", learning_rate=2e-2,
                             per_device_train_batch_size=12, max_steps=120, dataloader_num_workers=0, seed=0)
    trainer = InstructBlipTrainer(model=model, args=args, train_dataset=records,
                                  data_collator=InstructBlipDataCollator(processor, decoder_only=True))
    trainer.train()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    after = order_accuracy(model, processor, test_clips, test_answers)
    assert losses[-1] < losses[0] - 1.0, losses
    assert after >= 11 / 12 > single_frame_ceiling(), (before, after)


# --- evaluation: the video QA tasks ------------------------------------------------------------------------------
QUESTIONS = ["what is in the picture ?", "how many shapes are there ?", "what colour is the circle ?",
             "is this a cat or a dog ?", "what shape is shown ?"]
OPTIONS = ["a red circle", "two", "blue", "a dog"]  # MSVD / MSRVTT rank an answer vocabulary
FAST = dict(num_beams=2, max_new_tokens=3, min_new_tokens=1, length_penalty=-1.0, do_sample=False)


@pytest.fixture(scope="module")
def video_model():
    processor = video_processor("llama")
    model = tiny.randomize_(InstructBlipVideoForConditionalGeneration(
        InstructBlipVideoConfig(**tiny.config_kwargs("llama"))))
    sync_image_token(model, processor)
    return model.eval(), processor


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory) -> Path:
    """Five clips of 6 frames on disk: clips 0-2 as folders of frames, clips 3-4 as frame lists in `loose/`."""
    root = tmp_path_factory.mktemp("videos")
    for clip in range(len(QUESTIONS)):
        folder = root / ("clips" if clip < 3 else "loose") / (f"{clip}" if clip < 3 else "")
        folder.mkdir(parents=True, exist_ok=True)
        for t, frame in enumerate(tiny.images(6, seed=100 + clip)):
            frame.save(folder / (f"frame_{t + 1}.png" if clip < 3 else f"c{clip}_{t}.png"))
    return root


def video_field(clip: int) -> str | list[str]:
    """A record's `video`, relative to the data file: a folder, or a list of frame paths."""
    return f"clips/{clip}" if clip < 3 else [f"loose/c{clip}_{t}.png" for t in range(6)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def count_frames(model) -> tuple[list[int], object]:
    seen: list[int] = []
    handle = model.vision_model.register_forward_hook(lambda _m, args, _o: seen.append(args[0].shape[0]))
    return seen, handle


class Interrupt(Exception):
    pass


def test_msvd_qa_ranks_resumes_and_scores(video_model, video_dir, tmp_path):
    model, processor = video_model
    data = write_jsonl(video_dir / "msvd.jsonl", [
        {"video": video_field(i), "question": q, "candidates": OPTIONS, "answer": OPTIONS[i % 4]}
        for i, q in enumerate(QUESTIONS)])
    records = load_records(data)
    assert records[0]["video"] == [str(video_dir / "clips" / "0" / f"frame_{t}.png") for t in range(1, 7)]
    assert records[4]["video"][0] == str(video_dir / "loose" / "c4_0.png")
    predictions = tmp_path / "msvd_qa_predictions.jsonl"

    def stop_after_first(index, rows):
        if index == 0:
            raise Interrupt

    seen, handle = count_frames(model)
    try:
        with pytest.raises(Interrupt):
            evaluate(model, processor, records, "msvd_qa", predictions_path=predictions, batch_size=2,
                     progress=False, on_batch=stop_after_first)
        assert seen == [2 * 4]  # two clips, 4 frames each, one vision pass
        seen.clear()
        metrics = evaluate(model, processor, records, "msvd_qa", predictions_path=predictions, batch_size=2,
                           progress=False)
        assert seen == [2 * 4, 1 * 4]  # only the three clips left
    finally:
        handle.remove()
    rows = read_rows(predictions)
    assert [r["id"] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[0]["prompt"] == f"Question: {QUESTIONS[0]} Short answer:"
    for record, row in zip(records, rows):  # each clip alone, straight through rank_candidates
        inputs = processor(videos=record["video"], text=row["prompt"], return_tensors="pt")
        alone = rank_candidates(model, **inputs, candidates=[OPTIONS], tokenizer=processor.tokenizer)
        torch.testing.assert_close(torch.tensor(row["scores"]), alone.scores[0], atol=1e-4, rtol=0)
        assert row["best"] == alone.best[0] and row["prediction"] == OPTIONS[row["best"]]
    accuracy = sum(r["prediction"] == OPTIONS[i % 4] for i, r in enumerate(rows)) / 5
    assert (metrics["metric"], metrics["mode"]) == ("accuracy", "rank") and metrics["score"] == pytest.approx(accuracy)


def test_ivqa_generates_and_scores(video_model, video_dir, tmp_path):
    model, processor = video_model
    prompts = [f"Question: {q} Short answer:" for q in QUESTIONS[:3]]
    want = []
    for i, prompt in enumerate(prompts):  # one by one, unpadded
        inputs = processor(videos=str(video_dir / "clips" / str(i)), text=prompt, return_tensors="pt")
        want += processor.post_process_generation(model.generate(**inputs, **FAST), inputs["input_ids"])
    answers = [[want[0]] * 2 + ["zz"] * 3, [want[1], "zz", "zz"], ["zz"] * 5]  # iVQA: min(matches / 2, 1)
    records = [{"video": str(video_dir / "clips" / str(i)), "question": q, "answers": a}
               for i, (q, a) in enumerate(zip(QUESTIONS, answers))]
    metrics = evaluate(model, processor, records, "ivqa", predictions_path=tmp_path / "ivqa.jsonl", batch_size=3,
                       generation_kwargs=FAST, progress=False)
    rows = read_rows(tmp_path / "ivqa.jsonl")
    assert [r["prediction"] for r in rows] == want  # batched (left padded) == one by one
    assert metrics["metric"] == "ivqa_accuracy" and metrics["score"] == pytest.approx((1.0 + 0.5 + 0.0) / 3)


def test_cli_runs_a_video_task_on_an_image_checkpoint(video_model, video_dir, tmp_path, capsys):
    """An image-model folder (as the official checkpoints are) is read frame by frame for the video tasks."""
    model, _ = video_model
    image_model = InstructBlipForConditionalGeneration(InstructBlipConfig(**model.config.to_dict()))
    image_model.load_state_dict(model.state_dict())
    image_model.save_pretrained(tmp_path / "model")
    tiny.processor("llama").save_pretrained(tmp_path / "model")
    data = write_jsonl(video_dir / "msrvtt.jsonl", [
        {"video": video_field(i), "question": q, "options": OPTIONS, "answer": i % 4} for i, q in enumerate(QUESTIONS)])
    out = tmp_path / "out"
    assert main(["--model", str(tmp_path / "model"), "--data", str(data), "--task", "msrvtt_qa", "--output-dir",
                 str(out), "--batch-size", "3", "--device", "cpu", "--no-progress"]) == 0
    metrics = json.loads((out / "msrvtt_qa_metrics.json").read_text())
    rows = read_rows(out / "msrvtt_qa_predictions.jsonl")
    assert metrics["num_examples"] == len(rows) == 5
    assert metrics["score"] == pytest.approx(sum(r["best"] == i % 4 for i, r in enumerate(rows)) / 5)
    direct = evaluate(model, video_model[1], load_records(data), "msrvtt_qa", predictions_path=tmp_path / "p.jsonl",
                      progress=False)
    assert direct["score"] == metrics["score"]


def test_video_records_are_checked_before_any_model_call(video_model, video_dir, tmp_path):
    model, processor = video_model
    run = dict(predictions_path=tmp_path / "p.jsonl", progress=False)
    frames = [str(video_dir / "loose" / "c3_0.png")]
    with pytest.raises(ValueError, match=r"record 1: task 'ivqa' takes a 'video' \(a folder of frames or a list of "
                                         r"frame paths\)"):
        evaluate(model, processor, [{"image": frames[0], "question": "q", "answers": ["a"]}], "ivqa", **run)
    with pytest.raises(ValueError, match=r"record 1: task 'vizwiz' takes an 'image'; 'video' records are for"):
        evaluate(model, processor, [{"video": frames, "question": "q", "answers": ["a"]}], "vizwiz", **run)
    with pytest.raises(ValueError, match=r"record 1: 1 frame file\(s\) of 'video' do not exist, e.g. '.*nope.png'"):
        evaluate(model, processor, [{"video": [*frames, "nope.png"], "question": "q", "answers": ["a"]}], "ivqa", **run)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"holds no frame images"):
        evaluate(model, processor, [{"video": str(tmp_path / "empty"), "question": "q", "answers": ["a"]}], "ivqa",
                 **run)
    with pytest.raises(TypeError, match=r"Task 'ivqa' takes video records: pass an InstructBlipVideoProcessor"):
        evaluate(model, tiny.processor("llama"), [{"video": frames, "question": "q", "answers": ["a"]}], "ivqa", **run)
    assert not (tmp_path / "p.jsonl").exists()
    assert prepare_examples("msvd_qa", [{"video": frames, "question": "q", "options": ["a"], "answer": "a"}])[0].video \
        == frames


# --- the example -------------------------------------------------------------------------------------------------
def test_video_qa_example_runs_offline(tmp_path, capsys):
    examples = Path(__file__).resolve().parents[1] / "examples"
    sys.path.insert(0, str(examples))
    try:
        import video_qa
    finally:
        sys.path.remove(str(examples))
    assert video_qa.main(["--output-dir", str(tmp_path), "--clips", "3"]) == 0
    out = capsys.readouterr().out
    assert "pixel_values [1, 4, 3, 32, 32] (batch, frames, 3, H, W), 32 video placeholders" in out
    assert "msvd_qa: accuracy" in out and "ivqa: ivqa_accuracy" in out
    assert "reloaded as InstructBlipVideoForConditionalGeneration + HfInstructBlipVideoProcessor: logits match" in out
    frames = sorted((tmp_path / "data" / "clips").glob("*/*.png"))
    assert len({p.parent for p in frames}) == 3 and len(frames) >= 18  # 6-12 frames per clip, on disk
    for task in ("msvd_qa", "ivqa"):
        assert len(read_rows(tmp_path / f"{task}_predictions.jsonl")) == 3
        assert json.loads((tmp_path / f"{task}_metrics.json").read_text())["num_examples"] == 3
    assert {"modeling_video.py", "processing_video.py"} <= {p.name for p in (tmp_path / "model").iterdir()}
