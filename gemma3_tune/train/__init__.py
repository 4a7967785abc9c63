"""Training: recipe schema, adapters, trainer, DeepSpeed."""
