"""InstructBLIP: image -> EVA ViT -> instruction-aware Q-Former -> `language_projection` -> any HF LLM.

The bridge: the Q-Former's K query outputs, projected to the LLM width, overwrite the embeddings of the K
image-placeholder tokens (`config.image_token_index`) that the processor put in `input_ids`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, GenerationConfig, GenerationMixin
from transformers.modeling_outputs import BaseModelOutput
from transformers.utils import ModelOutput

from .configuration import InstructBlipConfig
from .head_loss import HEAD_IS_LAST_LAYER, head_is_plain_linear, head_loss_instead_of_logits
from .pretrained import InstructBlipPreTrainedModel
from .qformer import InstructBlipQFormerModel
from .vision_cache import VisionFeatureCache
from .vision_encoder import InstructBlipVisionModel, check_pixel_values


@dataclass
class InstructBlipImageFeatures(ModelOutput):
    """`pooler_output`: image features in LLM space `[B, Q, D_llm]`; the encoders' outputs alongside."""

    pooler_output: torch.FloatTensor | None = None
    vision_outputs: BaseModelOutput | None = None
    qformer_outputs: BaseModelOutput | None = None


@dataclass
class InstructBlipForConditionalGenerationModelOutput(ModelOutput):
    """`token_losses` (training mode with labels): detached float32 cross-entropy per label position `[B, N]`,
    0 where unlabelled; decoder-only: position t scores label t + 1 of the `N + 1` trailing labels."""

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    token_losses: torch.FloatTensor | None = None
    vision_outputs: BaseModelOutput | None = None
    qformer_outputs: BaseModelOutput | None = None
    language_model_outputs: ModelOutput | None = None


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, shift: bool) -> torch.Tensor:
    """Float32 cross-entropy per label position, 0 where the label is -100: `[B, L]` (`[B, L - 1]` with `shift`,
    for decoder-only LLMs, where position t predicts token t + 1)."""
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    labels = labels.to(logits.device)
    losses = nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="none"
    )
    return losses.view(labels.shape)


def per_item(total: torch.Tensor, labels: torch.Tensor, num_items_in_batch: int | torch.Tensor | None) -> torch.Tensor:
    """`total / num_items_in_batch`, or over the labelled (not -100) entries of the already aligned `labels`.

    `Trainer` passes `num_items_in_batch` = labelled tokens across all accumulated micro-batches, which makes
    gradient accumulation exact; without it this is the mean over this batch's labelled tokens.
    """
    if num_items_in_batch is None:
        num_items_in_batch = (labels != -100).sum()
    if isinstance(num_items_in_batch, torch.Tensor):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def labelled_tail(labels: torch.Tensor) -> int:
    """Trailing positions a decoder-only loss needs: from the one before the first labelled token to the end.

    Training rows are `[image][prompt][answer][pad]` with labels only on the answer, so the LM head (a
    `[D, vocab]` matmul and a float copy of its output) can skip the image and prompt positions.
    """
    labelled = (labels != -100).any(dim=0).nonzero()  # [n, 1] positions labelled in some row
    if labelled.numel() == 0:
        return 1
    return labels.shape[1] - max(int(labelled[0, 0]) - 1, 0)


