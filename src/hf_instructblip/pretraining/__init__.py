"""BLIP-2 Q-Former pretraining: stage 1 (ITC, ITM, ITG with a frozen vision encoder, LAVIS `blip2_qformer.py`) in
transformers' `Blip2ForImageTextRetrieval` layout, its collator and trainer, and the stage-2 path (caption training
of an InstructBLIP with `instruction_aware=False`, export to `Blip2ForConditionalGeneration`)."""
