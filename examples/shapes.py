"""The embedded default of the examples: a procedural "coloured shapes" world and a small InstructBLIP for it.

Everything here is built offline in seconds: word-level tokenizers (the `tokenizers` library), transformers'
BLIP image processor, a small InstructBLIP (EVA-style ViT, Q-Former, Llama-style LLM) and instruction records
drawn with PIL. Held-in tasks (colour, shape, caption) train; held-out instruction templates never do.

Frozen parts must carry information for Q-Former-only instruction tuning to learn anything: with transformers'
default init the vision tower's features are constant (init range 1e-10) and a random frozen LLM cannot be
steered to confident answers. `pretrain_frozen_parts` therefore gives them a short pretraining, as the real
components have: the vision tower learns to classify shape and colour (a throw-away linear head), and the LLM
learns, from text only, to answer a question about a scene *described in words* in front of it. Instruction
tuning then has to teach the Q-Former to "describe" the image to the LLM in its own embedding space.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import BertTokenizerFast, LlamaConfig, PreTrainedTokenizerFast

from hf_instructblip import InstructBlipConfig, InstructBlipForConditionalGeneration, InstructBlipProcessor

IMAGE_SIZE = 32
NUM_QUERY_TOKENS = 8
QFORMER_POSITIONS = 32  # the Q-Former's position table; the processor truncates instructions to it
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (230, 200, 40)}
SHAPES = ("circle", "square", "triangle", "cross")
# task -> (held-in templates, held-out templates, answer from (colour, shape))
TASKS = {
    "colour": (("what colour is the shape ?", "which colour is it ?", "name the colour ."),
               ("tell me the colour of the object .",), lambda colour, shape: colour),
    "shape": (("what shape is this ?", "which shape is shown ?", "name the shape ."),
              ("tell me the shape of the object .",), lambda colour, shape: shape),
    "caption": (("a short caption :", "describe the image briefly ."),
                ("say what you see in two words .",), lambda colour, shape: f"{colour} {shape}"),
}


def draw_shape(colour: str, shape: str, rng: np.random.Generator) -> Image.Image:
    """One `IMAGE_SIZE`^2 RGB image: a jittered shape of a jittered colour on a light, random background."""
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), tuple(int(v) for v in rng.integers(200, 255, 3)))
    pen = ImageDraw.Draw(image)
    r = int(rng.integers(9, 13))
    cx, cy = (IMAGE_SIZE // 2 + rng.integers(-3, 4, 2)).tolist()
    fill = tuple(int(np.clip(v + rng.integers(-25, 25), 0, 255)) for v in COLOURS[colour])
    if shape == "circle":
        pen.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        pen.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "triangle":
        pen.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    else:  # cross
        pen.rectangle([cx - r, cy - r // 3, cx + r, cy + r // 3], fill=fill)
        pen.rectangle([cx - r // 3, cy - r, cx + r // 3, cy + r], fill=fill)
    return image


def make_records(task: str, count: int, seed: int, held_out: bool = False) -> list[dict]:
    """`count` collator records `{image, instruction, answer, dataset}` of one task."""
    rng = np.random.default_rng(seed)
    held_in_templates, held_out_templates, answer = TASKS[task]
    templates = held_out_templates if held_out else held_in_templates
    records = []
    for _ in range(count):
        colour, shape = str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES))
        records.append({"image": draw_shape(colour, shape, rng), "instruction": str(rng.choice(templates)),
                        "answer": answer(colour, shape), "dataset": task})
    return records


# --- tokenizers, processor, model -----------------------------------------------------------------------
def vocabulary() -> list[str]:
    words = set(COLOURS) | set(SHAPES)
    for held_in, held_out, _ in TASKS.values():
        for template in held_in + held_out:
            words.update(template.split())
    return sorted(words)


def llm_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level LLM tokenizer: ids 0 pad, 1 bos, 2 eos, 3 unk, then the words."""
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {token: i for i, token in enumerate(specials + vocabulary())}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>", padding_side="left")


