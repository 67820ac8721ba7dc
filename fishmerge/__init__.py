"""fishmerge: Fisher-weighted merging of Hugging Face checkpoints and FedFish federated learning.

The operators, importable from the top level (loaded on first use, so ``import fishmerge`` stays light):

- :func:`estimate_fisher` — diagonal Fisher of a checkpoint folder on a dataset, saved as safetensors;
- :func:`plan_merge` then :func:`execute_merge` — Fisher-weighted or plain merge of checkpoint folders,
  streaming (``fishmerge.merge.merge`` does both);
- :func:`fisher_merge`, :func:`weighted_average` — the same arithmetic on in-memory tensors;
- :func:`run_federated` — FedFish / FedAvg federated training.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "estimate_fisher": "fishmerge.estimate",
    "EstimateOptions": "fishmerge.estimate",
    "plan_merge": "fishmerge.merge",
    "execute_merge": "fishmerge.merge",
    "fisher_merge": "fishmerge.kernels",
    "weighted_average": "fishmerge.kernels",
    "run_federated": "fishmerge.federated.driver",
    "FederatedConfig": "fishmerge.federated.config",
    "FishmergeError": "fishmerge.errors",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'fishmerge' has no attribute {name!r}")
