"""Pixel-adaptive mask refinement (PAMR; Araslanov & Roth, CVPR 2020, arXiv 2005.08104).

Score maps are smoothed along the image's own edges, as the training-free segmentation papers
(SCLIP, NACLIP) do after their read-outs. For pixel ``i`` and its neighbours ``j``, the 8 pixels at
offset ``d`` (rows and columns ``-d, 0, +d``) for each dilation ``d``, image borders replicated:

    kappa(i, j) = mean over channels c of  -|I_c(i) - I_c(j)| / (1e-8 + 0.1 * sigma_c(i))
    alpha(i, .) = softmax over j of kappa(i, j)
    m(i) <- sum_j alpha(i, j) m(j)          (``iterations`` times; the pixel itself is not in j)

where ``sigma_c(i)`` is the (unbiased) standard deviation of channel ``c`` over the pixel and its
neighbours, the pixel counted once per dilation. The affinities depend on the image only up to a
per-channel affine map, so a normalised image gives the same result as a raw one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["PAMR_DILATIONS", "PAMR_ITERATIONS", "pamr"]

# As SCLIP's and NACLIP's evaluation code run it (their PAMR(10, dilations=(8, 16))).
PAMR_ITERATIONS = 10
PAMR_DILATIONS = (8, 16)


def _shifts(dilations: Sequence[int], centre: bool) -> list[tuple[int, int]]:
    return [
        (dy, dx)
        for d in dilations
        for dy in (-d, 0, d)
        for dx in (-d, 0, d)
        if centre or (dy, dx) != (0, 0)
    ]


def _shifted(x: torch.Tensor, shift: tuple[int, int], pad: int) -> torch.Tensor:
    """``x`` (already padded by ``pad`` replicating its border) read at ``(row + dy, col + dx)``."""
    dy, dx = shift
    height, width = x.shape[-2] - 2 * pad, x.shape[-1] - 2 * pad
    return x[..., pad + dy : pad + dy + height, pad + dx : pad + dx + width]


@torch.no_grad()
def pamr(
    image: torch.Tensor,
    scores: torch.Tensor,
    iterations: int = PAMR_ITERATIONS,
    dilations: Sequence[int] = PAMR_DILATIONS,
) -> torch.Tensor:
    """Refined ``scores [C, H, W]`` for ``image [3, H, W]`` (same height and width)."""
    if image.shape[-2:] != scores.shape[-2:]:
        raise ValueError(f"PAMR: image {tuple(image.shape)} and scores {tuple(scores.shape)} differ in size")
    pad = max(dilations)
    image = image.float()
    padded = F.pad(image[None], [pad] * 4, mode="replicate")[0]
    around = torch.stack([_shifted(padded, s, pad) for s in _shifts(dilations, centre=True)])
    spread = around.std(dim=0)  # [3, H, W]
    neighbours = _shifts(dilations, centre=False)
    kappa = torch.stack(
        [(-(_shifted(padded, s, pad) - image).abs() / (1e-8 + 0.1 * spread)).mean(0) for s in neighbours]
    )
    alpha = kappa.softmax(dim=0)  # [P, H, W]
    refined = scores.float()
    for _ in range(iterations):
        padded_scores = F.pad(refined[None], [pad] * 4, mode="replicate")[0]
        # one neighbour at a time: [C, P, H, W] at once would not fit for 171 classes at 500 px
        refined = sum(alpha[p] * _shifted(padded_scores, s, pad) for p, s in enumerate(neighbours))
    return refined.to(scores.dtype)
