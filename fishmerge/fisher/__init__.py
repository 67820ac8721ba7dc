"""Diagonal Fisher estimation: exact per-example squared-gradient sums and their reference oracle."""

from fishmerge.fisher.persample import CausalLMNLL, causal_lm_nll, squared_gradient_sums
from fishmerge.fisher.reference import squared_gradient_sums_loop

__all__ = ["CausalLMNLL", "causal_lm_nll", "squared_gradient_sums", "squared_gradient_sums_loop"]
