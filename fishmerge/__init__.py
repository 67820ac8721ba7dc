"""fishmerge: Fisher-weighted merging of Hugging Face checkpoints and FedFish federated learning."""

__version__ = "0.1.0"
