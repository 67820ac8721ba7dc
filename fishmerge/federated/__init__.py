"""Federated FedFish and FedAvg fine-tuning through Accelerate (SPEC §3–5)."""
