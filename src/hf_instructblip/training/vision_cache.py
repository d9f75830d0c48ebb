"""Opt-in cache of frozen vision features, so a multi-epoch run encodes each image once.

With the vision encoder frozen (InstructBLIP's recipe) and a deterministic image processor (`BlipImageProcessor`:
resize + normalise, no augmentation), an image's features are the same every epoch, and the ViT-g forward, a
large share of a Q-Former-only training step, is pure recomputation from the second epoch on. The model stays
stateless: the cache belongs to whoever calls it (`InstructBlipTrainer`, or your own loop through `model_inputs`).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ..model.inputs import check_pixel_values

INTEGER_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


class VisionFeatureCache:
    """Vision features `[N, D]` per `(image_id, height, width)`, stored on `storage_device` (default CPU).

    Records name their image with an integer `image_id` (the collator makes them `image_ids`); the vision encoder
    runs on the misses only. Ids must be unique across everything the model sees while the cache is on (all
    datasets of a mixture: renumber, or offset each dataset's ids), and preprocessing must not be random. Each
    entry keeps a fingerprint of its pixels: a hit whose pixels differ raises instead of returning another
    image's features. Memory: `N * D` values per image in the model dtype, e.g. 0.7 MiB in bf16 for EVA ViT-g at
    224 px (10,000 images: 7 GiB), per process. Counters `hits` / `misses` count images.

    Example:
        >>> cache = VisionFeatureCache()
        >>> trainer = InstructBlipTrainer(model, args, train_dataset=records, data_collator=collator,
        ...                               vision_feature_cache=cache)
        >>> trainer.train()  # epoch 2 on runs no vision encoder
        >>> model.generate(**cache.model_inputs(model, batch))  # the same lookup outside the trainer
    """

    def __init__(self, storage_device: str | torch.device = "cpu"):
        self.storage_device = torch.device(storage_device)
        self._entries: dict[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor]] = {}  # features, fingerprint
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def model_inputs(self, model: nn.Module, inputs: dict[str, Any]) -> dict[str, Any]:
        """`inputs` with `image_ids` and `pixel_values` replaced by the cached `image_embeds` of the model's vision
        encoder (encoded now where missing); inputs without `image_ids` are returned without them, unchanged."""
        inputs = dict(inputs)
        image_ids = inputs.pop("image_ids", None)
        if image_ids is None:
            return inputs
        vision_model = model.vision_model
        dropout = vision_model.training and vision_model.config.attention_dropout > 0
        if dropout or any(p.requires_grad for p in vision_model.parameters()):
            raise ValueError("The vision feature cache needs a frozen vision encoder without dropout (its features "
                             "must not change): freeze it and keep it in eval mode (freeze_for_instruction_tuning "
                             "does both), or train without the cache.")
        interpolate = inputs.get("interpolate_pos_encoding", False)
        pixel_values = inputs.pop("pixel_values", None)
        if pixel_values is None:
            raise ValueError("`image_ids` come without `pixel_values`: the cache encodes the pixels of new ids.")
        check_pixel_values(pixel_values, vision_model.config.image_size, vision_model.config.patch_size, interpolate)

        def encode(pixels: torch.Tensor) -> torch.Tensor:
            return vision_model(pixels, interpolate_pos_encoding=interpolate).last_hidden_state

        with torch.no_grad():
            inputs["image_embeds"] = self.features(image_ids, pixel_values, encode)  # [B, N, D_vision]
        return inputs

    def features(
        self, image_ids: torch.Tensor, pixel_values: torch.Tensor, encode: Callable[[torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """Features `[B, N, D]` for `pixel_values` `[B, 3, H, W]`; `encode` runs on the uncached rows only."""
        keys = [(image_id, *pixel_values.shape[-2:]) for image_id in check_image_ids(image_ids, pixel_values)]
        prints = fingerprint(pixel_values).cpu()  # [B, 3]
        missing = [row for row, key in enumerate(keys) if key not in self._entries]
        for row, key in enumerate(keys):
            if row not in missing and not torch.allclose(self._entries[key][1], prints[row], rtol=1e-3, atol=1e-4):
                raise ValueError(f"`image_ids[{row}]` = {key[0]} was cached for different pixels: ids must be unique "
                                 "across everything the model sees while the cache is on (e.g. over all datasets "
                                 "of a mixture), and preprocessing must not be random.")
        if missing:
            fresh = encode(pixel_values[missing]).detach()  # [M, N, D]
            with torch.inference_mode(False):  # entries stay ordinary tensors when filled from `generate`
                for row, features in zip(missing, fresh.to(self.storage_device)):
                    self._entries[keys[row]] = (features.clone(), prints[row].clone())  # not views of the batch
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        return torch.stack([self._entries[key][0] for key in keys]).to(pixel_values.device, non_blocking=True)


def fingerprint(pixel_values: torch.Tensor) -> torch.Tensor:
    """Three numbers per image `[B, 3]` (mean, standard deviation, mean of every 7th value), float32."""
    flat = pixel_values.detach().flatten(1).float()  # [B, 3 * H * W]
    return torch.stack([flat.mean(1), flat.std(1), flat[:, ::7].mean(1)], dim=1)


def check_image_ids(image_ids: torch.Tensor, pixel_values: torch.Tensor) -> list[int]:
    """`image_ids` as a list of ints, after checking it is an integer tensor `[B]` matching `pixel_values`."""
    if not isinstance(image_ids, torch.Tensor) or image_ids.dtype not in INTEGER_DTYPES:
        found = image_ids.dtype if isinstance(image_ids, torch.Tensor) else type(image_ids).__name__
        raise TypeError(f"`image_ids` must be an integer torch.Tensor of shape [batch], found {found}.")
    if image_ids.shape != pixel_values.shape[:1]:
        raise ValueError(f"`image_ids` must have shape [{pixel_values.shape[0]}] (one id per image in "
                         f"`pixel_values`), found {list(image_ids.shape)}.")
    return image_ids.tolist()
