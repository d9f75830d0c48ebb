"""InstructBLIP: image -> EVA ViT -> instruction-aware Q-Former -> `language_projection` -> any HF LLM.

The bridge: the Q-Former's K query outputs, projected to the LLM width, overwrite the embeddings of the K
image-placeholder tokens (`config.image_token_index`) that the processor put in `input_ids`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM, GenerationConfig, GenerationMixin
from transformers.modeling_outputs import BaseModelOutput, BaseModelOutputWithPooling
from transformers.utils import ModelOutput

from .configuration import InstructBlipConfig
from .inputs import check_call, check_qformer_length, image_placeholder_mask
from .loss import language_model_loss
from .pretrained import InstructBlipPreTrainedModel
from .processing import prepend_image_placeholders
from .qformer import InstructBlipQFormerModel
from .vision_encoder import InstructBlipVisionModel


@dataclass
class InstructBlipImageFeatures(BaseModelOutputWithPooling):
    """As transformers 5's `get_image_features`: `pooler_output` holds the image features in LLM space `[B, Q, D_llm]`,
    `last_hidden_state` / `hidden_states` the vision encoder's; both encoders' outputs come alongside."""

    vision_outputs: ModelOutput | None = None
    qformer_outputs: ModelOutput | None = None


@dataclass
class InstructBlipForConditionalGenerationModelOutput(ModelOutput):
    """With `labels`: `loss` and `token_losses` (detached float32 cross-entropy per label position `[B, N]`, 0 where
    unlabelled; decoder-only: position t scores label t + 1, `N = L - 1`). `logits` is None exactly when the call
    asked for `fused_head_loss=True` with `labels`; otherwise it holds the LLM's logits."""

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    token_losses: torch.FloatTensor | None = None
    vision_outputs: BaseModelOutput | None = None
    qformer_outputs: BaseModelOutput | None = None
    language_model_outputs: ModelOutput | None = None


@dataclass
class InstructBlipModelOutput(ModelOutput):
    """`last_hidden_state` `[B, L, D_llm]`: the LLM body's last hidden states (its decoder's for an encoder-decoder
    LLM), what a fused LM head (TRL, Liger) reads; the three parts' own outputs (the LLM's with its cache) come
    alongside."""

    last_hidden_state: torch.FloatTensor | None = None
    vision_outputs: BaseModelOutput | None = None
    qformer_outputs: BaseModelOutput | None = None
    language_model_outputs: ModelOutput | None = None


