"""The three stage-1 losses of BLIP-2 (LAVIS `Blip2Qformer.forward`), on the global batch.

- ITC: the similarity of an image and a text is the max over the image's query features of their dot product with
  the text's [CLS] feature (all normalised), divided by the learned temperature; cross-entropy with label smoothing
  0.1, image->text and text->image, averaged. The gathered (`*_all`) side comes detached: as in LAVIS, each row's
  gradient reaches its own image (i2t) or text (t2i) features only.
- ITM negatives: per text one image, per image one text, drawn from softmax(similarity) + 1e-4 with the positive
  pair's weight set to 0 (`torch.multinomial`), unless given.
- ITG: next-token cross-entropy with label smoothing 0.1, -100 targets ignored, averaged over the global batch's
  target tokens (one process: LAVIS's per-batch mean).

Example:
    >>> image_feats = F.normalize(torch.randn(2, 4, 8), dim=-1); text_feat = F.normalize(torch.randn(2, 8), dim=-1)
    >>> loss, sim_i2t, sim_t2i = itc_loss(image_feats, image_feats, text_feat, text_feat, torch.tensor(0.07))
    >>> sim_i2t.shape
    torch.Size([2, 2])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .distributed import global_sum, world

LABEL_SMOOTHING = 0.1  # LAVIS: ITC and ITG


def local_targets(batch_size: int, device: torch.device) -> torch.Tensor:
    """The global-batch index of each local row: `rank * batch + arange(batch)`."""
    return world()[0] * batch_size + torch.arange(batch_size, device=device)


def itc_loss(
    image_feats: torch.Tensor,  # [b, Q, E] local, normalised
    image_feats_all: torch.Tensor,  # [B, Q, E] global, detached
    text_feat: torch.Tensor,  # [b, E] local, normalised
    text_feat_all: torch.Tensor,  # [B, E] global, detached
    temperature: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(loss, sim_i2t [b, B], sim_t2i [b, B])`, similarities already divided by `temperature`."""
    sim_i2t = torch.einsum("iqe,je->ijq", image_feats, text_feat_all).max(-1).values / temperature
    sim_t2i = torch.einsum("ie,jqe->ijq", text_feat, image_feats_all).max(-1).values / temperature
    targets = local_targets(image_feats.shape[0], image_feats.device)
    loss = (F.cross_entropy(sim_i2t, targets, label_smoothing=LABEL_SMOOTHING)
            + F.cross_entropy(sim_t2i, targets, label_smoothing=LABEL_SMOOTHING)) / 2
    return loss, sim_i2t, sim_t2i


@torch.no_grad()
def hard_negatives(sim_i2t: torch.Tensor, sim_t2i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(negative image per text [b], negative text per image [b])`, global indices drawn as LAVIS does."""
    targets = local_targets(sim_i2t.shape[0], sim_i2t.device)
    rows = torch.arange(sim_i2t.shape[0], device=sim_i2t.device)
    drawn = []
    for sim in (sim_t2i, sim_i2t):  # LAVIS's order: images for the texts first
        weights = F.softmax(sim.float(), dim=1) + 1e-4
        weights[rows, targets] = 0
        drawn.append(torch.multinomial(weights, 1).squeeze(1))
    return drawn[0], drawn[1]


def check_negatives(name: str, indices: torch.Tensor | None, batch: int, global_batch: int,
                    device: torch.device) -> torch.Tensor | None:
    """Given negative indices as a `[batch]` integer tensor of global-batch rows, each != the row's own."""
    if indices is None:
        return None
    indices = torch.as_tensor(indices, device=device)
    if indices.shape != (batch,) or indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"`{name}` must be an integer tensor of shape [{batch}], found {indices.dtype} "
                         f"{tuple(indices.shape)}.")
    if ((indices < 0) | (indices >= global_batch)).any():
        raise ValueError(f"`{name}` must index the global batch [0, {global_batch}), found {indices.tolist()}.")
    if (indices == local_targets(batch, device)).any():
        raise ValueError(f"`{name}` must not pick a row's own positive, found {indices.tolist()}.")
    return indices


def itg_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy (label smoothing 0.1): `logits[:, t]` predicts `labels[:, t + 1]`. Divided by the
    global count of targets over the world size, so that DDP's gradient average equals one process's mean."""
    targets = labels[:, 1:]
    total = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=-100,
                            reduction="sum", label_smoothing=LABEL_SMOOTHING)
    count = global_sum((targets != -100).sum().to(total.dtype))
    return total / (count / world()[1]).clamp(min=1)
