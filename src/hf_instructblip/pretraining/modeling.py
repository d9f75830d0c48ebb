"""Stage-1 BLIP-2 model: frozen vision encoder + Q-Former with text input + ITC / ITM / ITG heads.

Weights are held in transformers' `Blip2ForImageTextRetrieval` key layout (`vision_model.*`, `query_tokens`,
`embeddings.{word,position}_embeddings`, `qformer.layernorm`, `qformer.encoder.*`, `vision_projection`,
`text_projection`, `itm_head`), so `from_pretrained("Salesforce/blip2-itm-vit-g")` continues from the official
stage-1 weights and transformers reads a saved folder. Two tensors are ours and absent there: `temp` (the learned
temperature, 0.07 when missing, as LAVIS initialises it) and `itg_head.{dense,LayerNorm,bias}`, BERT's LM-head
transform (dense N(0, 0.02), LayerNorm 1 / 0, bias 0) whose output matrix is the word embeddings (tied, as BERT's).
transformers ignores both when loading.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.utils import ModelOutput

from ..model.pretrained import InstructBlipPreTrainedModel
from ..model.qformer import QFormerEncoder, embed_queries_and_text
from ..model.vision_encoder import InstructBlipVisionModel
from .configuration import QFormerPretrainingConfig
from .distributed import check_global_batch, gather_no_grad, gather_with_grad
from .losses import check_negatives, hard_negatives, itc_loss, itg_loss


@dataclass
class QFormerPretrainingOutput(ModelOutput):
    """`loss` = `loss_itc` + `loss_itm` + `loss_itg` (LAVIS's sum); the similarities `[b, B]` of the local rows."""

    loss: torch.Tensor | None = None
    loss_itc: torch.Tensor | None = None
    loss_itm: torch.Tensor | None = None
    loss_itg: torch.Tensor | None = None
    sim_i2t: torch.Tensor | None = None
    sim_t2i: torch.Tensor | None = None


class TextEmbeddings(nn.Module):
    """The Q-Former's word and position embeddings (BLIP-2 stage 1 keeps them outside `qformer`)."""

    def __init__(self, config):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)


class QFormerBody(nn.Module):
    """The Q-Former's embedding LayerNorm and layers, under BLIP-2's names."""

    def __init__(self, config):
        super().__init__()
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.encoder = QFormerEncoder(config)


class ItgHead(nn.Module):
    """BERT's LM head: dense -> activation -> LayerNorm -> word embeddings^T + bias."""

    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = ACT2FN[config.hidden_act]
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden_states: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        return F.linear(self.LayerNorm(self.act(self.dense(hidden_states))), word_embeddings, self.bias)


def self_attention_mask(text_mask: torch.Tensor | None, batch: int, num_queries: int, causal: bool,
                        device: torch.device) -> torch.Tensor:
    """Boolean `[B, 1, L, L]` (True = attend) over `[queries; text]`: padding hidden; with `causal` (ITG) queries see
    only queries and each text token the queries and the text up to itself (LAVIS's cached query keys / values)."""
    parts = [torch.ones(batch, num_queries, dtype=torch.bool, device=device)]
    if text_mask is not None:
        parts.append(text_mask.to(device=device, dtype=torch.bool))
    keep = torch.cat(parts, dim=1)  # [B, L]
    length = keep.shape[1]
    allowed = keep[:, None, None, :].expand(batch, 1, length, length)
    if causal:
        rule = torch.ones(length, length, dtype=torch.bool, device=device).tril()
        rule[:, :num_queries] = True  # every position sees every query ...
        rule[:num_queries, num_queries:] = False  # ... and queries see no text
        allowed = allowed & rule
    return allowed


