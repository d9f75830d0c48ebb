"""Quick start: build a tiny InstructBLIP from an embedded config and generate (offline, CPU, seconds)."""

import torch
from transformers import LlamaConfig

from hf_instructblip import InstructBlipConfig, InstructBlipForConditionalGeneration

NUM_QUERIES, IMAGE_TOKEN = 4, 99


def main() -> None:
    torch.manual_seed(0)
    config = InstructBlipConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=28, patch_size=14),
        qformer_config=dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=64),
        text_config=LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, bos_token_id=1, eos_token_id=2, pad_token_id=0),
        num_query_tokens=NUM_QUERIES, image_token_index=IMAGE_TOKEN,
    )
    model = InstructBlipForConditionalGeneration(config).eval()
    prompt = torch.tensor([[IMAGE_TOKEN] * NUM_QUERIES + [1, 10, 11, 12]] * 2)
    out = model.generate(pixel_values=torch.randn(2, 3, 28, 28), qformer_input_ids=torch.tensor([[5, 6, 7]] * 2),
                         input_ids=prompt, max_new_tokens=5)
    print("generated ids:", out[:, prompt.shape[1]:].tolist())


if __name__ == "__main__":
    main()
