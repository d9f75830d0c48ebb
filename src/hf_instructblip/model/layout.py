"""The token layout of InstructBLIP sequences, in one place. Every writer of model inputs (the processor, the
training collator, `generate`'s caption prompt, the video model) lays its rows out through these functions:

- the image placeholders come first, one per visual token (Q per image, T x Q per clip of T frames), before BOS
  and before any left padding, as transformers and LAVIS lay them out; the model swaps them for image features;
- a prompt for generation: `[image x N][pad][bos][prompt]` (text left padded behind the placeholders, so every
  prompt ends at the last column, where generation continues);
- decoder-only training (LAVIS): `[image x N][bos][prompt][answer eos][pad]`, labels on `answer eos` only;
- encoder-decoder training: encoder `[image x N][prompt eos][pad]`, labels `[answer eos]` (-100 padded).

The callers decide the text pieces (specials, truncation); these functions only place them.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100  # label value the loss skips


def prepend_image_placeholders(rows: list[list[int]], image_token_id: int, count: int) -> list[list[int]]:
    """`count` placeholders in front of every row of ids (or of mask values, with `image_token_id=1`).

    Example:
        >>> prepend_image_placeholders([[1, 5], [1]], 32000, 2)
        [[32000, 32000, 1, 5], [32000, 32000, 1]]
    """
    return [[image_token_id] * count + list(row) for row in rows]


def pad_right(rows: list[list[int]], value: int, device: torch.device | str | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad id rows with `value` to the longest: `(ids [B, L], mask [B, L])`, long tensors."""
    ids = torch.full((len(rows), max(len(row) for row in rows)), value, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long, device=device)
        mask[i, : len(row)] = 1
    return ids, mask


def pad_left(rows: list[list[int]], value: int, device: torch.device | str | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad id rows with `value` to the longest: `(ids [B, L], mask [B, L])`."""
    ids, mask = pad_right([row[::-1] for row in rows], value, device)
    return ids.flip(1), mask.flip(1)


def generation_prompts(prompts: list[list[int]], pad_id: int, image_token_id: int, count: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt ids (specials included) -> `[image x count][pad][prompt]` `(input_ids, attention_mask)` `[B, L]`.

    Example:
        >>> generation_prompts([[1, 7, 8], [1, 9]], pad_id=0, image_token_id=5, count=2)[0].tolist()
        [[5, 5, 1, 7, 8], [5, 5, 0, 1, 9]]
    """
    ids, mask = pad_left(prompts, pad_id)  # [B, L_text]
    image = torch.full((len(prompts), count), image_token_id, dtype=torch.long)  # [B, count]
    return torch.cat([image, ids], dim=1), torch.cat([torch.ones_like(image), mask], dim=1)


def training_sequences(prompts: list[list[int]], answers: list[list[int]], *, decoder_only: bool, pad_id: int,
                       image_token_id: int, count: int, prompt_labels: list[list[int]] | None = None
                       ) -> dict[str, torch.Tensor]:
    """Prompt ids (specials included: `[bos] prompt` decoder-only, `prompt [eos]` encoder-decoder) and answer ids
    (`answer [eos]`) -> `input_ids`, `attention_mask`, `labels` of the training layout (right padded).

    Decoder-only labels align with `input_ids`: -100 on the placeholders and the padding, `prompt_labels` on the
    prompt (default -100: only the answer is learned), the answer itself. Encoder-decoder labels are the answers.

    Example:
        >>> batch = training_sequences([[1, 7]], [[9, 2]], decoder_only=True, pad_id=0, image_token_id=5, count=2)
        >>> batch["input_ids"].tolist(), batch["labels"].tolist()
        ([[5, 5, 1, 7, 9, 2]], [[-100, -100, -100, -100, 9, 2]])
    """
    if decoder_only:
        rows = [prompt + answer for prompt, answer in zip(prompts, answers)]
        if prompt_labels is None:
            prompt_labels = [[IGNORE_INDEX] * len(prompt) for prompt in prompts]
        labels = [learned + answer for learned, answer in zip(prompt_labels, answers)]
        labels = prepend_image_placeholders(labels, IGNORE_INDEX, count)
    else:
        rows, labels = prompts, answers
    input_ids, attention_mask = pad_right(prepend_image_placeholders(rows, image_token_id, count), pad_id)
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "labels": pad_right(labels, IGNORE_INDEX)[0]}  # [B, L] (encoder-decoder: [B, L_answer])


def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether the tokenizer starts encoded text with bos (Llama-style) or not (GPT-2 style, T5): the decoder-only
    training prompt starts with bos exactly when the processor's inference prompt does."""
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return tokenizer.bos_token_id is not None and len(ids) > 0 and ids[0] == tokenizer.bos_token_id


def new_tokens(generated_ids: torch.Tensor, input_ids: torch.Tensor | None) -> torch.Tensor:
    """What `generate` added: decoder-only LLMs return `[prompt][new tokens]` (pass the prompt's `input_ids`: the
    echo is checked and removed), encoder-decoder LLMs only the new tokens (pass None). Returns `[B, N]`."""
    if input_ids is None:
        return generated_ids
    prompt_length = input_ids.shape[-1]
    echoed = generated_ids[:, :prompt_length]
    if echoed.shape != input_ids.shape or not torch.equal(echoed.cpu(), input_ids.cpu()):
        raise ValueError(
            "`generated_ids` do not start with `input_ids`: pass `input_ids` only for decoder-only LLMs, whose "
            f"output echoes the prompt (found generated {list(generated_ids.shape)}, prompt {list(input_ids.shape)})."
        )
    return generated_ids[:, prompt_length:]
