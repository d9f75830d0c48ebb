"""Vision feature cache: same outputs as encoding every time, the encoder runs only on uncached images, and
`InstructBlipTrainer` batches (`image_id` records) drive it across epochs. The model stays stateless: the cache
hands it `image_embeds`."""

from __future__ import annotations

import copy

import pytest
import tiny
import torch
from test_modeling import batch_inputs, labels_for, make_ours
from test_training import collator_for, make_model, make_processor, make_records, training_args
from torch.utils.data import SequentialSampler

from hf_instructblip import InstructBlipTrainer, VisionFeatureCache, freeze_for_instruction_tuning


def frozen_model(kind="t5"):
    model = make_ours(kind)
    freeze_for_instruction_tuning(model)
    return model.train()


def cached(cache, model, inputs, ids) -> dict:
    """The inputs as the cache hands them to the model (`pixel_values` -> `image_embeds`)."""
    return cache.model_inputs(model, {**inputs, "image_ids": torch.as_tensor(ids) if isinstance(ids, list) else ids})


def count_encoded_images(model) -> list[int]:
    """Batch size of every vision-encoder call, recorded by a forward hook."""
    sizes = []
    model.vision_model.register_forward_hook(lambda module, args, output: sizes.append(args[0].shape[0]))
    return sizes


def test_cached_features_give_the_same_loss_and_gradients():
    plain, model = frozen_model(), frozen_model()
    cache = VisionFeatureCache()
    inputs = batch_inputs(seed=31)
    inputs.update(labels_for("t5", inputs))
    ids = torch.tensor([7, 8, 9])
    expected = plain(**inputs)
    expected.loss.backward()
    encoded = count_encoded_images(model)
    for call in range(2):  # misses, then hits
        model.zero_grad()
        model_inputs = cached(cache, model, inputs, ids)
        assert "pixel_values" not in model_inputs and "image_ids" not in model_inputs
        actual = model(**model_inputs)
        actual.loss.backward()
        torch.testing.assert_close(actual.loss, expected.loss, atol=1e-6, rtol=0)
        for (name, a), (_, e) in zip(model.named_parameters(), plain.named_parameters()):
            if e.grad is not None:
                torch.testing.assert_close(a.grad, e.grad, atol=1e-6, rtol=1e-5, msg=name)
    assert encoded == [3] and (cache.misses, cache.hits, len(cache)) == (3, 3, 3)


def test_only_uncached_images_are_encoded_and_rows_keep_their_order():
    plain, model = frozen_model("llama").eval(), frozen_model("llama").eval()
    cache = VisionFeatureCache()
    inputs = batch_inputs(seed=32)
    with torch.no_grad():
        model(**cached(cache, model, {k: v[1:2] for k, v in inputs.items()}, [21]))  # caches row 1 only
        encoded = count_encoded_images(model)
        actual = model(**cached(cache, model, inputs, [20, 21, 22])).logits
        expected = plain(**inputs).logits
    assert encoded == [2] and (cache.misses, cache.hits) == (3, 1)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


def test_generate_takes_cached_features_and_inputs_without_ids_pass_through():
    model = frozen_model("llama").eval()
    inputs = batch_inputs(seed=33)
    settings = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False)
    expected = model.generate(**inputs, **settings)
    cache = VisionFeatureCache()
    for _ in range(2):
        assert torch.equal(model.generate(**cached(cache, model, inputs, [1, 2, 3]), **settings), expected)
    assert cache.model_inputs(model, inputs) == inputs  # no ids: nothing looked up, nothing cached
    assert (cache.misses, cache.hits, len(cache)) == (3, 3, 3)
    assert not hasattr(model, "vision_feature_cache")  # the model holds no cache state


@pytest.mark.parametrize(
    ("image_ids", "error", "pattern"),
    [
        (torch.tensor([1.0, 2.0, 3.0]), TypeError, r"`image_ids` must be an integer torch.Tensor of shape \[batch\], "
                                                   r"found torch.float32"),
        ([1, 2, 3], TypeError, "found list"),
        (torch.tensor([1, 2]), ValueError, r"`image_ids` must have shape \[3\] .* found \[2\]"),
    ],
)
def test_bad_image_ids(image_ids, error, pattern):
    model = frozen_model()
    inputs = batch_inputs(seed=34)
    with pytest.raises(error, match=pattern):
        VisionFeatureCache().model_inputs(model, {**inputs, "image_ids": image_ids})


