"""Instruction tuning: collator, Q-Former-only freezing, balanced mixture sampler, mixture builder, trainer and
the vision feature cache."""
