"""plora-ray: hyperparameter search for PeriodicLoRA fine-tuning on Ray."""

__version__ = "0.1.0"
