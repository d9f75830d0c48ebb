"""Zero-shot evaluation: the held-out tasks, candidate ranking, the official metrics and the resumable runner
(`python -m hf_instructblip.evaluate --help`)."""