class InstructBlipForConditionalGeneration(InstructBlipPreTrainedModel, GenerationMixin):
    """InstructBLIP with its LLM, for training (`labels` -> loss) and `generate`.

    Example:
        >>> from hf_instructblip import InstructBlipForConditionalGeneration, InstructBlipProcessor
        >>> model = InstructBlipForConditionalGeneration.from_pretrained("Salesforce/instructblip-flan-t5-xl")
        >>> processor = InstructBlipProcessor.from_pretrained("Salesforce/instructblip-flan-t5-xl")
        >>> inputs = processor(images=image, text="What is in the picture?", return_tensors="pt")
        >>> processor.batch_decode(model.generate(**inputs), skip_special_tokens=True)
    """

    main_input_name = "pixel_values"
    accepts_loss_kwargs = True  # `Trainer` hands us `num_items_in_batch` (exact gradient accumulation)

    def __init__(self, config: InstructBlipConfig):
        super().__init__(config)
        self.vision_model = InstructBlipVisionModel._from_config(config.vision_config)
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, config.qformer_config.hidden_size))
        self.qformer = InstructBlipQFormerModel._from_config(config.qformer_config)
        self.language_projection = nn.Linear(config.qformer_config.hidden_size, config.text_config.hidden_size)
        llm_class = AutoModelForCausalLM if config.use_decoder_only_language_model else AutoModelForSeq2SeqLM
        self.language_model = llm_class.from_config(config.text_config)
        self.vision_feature_cache: VisionFeatureCache | None = None  # see enable_vision_feature_cache
        self.post_init()

    def save_pretrained(self, save_directory, *args, **kwargs):
        """As `PreTrainedModel.save_pretrained`; `auto_map` names us for both `AutoModel` and
        `AutoModelForImageTextToText` (a class registers one auto class; the second entry is added here)."""
        auto_map = dict(getattr(self.config, "auto_map", None) or {})
        auto_map.setdefault("AutoModel", f"{type(self).__module__.rsplit('.', 1)[-1]}.{type(self).__name__}")
        self.config.auto_map = auto_map
        return super().save_pretrained(save_directory, *args, **kwargs)

    # --- embeddings are the LLM's -----------------------------------------------------------------
    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_output_embeddings(value)

    def get_encoder(self, *args, **kwargs):
        return self.language_model.get_encoder()

    def get_decoder(self):
        return self.language_model.get_decoder()

    # --- image -> LLM-space features ----------------------------------------------------------------
    def enable_vision_feature_cache(self, storage_device: str | torch.device = "cpu") -> VisionFeatureCache:
        """Encode each image once: inputs that carry `image_ids` reuse cached vision features (`vision_cache.py`).

        Only valid with a frozen vision encoder and deterministic preprocessing; returns the (new, empty) cache.
        """
        self.vision_feature_cache = VisionFeatureCache(storage_device)
        return self.vision_feature_cache

    def disable_vision_feature_cache(self) -> None:
        self.vision_feature_cache = None

    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        qformer_input_ids: torch.Tensor | None = None,
        qformer_attention_mask: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        image_ids: torch.Tensor | None = None,
        **kwargs,
    ) -> InstructBlipImageFeatures:
        """Images (+ instruction for the Q-Former) -> `pooler_output` `[B, Q, D_llm]`."""
        vision_outputs = self._vision_outputs(pixel_values, interpolate_pos_encoding, image_ids)
        image_embeds = vision_outputs.last_hidden_state  # [B, N, D_vision]
        batch = image_embeds.shape[0]
        queries = self.query_tokens.expand(batch, -1, -1)  # [B, Q, D_qformer]
        input_ids, mask = self._qformer_text(qformer_input_ids, qformer_attention_mask, batch)
        if mask is not None:
            query_mask = torch.ones(queries.shape[:2], dtype=mask.dtype, device=mask.device)
            mask = torch.cat([query_mask, mask], dim=1)  # [B, Q + T]
        qformer_outputs = self.qformer(
            input_ids=input_ids, attention_mask=mask, query_embeds=queries, encoder_hidden_states=image_embeds
        )
        query_output = qformer_outputs.last_hidden_state[:, : queries.shape[1]]  # [B, Q, D_qformer]
        return InstructBlipImageFeatures(
            pooler_output=self.language_projection(query_output),  # [B, Q, D_llm]
            vision_outputs=vision_outputs,
            qformer_outputs=qformer_outputs,
        )

    def _vision_outputs(
        self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool, image_ids: torch.Tensor | None
    ) -> BaseModelOutput:
        """The vision encoder's outputs, or with the cache on and `image_ids` given, its cached features."""
        if self.vision_feature_cache is None or image_ids is None:
            return self.vision_model(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
        dropout = self.vision_model.training and self.config.vision_config.attention_dropout > 0
        if dropout or any(p.requires_grad for p in self.vision_model.parameters()):
            raise ValueError("The vision feature cache needs a frozen vision encoder without dropout (its features "
                             "must not change): freeze it and keep it in eval mode (freeze_for_instruction_tuning "
                             "does both), or call disable_vision_feature_cache().")
        check_pixel_values(pixel_values, self.config.vision_config.image_size, interpolate_pos_encoding)

        def encode(pixels: torch.Tensor) -> torch.Tensor:
            return self.vision_model(pixels, interpolate_pos_encoding=interpolate_pos_encoding).last_hidden_state

        features = self.vision_feature_cache.features(image_ids, pixel_values, encode)  # [B, N, D]
        return BaseModelOutput(last_hidden_state=features.to(self.vision_model.dtype))  # entries may predate a cast

    def _qformer_text(
        self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None, batch: int
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The instruction the Q-Former reads: required when instruction-aware, dropped otherwise (BLIP-2)."""
        if not self.config.instruction_aware:
            return None, None
        if input_ids is None:
            raise ValueError(
                "`qformer_input_ids` is required: this model is instruction-aware (config.instruction_aware=True) "
                "and its Q-Former reads the instruction. Pass the processor's `qformer_input_ids`."
            )
        if input_ids.dim() != 2 or input_ids.shape[0] != batch:
            raise ValueError(
                f"`qformer_input_ids` must have shape [{batch}, length] (one row per image), "
                f"found {list(input_ids.shape)}."
            )
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return input_ids, attention_mask

    # --- placeholders -> embeddings -------------------------------------------------------------------
    def _image_placeholder_mask(self, input_ids: torch.Tensor | None, batch: int) -> torch.Tensor:
        """Boolean `[B, L]` mask of image placeholders, checked to hold exactly `num_query_tokens` per row."""
        token = self.config.image_token_index
        if token is None:
            raise ValueError(
                "config.image_token_index is unset, so the image cannot be placed in the prompt. Set it to the id "
                "of the image placeholder token of the LLM tokenizer (the processor adds one)."
            )
        if input_ids is None:
            raise ValueError("`input_ids` is required: it carries the image placeholder tokens.")
        if input_ids.dim() != 2 or input_ids.shape[0] != batch:
            raise ValueError(
                f"`input_ids` must have shape [{batch}, length] to match the {batch} images in `pixel_values`, "
                f"found {list(input_ids.shape)}."
            )
        mask = input_ids == token
        counts = mask.sum(dim=1).tolist()
        expected = self.config.num_query_tokens
        wrong = {row: found for row, found in enumerate(counts) if found != expected}
        if wrong:
            raise ValueError(
                f"Each row of `input_ids` must hold exactly num_query_tokens={expected} image placeholder tokens "
                f"(id {token}); found (row: count) {wrong}. Build inputs with the InstructBlipProcessor."
            )
        return mask

    def _merge_image_features(
        self, input_ids: torch.Tensor, inputs_embeds: torch.Tensor | None, image_features: torch.Tensor
    ) -> torch.Tensor:
        """LLM input embeddings `[B, L, D_llm]` with the placeholders replaced by `image_features` `[B, Q, D_llm]`."""
        mask = self._image_placeholder_mask(input_ids, image_features.shape[0])
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        mask = mask.unsqueeze(-1).to(inputs_embeds.device)
        return inputs_embeds.masked_scatter(mask, image_features.to(inputs_embeds.device, inputs_embeds.dtype))

    def _llm_inputs(
        self,
        input_ids: torch.Tensor,
        inputs_embeds: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        image_features: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """LLM `inputs_embeds` (placeholders replaced) and `attention_mask`; for an encoder-decoder LLM every row's
        padding is moved to its end, since T5's relative positions would otherwise count the pads that a left-padded
        batch holds between the image placeholders and the prompt."""
        inputs_embeds = self._merge_image_features(input_ids, inputs_embeds, image_features)  # [B, L, D]
        if attention_mask is None:
            attention_mask = torch.ones(inputs_embeds.shape[:2], dtype=torch.long, device=inputs_embeds.device)
        if not self.config.use_decoder_only_language_model:
            order = torch.argsort((attention_mask == 0).to(torch.int8), dim=1, stable=True)  # [B, L] real first
            inputs_embeds = inputs_embeds.gather(1, order.unsqueeze(-1).expand_as(inputs_embeds))
            attention_mask = attention_mask.gather(1, order)
        return inputs_embeds, attention_mask

    # --- training / scoring forward -------------------------------------------------------------------
    def forward(
        self,
        pixel_values: torch.Tensor,
        qformer_input_ids: torch.Tensor | None = None,
        qformer_attention_mask: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        num_items_in_batch: int | torch.Tensor | None = None,
        image_ids: torch.Tensor | None = None,
        **kwargs,
    ) -> InstructBlipForConditionalGenerationModelOutput:
        """`labels` use -100 for ignored positions; decoder-only labels align with `input_ids` (shifted here).
        `image_ids` `[B]` (integers) name the images for the vision feature cache, when it is enabled.

        In training mode with `labels`, the LM head is applied only where the loss needs it: with
        `config.fused_head_loss` (default) and a frozen head, the loss is computed chunk by chunk through the head
        and `logits` is None (`head_loss.py`); otherwise a decoder-only LLM's `logits` hold only the positions from
        the one before the first label on (image and prompt positions carry no loss).
        """
        image = self.get_image_features(
            pixel_values, qformer_input_ids, qformer_attention_mask, interpolate_pos_encoding, image_ids
        )
        inputs_embeds, attention_mask = self._llm_inputs(input_ids, inputs_embeds, attention_mask, image.pooler_output)
        llm_inputs = {"inputs_embeds": inputs_embeds, "attention_mask": attention_mask, **kwargs}
        if not self.config.use_decoder_only_language_model:
            if decoder_input_ids is None:
                if labels is None:
                    raise ValueError(
                        "An encoder-decoder LLM needs `decoder_input_ids` or `labels` in forward; found neither."
                    )
                decoder_input_ids = self.language_model.prepare_decoder_input_ids_from_labels(labels=labels)
            llm_inputs.update(decoder_input_ids=decoder_input_ids, decoder_attention_mask=decoder_attention_mask)
        elif labels is not None and self.training and "logits_to_keep" not in kwargs:
            labels = labels[:, -labelled_tail(labels):]  # [B, N]: what the loss reads
            llm_inputs["logits_to_keep"] = labels.shape[1]
        llm_inputs.pop("return_dict", None)  # we always return our output class
        outputs, token_losses = self._run_language_model(llm_inputs, labels, fuse=self._fuses_head_loss(kwargs))
        loss = None
        if token_losses is not None:
            shift = self.config.use_decoder_only_language_model
            loss = per_item(token_losses.sum(), labels[:, 1:] if shift else labels, num_items_in_batch)
        return InstructBlipForConditionalGenerationModelOutput(
            loss=loss,
            logits=outputs.logits,
            token_losses=token_losses.detach() if token_losses is not None and self.training else None,
            vision_outputs=image.vision_outputs,
            qformer_outputs=image.qformer_outputs,
            language_model_outputs=outputs,
        )

    def _run_language_model(
        self, llm_inputs: dict, labels: torch.Tensor | None, fuse: bool
    ) -> tuple[ModelOutput, torch.Tensor | None]:
        """The LLM's outputs and, with `labels`, the per-token losses; `fuse`: through the head (no logits)."""
        if labels is None:
            return self.language_model(**llm_inputs, return_dict=True), None
        shift, result = self.config.use_decoder_only_language_model, {}
        if fuse:
            with head_loss_instead_of_logits(self.language_model.get_output_embeddings(), labels, shift, result):
                outputs = self.language_model(**llm_inputs, return_dict=True)
        else:
            outputs = self.language_model(**llm_inputs, return_dict=True)
        if "token_losses" not in result:  # not fused, or the head's weights were not usable in place
            return outputs, token_cross_entropy(outputs.logits, labels, shift)
        outputs.logits = None  # empty: the head computed the loss instead
        return outputs, result["token_losses"]

    def _fuses_head_loss(self, llm_kwargs: dict) -> bool:
        """Whether this forward may take the loss through the LM head without building logits (the head still
        falls back to logits at call time if its weights are trainable or not in place: `head_loss._usable_here`)."""
        return (
            self.training
            and self.config.fused_head_loss
            and "logits_to_keep" not in llm_kwargs  # the caller asked for logits
            and self.config.text_config.model_type in HEAD_IS_LAST_LAYER
            and head_is_plain_linear(self.language_model.get_output_embeddings())
        )

    def rank_candidates(self, *args, **kwargs):
        """Score candidate answers by log-likelihood given image + instruction; see
        `hf_instructblip.ranking.rank_candidates` (this model is its first argument)."""
        from .ranking import rank_candidates

        return rank_candidates(self, *args, **kwargs)

    # --- generation -----------------------------------------------------------------------------------
    @torch.inference_mode()  # cheaper than no_grad (no version counters / view tracking); ids are all we return
    def generate(
        self,
        pixel_values: torch.Tensor,
        qformer_input_ids: torch.Tensor | None = None,
        qformer_attention_mask: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        generation_config: GenerationConfig | None = None,
        image_ids: torch.Tensor | None = None,
        **generate_kwargs,
    ) -> torch.LongTensor:
        """Generate with the LLM from image + prompt, using this model's `generation_config` by default.

        Decoder-only LLMs return the prompt ids followed by the new tokens (as transformers' InstructBLIP);
        encoder-decoder LLMs return the decoder ids.
        """
        image = self.get_image_features(
            pixel_values, qformer_input_ids, qformer_attention_mask, interpolate_pos_encoding, image_ids
        )
        features = image.pooler_output  # [B, Q, D_llm]
        if input_ids is None:
            if inputs_embeds is not None:
                raise ValueError("`input_ids` is required with `inputs_embeds`: it marks the image placeholders.")
            input_ids = self._default_prompt(features.shape[0], features.device)
        inputs_embeds, attention_mask = self._llm_inputs(input_ids, inputs_embeds, attention_mask, features)
        llm_inputs = {"inputs_embeds": inputs_embeds, "attention_mask": attention_mask}
        if self.config.use_decoder_only_language_model:
            llm_inputs["input_ids"] = input_ids  # so the returned sequences start with the prompt
        # Our `generation_config` (not the LLM's) is the default; call-time arguments override it.
        generation_config = copy.deepcopy(generation_config or self.generation_config)
        model_kwargs = generation_config.update(**generate_kwargs)  # returns what is not a generation setting
        return self.language_model.generate(**llm_inputs, generation_config=generation_config, **model_kwargs)

    def _default_prompt(self, batch: int, device: torch.device) -> torch.Tensor:
        """Image placeholders (+ BOS for decoder-only LLMs) when no prompt is given: plain captioning."""
        ids = [self.config.image_token_index] * self.config.num_query_tokens
        bos = getattr(self.config.text_config, "bos_token_id", None)  # T5 configs have none
        if self.config.use_decoder_only_language_model and bos is not None:
            ids.append(bos)
        return torch.tensor([ids], dtype=torch.long, device=device).expand(batch, -1)