class QFormerForPretraining(InstructBlipPreTrainedModel):
    """BLIP-2 stage 1 (LAVIS `Blip2Qformer`): ITC + ITM + ITG losses from images and captions.

    `forward(pixel_values, input_ids, attention_mask)` takes captions tokenised by the Q-Former's BERT tokenizer
    (padded to 32 tokens as LAVIS: `QFormerPretrainingCollator`) and returns `loss`, `loss_itc`, `loss_itm`,
    `loss_itg`. Under DDP the contrastive similarities and the negatives span the global batch.

    Example:
        >>> model = QFormerForPretraining.from_pretrained("Salesforce/blip2-itm-vit-g")
        >>> model.freeze_vision_encoder()
        >>> out = model(pixel_values, input_ids, attention_mask)
        >>> out.loss, out.loss_itc, out.loss_itm, out.loss_itg
    """

    config_class = QFormerPretrainingConfig
    main_input_name = "pixel_values"
    accepts_loss_kwargs = False  # batch-mean losses: `Trainer` divides them by the gradient accumulation steps
    _no_split_modules = ["EvaEncoderLayer", "QFormerLayer"]

    def __init__(self, config: QFormerPretrainingConfig):
        super().__init__(config)
        q = config.qformer_config
        self.vision_model = InstructBlipVisionModel(config.vision_config)
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, q.hidden_size))
        self.embeddings = TextEmbeddings(q)
        self.qformer = QFormerBody(q)
        self.vision_projection = nn.Linear(q.hidden_size, config.image_text_hidden_size)
        self.text_projection = nn.Linear(q.hidden_size, config.image_text_hidden_size)
        self.itm_head = nn.Linear(q.hidden_size, 2)
        self.temp = nn.Parameter(torch.tensor(float(config.temperature)))
        self.itg_head = ItgHead(q)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, QFormerForPretraining):
            init.constant_(module.temp, module.config.temperature)
        if isinstance(module, ItgHead):
            init.zeros_(module.bias)

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.embeddings.word_embeddings = value

    # --- building blocks --------------------------------------------------------------------------------
    def freeze_vision_encoder(self, train_ln_vision: bool = True) -> None:
        """Freeze the vision encoder (LAVIS `freeze_vit`); its final LayerNorm (LAVIS `ln_vision`, a separate module
        there) keeps training unless `train_ln_vision=False`."""
        for name, param in self.vision_model.named_parameters():
            param.requires_grad_(train_ln_vision and name.startswith("post_layernorm."))

    @torch.no_grad()
    def copy_text_ffn_to_queries(self) -> None:
        """LAVIS's stage-1 start from BERT: each layer's query feed-forward (`*_query`) = its text feed-forward."""
        for layer in self.qformer.encoder.layer:
            layer.intermediate_query.load_state_dict(layer.intermediate.state_dict())
            layer.output_query.load_state_dict(layer.output.state_dict())

    def image_embeds(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Vision features `[B, 1 + N, D_vision]` (after `post_layernorm`, LAVIS `ln_vision(visual_encoder(x))`)."""
        return self.vision_model(pixel_values=pixel_values).last_hidden_state

    def qformer_states(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                       image_embeds: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        """Q-Former outputs `[B, Q + T, D]`: queries when `image_embeds` is given (they cross-attend to it), text
        when `input_ids` is (`attention_mask` `[B, T]` over the text only); `causal` for ITG."""
        queries = None
        if image_embeds is not None:
            queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
            image_embeds = image_embeds.to(self.query_tokens.dtype)
        hidden = self.qformer.dropout(embed_queries_and_text(self.embeddings, self.qformer.layernorm, input_ids,
                                                             queries))
        num_queries = 0 if queries is None else queries.shape[1]
        if input_ids is not None and attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        mask = self_attention_mask(attention_mask, hidden.shape[0], num_queries, causal, hidden.device)
        for layer in self.qformer.encoder.layer:
            hidden = layer(hidden, image_embeds, mask, num_queries)[0]
        return hidden

    def image_features(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """Normalised projected query outputs `[B, Q, E]` (ITC image side)."""
        return F.normalize(self.vision_projection(self.qformer_states(image_embeds=image_embeds)), dim=-1)

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised projected [CLS] output `[B, E]` (ITC text side)."""
        return F.normalize(self.text_projection(self.qformer_states(input_ids, attention_mask)[:, 0]), dim=-1)

    def itm_logits(self, image_embeds: torch.Tensor, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Match / no-match logits `[B, 2]` of pairs (row i: image i with text i): `itm_head` averaged over queries."""
        states = self.qformer_states(input_ids, attention_mask, image_embeds)[:, : self.config.num_query_tokens]
        return self.itm_head(states).mean(dim=1)

    def decoder_start_token_id(self) -> int:
        """BLIP-2's `[DEC]`: the last row of the Q-Former vocabulary (30522 of the released 30523)."""
        return self.config.qformer_config.vocab_size - 1

    # --- the losses -------------------------------------------------------------------------------------
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        negative_image_indices: torch.Tensor | None = None,
        negative_text_indices: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> QFormerPretrainingOutput | tuple:
        """ITC + ITM + ITG on a batch of (image, caption) pairs; `image_embeds` replaces `pixel_values` (cached
        features). `negative_image_indices` / `negative_text_indices` `[b]`: global-batch rows of the ITM negatives
        per text / per image (default: drawn as LAVIS does)."""
        if input_ids is None or (pixel_values is None) == (image_embeds is None):
            raise ValueError("QFormerForPretraining needs `input_ids` and exactly one of `pixel_values` / "
                             "`image_embeds`.")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if image_embeds is None:
            image_embeds = self.image_embeds(pixel_values)
        batch = image_embeds.shape[0]
        global_batch = check_global_batch(batch, input_ids.shape[0])
        # ITC over the global batch
        image_feats = self.image_features(image_embeds)  # [b, Q, E]
        text_feat = self.text_features(input_ids, attention_mask)  # [b, E]
        loss_itc, sim_i2t, sim_t2i = itc_loss(image_feats, gather_no_grad(image_feats), text_feat,
                                              gather_no_grad(text_feat), self.temp)
        # ITM: pos pairs, (neg image, text), (image, neg text)
        neg_images = check_negatives("negative_image_indices", negative_image_indices, batch, global_batch,
                                     image_embeds.device)
        neg_texts = check_negatives("negative_text_indices", negative_text_indices, batch, global_batch,
                                    image_embeds.device)
        if neg_images is None or neg_texts is None:
            drawn_images, drawn_texts = hard_negatives(sim_i2t, sim_t2i)
            neg_images = drawn_images if neg_images is None else neg_images
            neg_texts = drawn_texts if neg_texts is None else neg_texts
        ids_all, mask_all = gather_no_grad(input_ids), gather_no_grad(attention_mask)
        itm_ids = torch.cat([input_ids, input_ids, ids_all[neg_texts]])
        itm_mask = torch.cat([attention_mask, attention_mask, mask_all[neg_texts]])
        itm_images = torch.cat([image_embeds, gather_with_grad(image_embeds)[neg_images], image_embeds])
        itm_labels = torch.cat([torch.ones(batch), torch.zeros(2 * batch)]).long().to(image_embeds.device)
        loss_itm = F.cross_entropy(self.itm_logits(itm_images, itm_ids, itm_mask), itm_labels)
        # ITG: [DEC] + caption, queries visible, causal text
        decoder_ids = input_ids.clone()
        decoder_ids[:, 0] = self.decoder_start_token_id()
        labels = decoder_ids.masked_fill(attention_mask == 0, -100)  # the padding, whatever the tokenizer's pad id
        states = self.qformer_states(decoder_ids, attention_mask, image_embeds, causal=True)
        logits = self.itg_head(states[:, self.config.num_query_tokens:], self.embeddings.word_embeddings.weight)
        loss_itg = itg_loss(logits, labels)
        output = QFormerPretrainingOutput(loss=loss_itc + loss_itm + loss_itg, loss_itc=loss_itc, loss_itm=loss_itm,
                                          loss_itg=loss_itg, sim_i2t=sim_i2t, sim_t2i=sim_t2i)
        return self._returned(output, return_dict)
