"""Effective rank of the backbone's change: one rule, computed densely or from the factors.

``effective_rank(M, thr)`` is the number of singular values of M above thr · σ_max
(``plora.rank_threshold``): ``rank_of_spectrum`` applies that rule to a spectrum, and every
effective rank in plora-ray (the unload's report, the final report, the benchmarks) goes through
it. An unload's change of a layer is a sum of known low-rank merges, Σ_s coef_s·B_s·A_s, so
``factor_effective_rank`` gets the same spectrum from the factors (two thin Gram products and
eigendecompositions of k·r x k·r) instead of a dense SVD of out x in; ``effective_rank`` is the
dense check.
"""

from __future__ import annotations

from typing import Any

import torch

from plora_ray.merge import Factors

__all__ = [
    "FactorGrams",
    "argument_error",
    "effective_rank",
    "factor_effective_rank",
    "rank_of_spectrum",
    "sampled_layers",
]


def argument_error(key: str, expected: str, found: Any) -> ValueError:
    """A ValueError naming the argument, what was expected and what was found."""
    return ValueError(f"{key}: expected {expected}, found {found!r}")


def sampled_layers(num_layers: int, count: int) -> list[int]:
    """Indices of ``count`` layers evenly spaced through the depth (first and last included when
    count >= 2): the layers whose effective rank is reported (``plora.rank_sample_layers``)."""
    k = min(count, num_layers)
    return sorted({round(j * (num_layers - 1) / max(1, k - 1)) for j in range(k)}) if k else []


def _check_threshold(rel_threshold: float) -> None:
    if not 0.0 < rel_threshold < 1.0:
        raise argument_error("plora.rank_threshold", "a number in (0, 1)", rel_threshold)


def rank_of_spectrum(singular_values: torch.Tensor, rel_threshold: float) -> int:
    """The effective-rank rule: singular values above ``rel_threshold`` times the largest one.

    The one rule behind ``effective_rank`` (dense) and ``factor_effective_rank`` (from the
    factors); an empty or all-zero spectrum has rank 0.

    Raises:
        ValueError: ``rel_threshold`` is not in (0, 1) (named ``plora.rank_threshold``).
    """
    _check_threshold(rel_threshold)
    if singular_values.numel() == 0:
        return 0
    top = singular_values.max()
    if not float(top) > 0.0:
        return 0
    return int((singular_values > rel_threshold * top).sum())


def effective_rank(matrix: torch.Tensor, rel_threshold: float) -> int:
    """Number of singular values of ``matrix`` above ``rel_threshold`` times the largest one.

    The dense check (``torch.linalg.svdvals`` of the whole matrix); the unload computes the same
    number from the merged factors (``factor_effective_rank``). A zero matrix has effective rank
    0. Computed in fp32 (float64 input stays float64).

    Raises:
        ValueError: ``matrix`` is not 2-D, or ``rel_threshold`` is not in (0, 1).
    """
    if matrix.dim() != 2:
        raise argument_error("matrix", "a 2-D tensor", tuple(matrix.shape))
    _check_threshold(rel_threshold)
    m = matrix.detach()
    if m.dtype not in (torch.float32, torch.float64):
        m = m.float()
    return rank_of_spectrum(torch.linalg.svdvals(m), rel_threshold)


class FactorGrams:
    """The Grams G_B = BᵀB and G_A = A Aᵀ of a growing list of merges, extended one at a time.

    An unload appends one merge (coef·B_k, A_k) to a layer's factors; the Grams of the stacked
    factors gain one block row and column, B_kᵀ B_s and A_k A_sᵀ for s <= k: r x r products
    over the layer's width, so tracking the rank costs O(width · k · r²) per unload instead of
    re-stacking every factor (a pass over out x k·r and in x k·r in fp64, growing with k).
    fp64, on the factors' device.
    """

    def __init__(self) -> None:
        self.g_b = torch.zeros(0, 0, dtype=torch.float64)
        self.g_a = torch.zeros(0, 0, dtype=torch.float64)
        self.count = 0
        self.dims = (0, 0)

    def extend(self, factors: list[Factors]) -> None:
        """Bring the Grams up to ``factors`` (the same list, grown since the last call)."""
        for k in range(self.count, len(factors)):
            b_k, a_k = factors[k][0].double(), factors[k][1].double()
            dev = b_k.device
            row_b = torch.cat([factors[s][0].double().to(dev).T @ b_k for s in range(k + 1)])
            row_a = torch.cat([factors[s][1].double().to(dev) @ a_k.T for s in range(k + 1)])
            self.g_b = _grow(self.g_b.to(dev), row_b)
            self.g_a = _grow(self.g_a.to(dev), row_a)
            self.dims = (b_k.shape[0], a_k.shape[1])
        self.count = len(factors)

    def rank(self, rel_threshold: float) -> int:
        """The effective rank of Σ_s B_s A_s (see ``factor_effective_rank``)."""
        _check_threshold(rel_threshold)
        if self.count == 0:
            return 0
        s, v = torch.linalg.eigh(self.g_a)
        half = v * s.clamp_min(0).sqrt()
        squares = torch.linalg.eigvalsh(half.T @ self.g_b @ half)
        # Roundoff of the product (as numpy's matrix_rank tolerance, on σ² <= ||G_B||·||G_A||):
        # merges that cancel exactly leave noise of this size, where the dense sum is zero.
        eps = torch.finfo(torch.float64).eps * max(*self.dims, self.g_b.shape[0])
        floor = eps * torch.linalg.matrix_norm(self.g_b, 2) * s.max().clamp_min(0)
        kept = torch.where(squares > floor, squares, torch.zeros_like(squares))
        return rank_of_spectrum(kept.sqrt(), rel_threshold)


def _grow(gram: torch.Tensor, column: torch.Tensor) -> torch.Tensor:
    """A symmetric Gram with one block row and column appended (``column``: the new block column,
    whose last block is the new diagonal block)."""
    n, r = gram.shape[0], column.shape[1]
    out = torch.empty(n + r, n + r, dtype=gram.dtype, device=column.device)
    out[:n, :n] = gram
    out[:, n:] = column
    out[n:, :n] = column[:n].T
    return out


def factor_effective_rank(factors: list[Factors], rel_threshold: float) -> int:
    """``effective_rank`` of Σ_s B_s A_s computed from the factors, without the dense matrix.

    With B = [B_1 .. B_k] (out x k·r) and A = [A_1; ..; A_k] (k·r x in), Σ_s B_s A_s = B A, and
    its squared singular values are the eigenvalues of G_A^½ G_B G_A^½ with the k·r x k·r Grams
    G_B = BᵀB and G_A = A Aᵀ (G_A^½ = V S^½ from G_A's eigendecomposition): thin products and
    two small eigendecompositions, in fp64 on the factors' device, instead of an SVD of
    out x in. fp64 because the Grams square the spread of the spectrum: their rounding (1e-16
    relative) then sits far below any threshold in (0, 1) squared. The threshold rule is
    ``rank_of_spectrum``, as for the dense ``effective_rank``. An unload keeps a ``FactorGrams``
    per sampled layer and extends it by its own merge only.

    Args:
        factors: ``(coef_s * B_s, A_s)`` of every merge so far (the coefficient folded into B,
            as ``PLoRA.base_factors`` keeps them); empty means a zero update (rank 0).
        rel_threshold: ``plora.rank_threshold``.

    Raises:
        ValueError: ``rel_threshold`` is not in (0, 1).
    """
    _check_threshold(rel_threshold)
    grams = FactorGrams()
    grams.extend(factors)
    return grams.rank(rel_threshold)
