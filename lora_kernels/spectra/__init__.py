"""The spectra family (AlphaLoRA's math, docs/ALGORITHMS.md §5): batched Gram eigenvalues of weight matrices
and the vectorised Hill / KS power-law fit of their tails."""
from .alpha import alphas_of, eigenvalues, hill_fit

__all__ = ["eigenvalues", "hill_fit", "alphas_of"]
