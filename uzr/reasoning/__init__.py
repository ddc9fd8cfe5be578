"""Latent reasoning: halting (ACT, zero-shot exits) and the latent reasoning unit (DESIGN.md §9)."""

from uzr.reasoning.act import MODES, Halted, iterate
from uzr.reasoning.lru import (
    AUX_WEIGHTS,
    LatentReasoningUnit,
    LRUOutput,
    convergence_ratio,
    hoyer_sparsity,
    initial_steps,
    mean_residuals,
    stability_loss,
)

__all__ = ["AUX_WEIGHTS", "MODES", "Halted", "LRUOutput", "LatentReasoningUnit", "convergence_ratio",
           "hoyer_sparsity", "initial_steps", "iterate", "mean_residuals", "stability_loss"]
