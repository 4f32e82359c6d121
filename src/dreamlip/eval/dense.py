"""Dense read-outs: patch embeddings from a modified last block of an open_clip ViT (no training).

Raw CLIP patch tokens localise poorly; the training-free segmentation literature changes only the
last transformer block, at inference, and reads every token through the final norm and projection
as the class token is. Blocks ``0..L-2`` run unchanged (shared by every read-out); with ``h`` the
last block's input, ``y = ln_1(h)``, ``q, k, v`` its per-head projections (``d`` = head width,
``s = d ** -0.5``), ``O`` the attention's output projection and ``ls_1``/``ls_2`` the block's
layer scales (identity in CLIP), the last block becomes:

* ``raw``: the block as trained (today's patch tokens);
* ``maskclip`` (Zhou et al., arXiv 2112.01071): ``ls_1(O(v))``, the value path only, no
  query-key attention, no residual, no feed-forward;
* ``sclip`` (Wang et al., arXiv 2312.01597): correlative self-attention
  ``a = ls_1(O((softmax(s q q^T) + softmax(s k k^T)) v))``, then the block's residuals as trained,
  ``z = h + a``, ``z + ls_2(mlp(ln_2(z)))``;
* ``clearclip`` (Lan et al., arXiv 2407.12442): ``ls_1(O(softmax(s q q^T) v))``, no residual, no
  feed-forward;
* ``naclip`` (Hajimiri et al., arXiv 2404.08181): ``ls_1(O(softmax(s k k^T + G) v))``, no
  residual, no feed-forward, where ``G[i, j] = exp(-|p_i - p_j|^2 / (2 std^2))`` for patches at
  grid positions ``p_i, p_j`` (std 5 patches) and 0 in the class token's row and column.

The attention runs over all tokens, class token included (as the papers' code does); the patch
tokens are then ``ln_post(z)[:, 1:] @ proj``, L2-normalised. The global (class-token) embedding
is never changed: it comes from :meth:`encode_image` as always.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "DENSE_READOUTS",
    "NACLIP_STD",
    "dense_patch_embeddings",
    "neighbourhood_prior",
    "parse_readouts",
    "vision_tower",
]

DENSE_READOUTS = ("raw", "maskclip", "sclip", "clearclip", "naclip")
NACLIP_STD = 5.0  # NACLIP's Gaussian std in patches (its reference configuration)


def parse_readouts(value: str | Sequence[str]) -> list[str]:
    """``"raw"``, ``"raw,naclip"`` or a list -> the read-out names, in order, without repeats."""
    names = value.split(",") if isinstance(value, str) else list(value)
    names = list(dict.fromkeys(n.strip() for n in names if n.strip()))
    unknown = [n for n in names if n not in DENSE_READOUTS]
    if unknown or not names:
        raise ValueError(f"dense read-out(s) {unknown or names!r}: expected some of {list(DENSE_READOUTS)}")
    return names


def vision_tower(model: Any) -> nn.Module:
    """The open_clip VisionTransformer of a DreamLIPModel or an open_clip CLIP, checked."""
    from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

    visual = getattr(getattr(model, "clip", model), "visual", None)
    if not isinstance(visual, VisionTransformer) or visual.attn_pool is not None:
        raise ValueError(
            "dense read-outs other than 'raw' need an open_clip VisionTransformer image tower without "
            f"attentional pooling; this model's is {type(visual).__name__}"
        )
    last = visual.transformer.resblocks[-1]
    attn = getattr(last, "attn", None)
    if not (
        isinstance(last, ResidualAttentionBlock)
        and isinstance(attn, nn.MultiheadAttention)
        and attn._qkv_same_embed_dim
        and attn.bias_k is None
        and visual.transformer.batch_first
    ):
        raise ValueError(
            "dense read-outs other than 'raw' need open_clip's default ResidualAttentionBlock "
            f"(nn.MultiheadAttention, batch first) as the last block; this one is {type(last).__name__}"
        )
    return visual


def neighbourhood_prior(grid: tuple[int, int], std: float, device=None, dtype=None) -> torch.Tensor:
    """NACLIP's additive logits ``[1 + H*W, 1 + H*W]``: a Gaussian of the patches' grid distance,
    0 for the class token (index 0)."""
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    position = torch.stack([rows.flatten(), cols.flatten()], dim=1).to(torch.float64)
    squared = torch.cdist(position, position).square()
    prior = torch.zeros(len(position) + 1, len(position) + 1, dtype=torch.float64)
    prior[1:, 1:] = torch.exp(-squared / (2 * std**2))
    return prior.to(device=device, dtype=dtype)


def _last_block(block: nn.Module, h: torch.Tensor, readout: str, grid: tuple[int, int], std: float):
    if readout == "raw":
        return block(h)
    attn = block.attn
    batch, length, width = h.shape
    q, k, v = F.linear(block.ln_1(h), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    if readout == "maskclip":
        mixed = v
    else:
        q, k, v = (t.reshape(batch, length, attn.num_heads, -1).transpose(1, 2) for t in (q, k, v))
        # scaled_dot_product_attention's default scale is head_dim ** -0.5, the papers' s
        if readout == "sclip":  # (softmax(qq) + softmax(kk)) v = softmax(qq) v + softmax(kk) v
            mixed = F.scaled_dot_product_attention(q, q, v) + F.scaled_dot_product_attention(k, k, v)
        elif readout == "clearclip":
            mixed = F.scaled_dot_product_attention(q, q, v)
        elif readout == "naclip":
            prior = neighbourhood_prior(grid, std, device=h.device, dtype=q.dtype)
            mixed = F.scaled_dot_product_attention(k, k, v, attn_mask=prior)
        else:
            raise ValueError(f"unknown dense read-out {readout!r}")
        mixed = mixed.transpose(1, 2).reshape(batch, length, width)
    out = block.ls_1(attn.out_proj(mixed))
    if readout == "sclip":  # SCLIP keeps the block's residual connections and feed-forward
        out = h + out
        out = out + block.ls_2(block.mlp(block.ln_2(out)))
    return out


@torch.no_grad()
def dense_patch_embeddings(
    model: Any, images: torch.Tensor, readouts: Sequence[str], *, naclip_std: float = NACLIP_STD
) -> dict[str, torch.Tensor]:
    """Normalised projected patch embeddings ``[B, N, D]`` per read-out (module docstring), from one
    run of blocks ``0..L-2``. ``model`` is a DreamLIPModel or an open_clip CLIP with a ViT tower."""
    visual = vision_tower(model)
    readouts = parse_readouts(readouts)
    grid = (images.shape[-2] // visual.patch_size[0], images.shape[-1] // visual.patch_size[1])
    blocks = visual.transformer.resblocks
    h = visual._embeds(images)  # patch + position embeddings, ln_pre (as visual.forward)
    for block in blocks[:-1]:
        h = block(h)
    out = {}
    for readout in readouts:
        tokens = visual.ln_post(_last_block(blocks[-1], h, readout, grid, naclip_std))[:, 1:]
        out[readout] = F.normalize(tokens @ visual.proj, dim=-1)
    return out
