"""Start an InstructBLIP from a pretrained BLIP-2 and any LLM, as the paper does (`from_blip2`).

Modules: `keys` (key tables: transformers' BLIP-2, LAVIS BLIP-2 and BERT -> our keys; weight groups), `sources`
(reading each source safely), `language_model` (LLM checks and loading), `provenance` (the report of where every
tensor came from), `assembly` (`from_blip2`: config, weights, new projection, processor).
"""