class InstructBlipModel(InstructBlipPreTrainedModel):
    """InstructBLIP without the LM head: vision encoder -> Q-Former -> projection -> the LLM's body, returning its
    last hidden states. It loads the full model's checkpoints (their LLM body weights; the head's are skipped).

    Example:
        >>> from hf_instructblip import InstructBlipModel
        >>> model = InstructBlipModel.from_pretrained("Salesforce/instructblip-vicuna-7b")
        >>> inputs = processor(images=image, text="What is in the picture?", return_tensors="pt")
        >>> model(**inputs).last_hidden_state.shape  # [1, L, 4096]
    """

    main_input_name = "pixel_values"
    _keys_to_ignore_on_load_unexpected = [r"^language_model\.lm_head\."]  # the full model's head
    # The parts instruction tuning trains. transformers' quantizers (bitsandbytes, torchao, optimum-quanto, ...) never
    # convert these modules, so a quantized model still trains them; loading in fp16 keeps them in fp32 (as BLIP-2 and
    # LAVIS run the Q-Former), so their updates are not lost to fp16 rounding. The frozen vision encoder and LLM may
    # be quantized; `llm_int8_skip_modules` / `modules_to_not_convert` keep more parts out.
    _keep_in_fp32_modules = ["query_tokens", "qformer", "language_projection"]

    def __init__(self, config: InstructBlipConfig):
        super().__init__(config)
        self.vision_model = InstructBlipVisionModel._from_config(config.vision_config)
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, config.qformer_config.hidden_size))
        self.qformer = InstructBlipQFormerModel._from_config(config.qformer_config)
        self.language_projection = nn.Linear(config.qformer_config.hidden_size, config.text_config.hidden_size)
        self.language_model = self._build_language_model(config)
        self.post_init()

    @staticmethod
    def _build_language_model(config: InstructBlipConfig) -> nn.Module:
        return AutoModel.from_config(config.text_config)  # LlamaModel, OPTModel, T5Model...

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """As `PreTrainedModel.from_pretrained`; a decoder-only LLM body stored under the full model's
        `language_model.model.*` keys loads as `language_model.*` (T5's keys are the same in both)."""
        if cls is InstructBlipModel:
            kwargs.setdefault("key_mapping", {r"^language_model\.model\.": "language_model."})
        return super().from_pretrained(*args, **kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """As `PreTrainedModel.save_pretrained`; `auto_map` names us for both `AutoModel` and
        `AutoModelForImageTextToText` (a class registers one auto class; the second entry is added here). Under FSDP2,
        whose `fully_shard` turns the model into an instance of a subclass defined in torch, the code files and
        `auto_map` still name our class."""
        own = next(cls for cls in type(self).__mro__ if not cls.__module__.startswith("torch."))
        auto_map = dict(getattr(self.config, "auto_map", None) or {})
        auto_map.setdefault("AutoModel", f"{own.__module__.rsplit('.', 1)[-1]}.{own.__name__}")
        self.config.auto_map = auto_map
        sharded_class, self.__class__ = self.__class__, own  # transformers copies the code of `type(self)`
        try:
            return super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            self.__class__ = sharded_class

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
    def get_image_features(
        self,
        pixel_values: torch.Tensor | None = None,
        qformer_input_ids: torch.Tensor | None = None,
        qformer_attention_mask: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        image_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> InstructBlipImageFeatures:
        """Images (+ instruction for the Q-Former) -> `pooler_output` `[B, Q, D_llm]`. `image_embeds` `[B, N, D_vision]`
        (the vision encoder's `last_hidden_state`, e.g. from a feature cache) replace `pixel_values` when given.
        `output_attentions` / `output_hidden_states` reach the vision encoder and the Q-Former."""
        recorded = {key: kwargs[key] for key in ("output_attentions", "output_hidden_states") if key in kwargs}
        vision_outputs = self._vision_outputs(pixel_values, interpolate_pos_encoding, image_embeds, **recorded)
        image_embeds = vision_outputs.last_hidden_state  # [B, N, D_vision]
        batch = image_embeds.shape[0]
        queries = self.query_tokens.expand(batch, -1, -1)  # [B, Q, D_qformer]
        input_ids, mask = self._qformer_text(qformer_input_ids, qformer_attention_mask, batch)
        if mask is not None:
            query_mask = torch.ones(queries.shape[:2], dtype=mask.dtype, device=mask.device)
            mask = torch.cat([query_mask, mask], dim=1)  # [B, Q + T]
        qformer_outputs = self.qformer(
            input_ids=input_ids, attention_mask=mask, query_embeds=queries, encoder_hidden_states=image_embeds,
            return_dict=True, **recorded,
        )
        query_output = qformer_outputs.last_hidden_state[:, : queries.shape[1]]  # [B, Q, D_qformer]
        features = InstructBlipImageFeatures(
            last_hidden_state=image_embeds,
            pooler_output=self.language_projection(query_output),  # [B, Q, D_llm]
            hidden_states=vision_outputs.hidden_states,
            attentions=vision_outputs.attentions,
            vision_outputs=vision_outputs,
            qformer_outputs=qformer_outputs,
        )
        return self._returned(features, kwargs.get("return_dict"))

    def _vision_outputs(
        self, pixel_values: torch.Tensor | None, interpolate_pos_encoding: bool, image_embeds: torch.Tensor | None,
        **recorded: bool,
    ) -> BaseModelOutput:
        """The vision encoder's outputs for `pixel_values`, or `image_embeds` passed in their place."""
        if image_embeds is None:
            if pixel_values is None:
                raise ValueError("`pixel_values` is required (or precomputed vision features as `image_embeds`).")
            return self.vision_model(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, return_dict=True,
                                     **recorded)
        expected = self.config.vision_config.hidden_size
        if not isinstance(image_embeds, torch.Tensor) or image_embeds.dim() != 3 or image_embeds.shape[-1] != expected:
            found = list(image_embeds.shape) if isinstance(image_embeds, torch.Tensor) else type(image_embeds).__name__
            raise ValueError(f"`image_embeds` must be the vision encoder's features [batch, tokens, {expected}], "
                             f"found {found}.")
        return BaseModelOutput(last_hidden_state=image_embeds.to(self.vision_model.dtype))

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
            raise ValueError(f"`qformer_input_ids` must have shape [{batch}, length] (one row per image), found "
                             f"{list(input_ids.shape)}.")
        check_qformer_length(input_ids, self.config.qformer_config)  # `get_image_features` is public
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return input_ids, attention_mask

    # --- placeholders -> embeddings -------------------------------------------------------------------
    def prepare_llm_inputs(
        self,
        input_ids: torch.Tensor,
        image_features: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The LLM's `inputs_embeds` `[B, L, D_llm]` and `attention_mask` `[B, L]`: the placeholders of `input_ids`
        (exactly one per visual token: `num_query_tokens` per image, checked) replaced by `image_features`
        `[B, Q, D_llm]`.

        For an encoder-decoder LLM every row's padding is moved to its end, since T5's relative positions would
        otherwise count the pads that a left-padded batch holds between the image placeholders and the prompt.

        Example:
            >>> features = model.get_image_features(pixel_values, qformer_input_ids).pooler_output
            >>> embeds, mask = model.prepare_llm_inputs(input_ids, features, attention_mask)
            >>> model.language_model(inputs_embeds=embeds, attention_mask=mask)
        """
        mask = image_placeholder_mask(self.config, input_ids, *image_features.shape[:2],
                                      self.get_input_embeddings().num_embeddings)  # [B, L]
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        image_features = image_features.to(inputs_embeds.device, inputs_embeds.dtype)
        inputs_embeds = inputs_embeds.masked_scatter(mask.unsqueeze(-1).to(inputs_embeds.device), image_features)
        if attention_mask is None:
            attention_mask = torch.ones(inputs_embeds.shape[:2], dtype=torch.long, device=inputs_embeds.device)
        attention_mask = attention_mask.to(inputs_embeds.device)
        if not self.config.use_decoder_only_language_model:
            order = torch.argsort((attention_mask == 0).to(torch.int8), dim=1, stable=True)  # [B, L] real first
            inputs_embeds = inputs_embeds.gather(1, order.unsqueeze(-1).expand_as(inputs_embeds))
            attention_mask = attention_mask.gather(1, order)
        return inputs_embeds, attention_mask

    def _encode_call(self, pixel_values, qformer_input_ids, qformer_attention_mask, input_ids, attention_mask,
                     inputs_embeds, interpolate_pos_encoding, image_embeds, labels=None, llm_kwargs=None):
        """Check one `forward` / `generate` call, then encode its images and fill the LLM's inputs:
        `(image features output, inputs_embeds [B, L, D_llm], attention_mask [B, L])`. Given `inputs_embeds` alone,
        the placeholders are the positions that hold the image token's embedding (as in transformers).
        `output_attentions` / `output_hidden_states` among the call's `llm_kwargs` reach the image encoders too."""
        if input_ids is None and inputs_embeds is not None:
            token = torch.tensor(self.config.image_token_index or 0, device=inputs_embeds.device)
            is_image = (inputs_embeds == self.get_input_embeddings()(token)).all(-1)  # [B, L]
            input_ids = torch.where(is_image, token, -1)  # stands for the ids: only placeholders are read
        check_call(self.config, input_ids, pixel_values=pixel_values, image_embeds=image_embeds,
                   attention_mask=attention_mask, qformer_input_ids=qformer_input_ids,
                   qformer_attention_mask=qformer_attention_mask, labels=labels)
        recorded = {key: value for key, value in (llm_kwargs or {}).items()
                    if key in ("output_attentions", "output_hidden_states")}
        image = self.get_image_features(
            pixel_values, qformer_input_ids, qformer_attention_mask, interpolate_pos_encoding, image_embeds,
            return_dict=True, **recorded,
        )
        return image, *self.prepare_llm_inputs(input_ids, image.pooler_output, attention_mask, inputs_embeds)

    # --- the LLM body ---------------------------------------------------------------------------------
    def _language_body(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                       decoder_input_ids: torch.Tensor | None, decoder_attention_mask: torch.Tensor | None,
                       **kwargs) -> ModelOutput:
        """The LLM without its head on the filled embeddings: outputs with `last_hidden_state` `[B, L, D_llm]`."""
        if self.config.use_decoder_only_language_model:
            return self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)
        if decoder_input_ids is None:
            raise ValueError("An encoder-decoder LLM needs `decoder_input_ids` for its hidden states; found none.")
        return self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                   decoder_input_ids=decoder_input_ids,
                                   decoder_attention_mask=decoder_attention_mask, **kwargs)

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        qformer_input_ids: torch.Tensor | None = None,
        qformer_attention_mask: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        image_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> InstructBlipModelOutput:
        """Images + prompt -> the LLM's last hidden states `[B, L, D_llm]` (decoder positions for T5), no logits.
        Other keyword arguments (`use_cache`, `output_hidden_states`...) go to the LLM."""
        return_dict = kwargs.pop("return_dict", None)
        image, inputs_embeds, attention_mask = self._encode_call(
            pixel_values, qformer_input_ids, qformer_attention_mask, input_ids, attention_mask, inputs_embeds,
            interpolate_pos_encoding, image_embeds, llm_kwargs=kwargs)
        outputs = self._language_body(inputs_embeds, attention_mask, decoder_input_ids, decoder_attention_mask,
                                      return_dict=True, **kwargs)
        output = InstructBlipModelOutput(
            last_hidden_state=outputs.last_hidden_state,
            vision_outputs=image.vision_outputs,
            qformer_outputs=image.qformer_outputs,
            language_model_outputs=outputs,
        )
        return self._returned(output, return_dict)


class _LanguageBody:
    """`base_model` of the full model: calling it runs `InstructBlipModel.forward` on the full model's own modules
    (the LLM without its head), as TRL's and Liger's fused heads do before applying the head themselves. Not a
    module of its own, so the state dict keeps the full model's layout."""

    _tp_plan = None
    _pp_plan = None

    def __init__(self, model: "InstructBlipForConditionalGeneration"):
        self._model = model

    def __call__(self, *args, **kwargs) -> InstructBlipModelOutput:
        if not self._model.config.use_decoder_only_language_model:
            # Fused heads score position t against label t + 1 and apply the head to these states as they are:
            # wrong for T5, whose decoder position t predicts label t (and whose tied head rescales them first).
            raise ValueError(
                "To train an encoder-decoder LLM with TRL, use hf_instructblip.InstructBlipSFTTrainer (it takes the "
                "model's own loss): plain trl.SFTTrainer's fused LM head, which calls the full model's `base_model`, "
                "serves decoder-only LLMs only. For the decoder's hidden states use InstructBlipModel."
            )
        return InstructBlipModel.forward(self._model, *args, **kwargs)

    def get_image_features(self, *args, **kwargs) -> InstructBlipImageFeatures:
        return self._model.get_image_features(*args, **kwargs)


class InstructBlipForConditionalGeneration(InstructBlipModel, GenerationMixin):
    """InstructBLIP with its LLM, for training (`labels` -> loss) and `generate`.

    Example:
        >>> from hf_instructblip import InstructBlipForConditionalGeneration, InstructBlipProcessor
        >>> model = InstructBlipForConditionalGeneration.from_pretrained("Salesforce/instructblip-flan-t5-xl")
        >>> processor = InstructBlipProcessor.from_pretrained("Salesforce/instructblip-flan-t5-xl")
        >>> inputs = processor(images=image, text="What is in the picture?", return_tensors="pt")
        >>> processor.batch_decode(model.generate(**inputs), skip_special_tokens=True)
    """

    accepts_loss_kwargs = True  # `Trainer` hands us `num_items_in_batch` (exact gradient accumulation)
    _keys_to_ignore_on_load_unexpected = None

    @staticmethod
    def _build_language_model(config: InstructBlipConfig) -> nn.Module:
        llm_class = AutoModelForCausalLM if config.use_decoder_only_language_model else AutoModelForSeq2SeqLM
        return llm_class.from_config(config.text_config)

    @property
    def base_model(self) -> _LanguageBody:
        """The model up to the LLM's last hidden states, without the LM head (see `InstructBlipModel`)."""
        return _LanguageBody(self)

    def _language_body(self, inputs_embeds, attention_mask, decoder_input_ids, decoder_attention_mask, **kwargs):
        """A causal LM's body (its `base_model`, e.g. `LlamaModel`): what `base_model` runs (decoder-only only)."""
        return self.language_model.base_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)

    # --- training / scoring forward -------------------------------------------------------------------
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
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
        image_embeds: torch.Tensor | None = None,
        fused_head_loss: bool = False,
        **kwargs,
    ) -> InstructBlipForConditionalGenerationModelOutput:
        """`labels` use -100 for ignored positions; decoder-only labels align with `input_ids` (shifted here).

        What comes back depends on the call alone:
        - with `labels`: `loss` (mean over labelled tokens, or their sum / `num_items_in_batch`) and `token_losses`;
        - `logits`: the LLM's logits, except with `fused_head_loss=True` and `labels`, where the loss is taken
          through the frozen LM head chunk by chunk and no `[B, L, vocab]` logits are kept (`logits` is None). The
          fused path needs a frozen plain-`nn.Linear` head on an LLM in `loss.HEAD_IS_LAST_LAYER` with its weight
          in place; otherwise the loss is computed from the logits (same values) and they are still not returned.
        `image_embeds` (precomputed vision features) may replace `pixel_values`, see `get_image_features`.
        """
        return_dict = kwargs.pop("return_dict", None)
        shift = self.config.use_decoder_only_language_model
        shift_labels = kwargs.pop("shift_labels", None)
        if shift_labels is not None:  # sequence / context parallel: labels already aligned with the positions
            if not shift:
                raise ValueError("`shift_labels` are for decoder-only LLMs; an encoder-decoder LLM takes `labels`.")
            labels, shift = shift_labels, False
        image, inputs_embeds, attention_mask = self._encode_call(
            pixel_values, qformer_input_ids, qformer_attention_mask, input_ids, attention_mask, inputs_embeds,
            interpolate_pos_encoding, image_embeds, labels=labels, llm_kwargs=kwargs)
        llm_inputs = {"inputs_embeds": inputs_embeds, "attention_mask": attention_mask, **kwargs}
        if not self.config.use_decoder_only_language_model:
            if decoder_input_ids is None:
                if labels is None:
                    raise ValueError(
                        "An encoder-decoder LLM needs `decoder_input_ids` or `labels` in forward; found neither."
                    )
                decoder_input_ids = self.language_model.prepare_decoder_input_ids_from_labels(labels=labels)
            llm_inputs.update(decoder_input_ids=decoder_input_ids, decoder_attention_mask=decoder_attention_mask)
        if labels is None:
            outputs, loss, token_losses = self.language_model(**llm_inputs, return_dict=True), None, None
        else:
            outputs, loss, token_losses = language_model_loss(
                self.language_model, llm_inputs, labels, shift, num_items_in_batch, fused=fused_head_loss
            )
        output = InstructBlipForConditionalGenerationModelOutput(
            loss=loss,
            logits=outputs.logits,
            token_losses=token_losses,
            vision_outputs=image.vision_outputs,
            qformer_outputs=image.qformer_outputs,
            language_model_outputs=outputs,
        )
        return self._returned(output, return_dict)

    # --- generation -----------------------------------------------------------------------------------
    @torch.inference_mode()  # cheaper than no_grad (no version counters / view tracking); ids are all we return
    def generate(
        self,
        pixel_values: torch.Tensor | None = None,
        qformer_input_ids: torch.Tensor | None = None,
        qformer_attention_mask: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        generation_config: GenerationConfig | None = None,
        image_embeds: torch.Tensor | None = None,
        **generate_kwargs,
    ) -> torch.LongTensor:
        """Generate with the LLM from image + prompt, using this model's `generation_config` by default.

        Decoder-only LLMs return the prompt ids followed by the new tokens (as transformers' InstructBLIP);
        encoder-decoder LLMs return the decoder ids.
        """
        images = pixel_values if pixel_values is not None else image_embeds
        if input_ids is None and inputs_embeds is None and images is not None:  # no prompt: plain captioning
            input_ids = self._default_prompt(images.shape[0], images.device)
        _, embeds, attention_mask = self._encode_call(
            pixel_values, qformer_input_ids, qformer_attention_mask, input_ids, attention_mask, inputs_embeds,
            interpolate_pos_encoding, image_embeds)
        llm_inputs = {"inputs_embeds": embeds, "attention_mask": attention_mask}
        if self.config.use_decoder_only_language_model and input_ids is not None:
            llm_inputs["input_ids"] = input_ids  # so the returned sequences start with the prompt
        # Our `generation_config` (not the LLM's) is the default; call-time arguments override it.
        generation_config = copy.deepcopy(generation_config or self.generation_config)
        model_kwargs = generation_config.update(**generate_kwargs)  # returns what is not a generation setting
        return self.language_model.generate(**llm_inputs, generation_config=generation_config, **model_kwargs)

    def _default_prompt(self, batch: int, device: torch.device) -> torch.Tensor:
        """Image placeholders (+ BOS for decoder-only LLMs) when no prompt is given: plain captioning."""
        bos = getattr(self.config.text_config, "bos_token_id", None)  # T5 configs have none
        prompt = [bos] if self.config.use_decoder_only_language_model and bos is not None else []
        ids = prepend_image_placeholders([prompt], self.config.image_token_index, self.config.num_query_tokens)
        return torch.tensor(ids, dtype=torch.long, device=device).expand(batch, -1)
