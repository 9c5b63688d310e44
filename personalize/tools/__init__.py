"""Tools that work on saved artifacts: merge LoRAs into a model, resize and extract LoRAs."""