def test_trainable_vision_encoder_is_refused_and_pixels_are_still_checked():
    model, cache = make_ours("t5"), VisionFeatureCache()
    inputs = batch_inputs(seed=35)
    with pytest.raises(ValueError, match="needs a frozen vision encoder"):
        cached(cache, model, inputs, [1, 2, 3])
    model.vision_model.requires_grad_(False)
    cached(cache, model, inputs, [1, 2, 3])
    with pytest.raises(ValueError, match="pixel_values"):  # all three cached, yet bad pixels are refused
        cached(cache, model, {**inputs, "pixel_values": inputs["pixel_values"][:, :2]}, [1, 2, 3])


def test_trainer_epochs_encode_each_image_once_and_train_identically(tmp_path):
    """Two epochs of `image_id` records: 4 images encoded once, then read; weights equal a run without cache."""
    processor = make_processor("t5")
    records = [{**record, "image_id": i} for i, record in enumerate(make_records(4))]
    initial = make_model("t5", processor)
    results = {}
    for use_cache in (False, True):
        model = copy.deepcopy(initial)
        cache = VisionFeatureCache() if use_cache else None
        trainer = InstructBlipTrainer(
            model=model, train_dataset=records, data_collator=collator_for("t5", processor),
            train_sampler=SequentialSampler(range(4)), vision_feature_cache=cache,
            args=training_args(tmp_path / str(use_cache), num_train_epochs=2, per_device_train_batch_size=2,
                               learning_rate=1e-3),
        )
        trainer.train()
        results[use_cache] = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    assert (cache.misses, cache.hits, len(cache)) == (4, 4, 4)
    start = dict(initial.named_parameters())
    assert max((results[False][n] - start[n]).abs().max().item() for n in results[False]) > 1e-4  # it trained
    for name, expected in results[False].items():
        torch.testing.assert_close(results[True][name], expected, atol=1e-6, rtol=0, msg=name)


def test_an_id_reused_for_other_pixels_is_refused():
    """Two datasets both numbering images from 0 would otherwise get each other's features."""
    model, cache = frozen_model("llama").eval(), VisionFeatureCache()
    inputs = batch_inputs(seed=36)
    cached(cache, model, inputs, [0, 1, 2])
    other = {**inputs, "pixel_values": inputs["pixel_values"].flip(0)}  # same ids, images swapped
    with pytest.raises(ValueError, match=r"`image_ids\[0\]` = 0 was cached for different pixels"):
        cached(cache, model, other, [0, 1, 2])


def test_entries_filled_under_inference_mode_are_ordinary_tensors_and_follow_a_dtype_cast():
    model, cache = frozen_model("llama").eval(), VisionFeatureCache()
    inputs = batch_inputs(seed=37)
    with torch.inference_mode():
        model.generate(**cached(cache, model, inputs, [4, 5, 6]), max_new_tokens=2)
    assert not any(features.is_inference() for features, _ in cache._entries.values())
    model.to(torch.bfloat16)
    bf16_inputs = {**inputs, "pixel_values": inputs["pixel_values"].to(torch.bfloat16)}
    with torch.no_grad():
        output = model(**cached(cache, model, bf16_inputs, [4, 5, 6]))  # cached fp32 features, bf16 model
    assert output.logits.dtype == torch.bfloat16 and cache.hits == 3


def test_vision_dropout_in_training_mode_is_refused():
    model = make_ours("t5", vision_config=tiny.vision_config(attention_dropout=0.1))
    model.vision_model.requires_grad_(False)
    inputs, cache = batch_inputs(seed=38), VisionFeatureCache()
    with pytest.raises(ValueError, match="without dropout"):
        cached(cache, model.train(), inputs, [1, 2, 3])
    model.vision_model.eval()
    cached(cache, model, inputs, [1, 2, 3])