def qformer_tokenizer() -> BertTokenizerFast:
    """BERT-style tokenizer over the same words ([CLS] text [SEP]), truncating from the left as LAVIS."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {token: i for i, token in enumerate(specials + vocabulary())}
    tokenizer = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    return BertTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                             sep_token="[SEP]", mask_token="[MASK]", truncation_side="left")


def build_processor() -> InstructBlipProcessor:
    try:  # transformers >= 5.2x names the PIL backend explicitly; it is what runs without torchvision
        from transformers import BlipImageProcessorPil as ImageProcessor
    except ImportError:
        from transformers import BlipImageProcessor as ImageProcessor
    image_processor = ImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return InstructBlipProcessor(image_processor, llm_tokenizer(), qformer_tokenizer(),
                                 num_query_tokens=NUM_QUERY_TOKENS, qformer_max_length=QFORMER_POSITIONS)


def build_model(processor: InstructBlipProcessor, seed: int = 0) -> InstructBlipForConditionalGeneration:
    """A small InstructBLIP sized for the shapes world (about 0.3 M parameters), dropout off."""
    torch.manual_seed(seed)
    vocab_size = len(processor.tokenizer)
    config = InstructBlipConfig(
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           image_size=IMAGE_SIZE, patch_size=8, initializer_range=0.02),
        qformer_config=dict(vocab_size=len(processor.qformer_tokenizer), hidden_size=64, num_hidden_layers=2,
                            num_attention_heads=4, intermediate_size=128, cross_attention_frequency=1,
                            max_position_embeddings=QFORMER_POSITIONS, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0),
        text_config=LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
                                pad_token_id=0),
        num_query_tokens=NUM_QUERY_TOKENS,
        image_token_index=processor.image_token_id,
    )
    model = InstructBlipForConditionalGeneration(config)
    model.generation_config.update(max_new_tokens=4, num_beams=1, do_sample=False, pad_token_id=0, eos_token_id=2)
    return model


def load_checkpoint(model_id: str, **model_kwargs):
    """Our model and processor from a folder or Hub id (official `Salesforce/instructblip-*` ones included)."""
    model = InstructBlipForConditionalGeneration.from_pretrained(model_id, **model_kwargs)
    return model, InstructBlipProcessor.from_pretrained(model_id)


# --- the short pretraining of the frozen parts ------------------------------------------------------------
def _adamw(parameters, steps: int, lr: float = 2e-3):
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    return optimizer, schedule


def pretrain_vision(model, processor, steps: int = 800, batch: int = 64, pool: int = 4096, seed: int = 1) -> float:
    """Supervised shape + colour classification on mean-pooled vision features; the head is thrown away.
    A pool of images is drawn and preprocessed once, then sampled (drawing dominates otherwise)."""
    rng = np.random.default_rng(seed)
    colours, shapes_ = rng.integers(0, len(COLOURS), pool), rng.integers(0, len(SHAPES), pool)
    images = [draw_shape(list(COLOURS)[c], SHAPES[s], rng) for c, s in zip(colours, shapes_)]
    pixels = processor.preprocess_images(images)  # [pool, 3, H, W]
    colours, shapes_ = torch.from_numpy(colours), torch.from_numpy(shapes_)
    head = torch.nn.Linear(model.config.vision_config.hidden_size, len(SHAPES) + len(COLOURS))
    optimizer, schedule = _adamw([*model.vision_model.parameters(), *head.parameters()], steps)
    for _ in range(steps):
        pick = torch.from_numpy(rng.integers(0, pool, batch))
        logits = head(model.vision_model(pixels[pick]).last_hidden_state.mean(dim=1))  # [B, 4 + 4]
        loss = (torch.nn.functional.cross_entropy(logits[:, : len(SHAPES)], shapes_[pick])
                + torch.nn.functional.cross_entropy(logits[:, len(SHAPES):], colours[pick]))
        loss.backward()
        optimizer.step(), schedule.step(), optimizer.zero_grad()
    return loss.item()


def pretrain_llm(model, processor, steps: int = 400, batch: int = 32, seed: int = 2) -> float:
    """Text-only: `[description x Q/2][bos][question][answer][eos]`, loss on the answer. The description words sit
    where the image tokens will, so the LLM learns to read a scene from that prefix."""
    rng = np.random.default_rng(seed)
    tokenizer, llm = processor.tokenizer, model.language_model
    templates = {task: held_in + held_out for task, (held_in, held_out, _) in TASKS.items()}
    optimizer, schedule = _adamw(llm.parameters(), steps)
    for _ in range(steps):
        rows, labels = [], []
        for _ in range(batch):
            colour, shape, task = str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES)), str(rng.choice(list(TASKS)))
            prefix = tokenizer.encode(f"{colour} {shape}", add_special_tokens=False) * (NUM_QUERY_TOKENS // 2)
            prompt = prefix + [tokenizer.bos_token_id] + tokenizer.encode(
                str(rng.choice(templates[task])), add_special_tokens=False)
            answer = tokenizer.encode(TASKS[task][2](colour, shape), add_special_tokens=False)
            rows.append(prompt + answer + [tokenizer.eos_token_id])
            labels.append([-100] * len(prompt) + answer + [tokenizer.eos_token_id])
        width = max(map(len, rows))
        input_ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
        label_ids = torch.tensor([r + [-100] * (width - len(r)) for r in labels])
        loss = llm(input_ids=input_ids, attention_mask=(input_ids != 0).long(), labels=label_ids).loss  # pad id 0
        loss.backward()
        optimizer.step(), schedule.step(), optimizer.zero_grad()
    return loss.item()


def pretrain_frozen_parts(model, processor) -> dict[str, float]:
    """Both pretraining stages; returns their final losses."""
    model.train()
    return {"vision": pretrain_vision(model, processor), "llm": pretrain_llm(model, processor)}


# --- evaluation -------------------------------------------------------------------------------------------
@torch.no_grad()
def answer(model, processor, records: list[dict], batch: int = 64) -> list[str]:
    """Greedy answers for records (batched, left padded)."""
    model.eval()
    answers = []
    for start in range(0, len(records), batch):
        chunk = records[start : start + batch]
        inputs = processor(images=[r["image"] for r in chunk], text=[r["instruction"] for r in chunk],
                           return_tensors="pt")
        generated = model.generate(**inputs)
        answers += processor.post_process_generation(generated, inputs["input_ids"])
    return answers


def accuracy(model, processor, records: list[dict]) -> float:
    predictions = answer(model, processor, records)
    return sum(p == r["answer"] for p, r in zip(predictions, records)) / len(records)
