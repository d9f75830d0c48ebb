"""Checkpoint reading and key mapping shared by the library (`hf_instructblip.blip2`) and the `conversion/` CLIs:
safe `.pth` / safetensors loading (`checkpoint_io`) and the LAVIS -> Hugging Face key table (`lavis_mapping`)."""
