"""The shared training loop and its parts (noise, batches, validation, checkpoints)."""
