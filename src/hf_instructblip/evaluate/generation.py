"""The one generation path of evaluation: prompts + images (or clips) -> processor tensors on the model's device ->
`generate` -> answers without the prompt echo. The zero-shot runner and the lmms-eval plugin both call it; evaluation
during training (`InstructBlipTrainer` with `predict_with_generate`) lays its prompt-only batches out as the
processor does and strips the echo with the same `layout.new_tokens`, so all three produce the same answers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from transformers import BatchFeature


def evaluation_inputs(model: Any, processor: Any, prompts: Sequence[str], *, images: Sequence[Any] | None = None,
                      videos: Sequence[Any] | None = None) -> BatchFeature:
    """Processor tensors for a batch of prompts (left padded) and their images or clips, on the model's device,
    pixels in its dtype.

    Example:
        >>> inputs = evaluation_inputs(model, processor, ["What is shown?"], images=[image])
    """
    visual = {"videos": list(videos)} if videos is not None else {"images": list(images)}
    inputs = processor(**visual, text=list(prompts), padding="longest", return_tensors="pt")
    return inputs.to(model.device, dtype=model.dtype)  # BatchFeature: casts the float tensors (pixels) only


def generate_answers(model: Any, processor: Any, inputs: BatchFeature, **generate_kwargs: Any) -> list[str]:
    """`model.generate(**inputs, **generate_kwargs)` decoded to answer strings, without the prompt echo.

    Example:
        >>> generate_answers(model, processor, inputs, num_beams=5, max_new_tokens=10)
        ['a red circle']
    """
    sequences = model.generate(**inputs, **generate_kwargs)
    # Decoder-only LLMs echo the prompt ([B, L + new]); encoder-decoder ones return only the answer.
    echoed = inputs["input_ids"] if model.config.use_decoder_only_language_model else None
    return processor.post_process_generation(sequences, echoed)
