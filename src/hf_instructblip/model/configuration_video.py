"""Video InstructBLIP config: the image config under its own `model_type`, so the Auto classes pick the video model.

The weights are the image model's, key for key, so the settings are too. This config reads four kinds of folders:
ours (`hf_instructblip_video`), our image model's (`hf_instructblip`), the official image checkpoints
(`instructblip`) and transformers' video folders (`instructblipvideo`, whose placeholder is `video_token_index`).
It writes `video_token_index` beside `image_token_index`, so transformers' InstructBlipVideo reads our folders.
"""

from __future__ import annotations

from .configuration import OFFICIAL_MODEL_TYPE, InstructBlipConfig

# `model_type`s whose folders hold the same weights and settings: read as ours.
READABLE_MODEL_TYPES = (OFFICIAL_MODEL_TYPE, "instructblipvideo", InstructBlipConfig.model_type)


class InstructBlipVideoConfig(InstructBlipConfig):
    """`InstructBlipConfig` for `InstructBlipVideoForConditionalGeneration`; one placeholder id serves every frame.

    Example:
        >>> config = InstructBlipVideoConfig.from_pretrained("Salesforce/instructblip-flan-t5-xl")  # image checkpoint
        >>> config.video_token_index == config.image_token_index
        True
    """

    model_type = "hf_instructblip_video"
    attribute_map = {
        "image_token_id": "image_token_index",
        "video_token_index": "image_token_index",  # transformers' InstructBlipVideo name
        "video_token_id": "image_token_index",
    }

    def to_dict(self) -> dict:
        return {**super().to_dict(), "video_token_index": self.image_token_index}

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs):
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        if config_dict.get("model_type") in READABLE_MODEL_TYPES:
            config_dict = {**config_dict, "model_type": cls.model_type}
        if "video_token_index" in config_dict:  # one id: the image placeholder, else transformers' video one
            config_dict = dict(config_dict)
            video_token = config_dict.pop("video_token_index")
            if config_dict.get("image_token_index") is None:
                config_dict["image_token_index"] = video_token
        return config_dict, kwargs
