"""An open_clip model that also returns projected patch tokens, with dynamic-length text encoding.

DreamLIP needs three things from a CLIP model per step: the global image embedding, the patch
tokens projected into the joint space (for the grouping loss), and embeddings of ``K + 1`` short
texts per image. The towers, tokenizer and checkpoint format stay open_clip's, so a model trained
here loads in open_clip and clip_benchmark unchanged.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from dataclasses import dataclass
from importlib import resources
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn

from dreamlip._compat import ensure_torchvision

__all__ = [
    "LONG_CLIP_KEEP",
    "DreamLIPModel",
    "ModelOutput",
    "PatchTokensUnavailable",
    "create_model",
    "get_tokenizer",
    "length_buckets",
    "load_open_clip",
    "saved_context_length",
    "stretch_positional_embedding",
    "with_context_length",
]



@functools.cache
def load_open_clip():
    """open_clip, imported on first use rather than at ``import dreamlip.model``.

    Importing it imports torchvision, which next to a CPU torch needs ``ensure_torchvision`` (a
    no-op where torchvision loads); the first call also registers ``model_configs/`` with open_clip,
    once per process (open_clip's ``add_model_config`` would append the folder again each call).
    """
    ensure_torchvision()
    import open_clip

    open_clip.add_model_config(resources.files("dreamlip") / "model_configs")
    return open_clip

# Long-CLIP (arXiv 2403.15378) finds CLIP's effective text length under 20 tokens: the first 20
# positions are the well-trained ones, so its stretch keeps them and interpolates only the rest.
LONG_CLIP_KEEP = 20


class PatchTokensUnavailable(ValueError):
    """The image tower cannot give per-patch embeddings, which the grouping loss needs."""


@dataclass
class ModelOutput:
    image_emb: torch.Tensor  # [B, D], normalised
    text_emb: torch.Tensor  # [B, T, D] (or the token tensor's leading shape), normalised
    patch_emb: torch.Tensor | None  # [B, N, D], normalised, class token excluded
    logit_scale: torch.Tensor  # log of the global temperature's inverse
    token_emb: torch.Tensor | None = None  # [B, T, L', D], normalised, per text position (with_tokens only)
    token_mask: torch.Tensor | None = None  # [B, T, L'], bool: the content tokens (not start, end, padding)


class DreamLIPModel(nn.Module):
    """Wraps an open_clip ``CLIP`` (``self.clip``): normalised embeddings, patch tokens, per-token
    text embeddings and length-bucketed text encoding. It adds no parameter: ``self.clip`` is an
    ordinary open_clip model, whose state dict is what gets exported. What an objective adds
    (temperatures, biases, poolers) is the objective's (``dreamlip.objectives``).
    """

    def __init__(self, clip: nn.Module, text_buckets: int = 8, text_packing: Literal["auto"] | bool = "auto"):
        super().__init__()
        self.clip = clip
        self.text_buckets = text_buckets
        self.text_packing = self.resolve_text_packing(text_packing)  # whether encode_text packs

    def resolve_text_packing(self, setting: Literal["auto"] | bool, sharded: bool = False) -> bool:
        """Whether ``encode_text`` may pack the text tower (:meth:`_packed_text_transformer`) under
        the ``model.text_packing`` setting: ``"auto"`` where it applies, ``True`` there or a
        ValueError saying why not, ``False`` never. It applies to open_clip's plain causal CLIP text
        tower, not ``sharded`` (FSDP2), as the packed path re-runs its blocks' layers itself."""
        if not (isinstance(setting, bool) or setting == "auto"):
            raise ValueError(f"model.text_packing must be auto, true or false; got {setting!r}")
        if setting is False:
            return False
        obstacle = self._packing_obstacle(sharded)
        if obstacle is not None and setting is True:
            raise ValueError(obstacle)
        return obstacle is None

    def _packing_obstacle(self, sharded: bool) -> str | None:
        """Why the packed path cannot stand in for ``clip.transformer`` here, or None: it re-runs
        open_clip's plain ``ResidualAttentionBlock`` with SDPA's own causal masking, so any other
        block or mask is refused rather than computed otherwise."""
        from open_clip.transformer import ResidualAttentionBlock

        clip = self.clip
        if not self._can_crop_text():
            return (f"model.text_packing needs open_clip's causal CLIP text tower pooled at its end token; "
                    f"this model's is {type(clip).__name__}: set it to false")
        if sharded:  # FSDP2 gathers a block's weights when the block is called; the packed path calls its layers
            return ("model.text_packing runs the text blocks' layers directly, which FSDP2 does not gather: "
                    "use run.strategy=ddp or model.text_packing=false")
        mask = clip.attn_mask
        if not torch.equal(mask, torch.full_like(mask, float("-inf")).triu(1)):
            return "model.text_packing needs open_clip's causal text mask; this tower has another: set it to false"
        for block in clip.transformer.resblocks:
            attn = getattr(block, "attn", None)
            plain = (
                type(block) is ResidualAttentionBlock
                and not hasattr(block, "ln_1_kv")
                and isinstance(attn, nn.MultiheadAttention)
                and attn.batch_first
                and attn._qkv_same_embed_dim
                and attn.bias_k is None
                and not attn.add_zero_attn
            )
            if not plain:
                return (f"model.text_packing needs open_clip's plain ResidualAttentionBlock with batch-first "
                        f"nn.MultiheadAttention in the text tower; this one has {type(block).__name__}: set it to false")
        return None

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.clip.logit_scale

    @property
    def embed_dim(self) -> int:
        """The width of the joint embedding space."""
        for tower in (self.clip.visual, getattr(self.clip, "text", None)):
            if getattr(tower, "output_dim", None):
                return tower.output_dim
        return self.clip.text_projection.shape[-1]

    @property
    def context_length(self) -> int:
        """Text positions the model has (open_clip's ``context_length``)."""
        return self.clip.context_length

    @property
    def has_patch_tokens(self) -> bool:
        from open_clip.transformer import VisionTransformer  # a model exists, so open_clip is loaded

        visual = self.clip.visual
        return isinstance(visual, VisionTransformer) and visual.attn_pool is None and visual.pool_type != "none"

    def encode_image(
        self, images: torch.Tensor, with_patches: bool = False, patch_projection_grad: bool = True, normalize: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Normalised global embedding ``[B, D]`` and, if asked, normalised patch embeddings ``[B, N, D]``;
        with ``patch_projection_grad=False`` the patches' gradient does not reach the projection; with
        ``normalize=False`` both as projected, before normalising."""
        norm = _normalizer(normalize)
        if not with_patches:
            return norm(self.clip.encode_image(images)), None
        if not self.has_patch_tokens:
            raise PatchTokensUnavailable(
                f"the grouping loss needs patch tokens from an open_clip VisionTransformer without "
                f"attentional pooling; this model's image tower is {type(self.clip.visual).__name__}. "
                f"Set the grouping loss weight to 0 or use a ViT tower."
            )
        visual = self.clip.visual
        # forward_intermediates applies the final norm (ln_post) to the last block's tokens and
        # pools the class token exactly as visual.forward does.
        out = visual.forward_intermediates(images, indices=1, normalize_intermediates=True, output_fmt="NLC")
        projection = visual.proj if patch_projection_grad else visual.proj.detach()
        patches = out["image_intermediates"][-1] @ projection  # same projection as the class token
        return norm(out["image_features"]), norm(patches)

    def encode_text(
        self, tokens: torch.Tensor, with_tokens: bool = False, normalize: bool = True
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normalised embeddings for a token tensor ``[..., L]``, returned as ``[..., D]``.

        A causal text tower pooled at the end-of-text token only looks left, so running it on a
        sequence cropped after its end token gives the same embedding for far less work
        (sub-captions are 10-30 tokens of a 77-token context). The texts are sorted by length and
        cut into ``text_buckets`` groups (fewer in small batches), each run at its own longest
        length, with the cuts placed to run the fewest padded tokens (:func:`length_buckets`): on
        sub-captions, 8 groups run 1.07x the tokens the texts hold, where one padded group runs 2x.
        A text that occurs more than once in the batch (short captions and stock sentences recur)
        is encoded once. With ``text_packing`` the blocks' per-token layers run once over every group's
        tokens and only attention per group (:meth:`_packed_text_transformer`): the same embeddings,
        weight gradients equal up to summation order.

        With ``with_tokens`` it returns ``(pooled, token_emb, token_mask)``: also every position's
        embedding (ln_final and the text projection, as the pooled one) ``[..., L', D]``, normalised,
        with L' the longest text run and zeros past each text's end, and a bool ``[..., L']`` marking
        the content tokens (the start token at 0, the end token and padding excluded): the inputs of
        SPARC's token-level grouping. The end token's embedding is the pooled one (up to rounding).
        ``normalize=False``: the embeddings as projected, before normalising (COSMOS's cross-attention
        reads those).
        """
        norm = _normalizer(normalize)
        leading = tokens.shape[:-1]
        flat = tokens.reshape(-1, tokens.shape[-1])
        clip = self.clip
        if not self._can_crop_text():
            if with_tokens:
                raise ValueError(
                    f"per-token text embeddings (loss.group_granularity=token) need open_clip's causal CLIP "
                    f"text tower pooled at its end token; this model's is {type(clip).__name__}"
                )
            # Token rows may be shorter than the context (a 77-token evaluation of a longer model).
            x = clip.encode_text(F.pad(flat, (0, max(0, clip.context_length - flat.shape[-1]))))
            return norm(x).reshape(*leading, x.shape[-1])
        texts, inverse = torch.unique(flat, dim=0, return_inverse=True)
        if clip.text_pool_type == "argmax":
            end = texts.argmax(dim=-1)
        else:
            end = (texts == clip.text_eos_id).int().argmax(dim=-1)
        # From the input's shape, not its content: the same on every rank. Tiny groups only add overhead.
        buckets = max(1, min(self.text_buckets, len(flat) // 8))
        order = torch.argsort(end, stable=True)
        sizes, lengths = length_buckets((end + 1).tolist(), buckets)
        cast_dtype = clip.transformer.get_cast_dtype()
        # One embedding lookup for every text: its backward writes a vocabulary-sized gradient, so
        # once per step rather than once per bucket.
        longest = max(lengths)
        x = clip.token_embedding(texts[order, :longest]).to(cast_dtype)
        x = x + clip.positional_embedding[:longest].to(cast_dtype)
        parts = [part[:, :length] for part, length in zip(x.split(sizes), lengths)]
        parts = self._packed_text_transformer(parts) if self.text_packing else [
            clip.transformer(part, attn_mask=clip.attn_mask[: part.shape[1], : part.shape[1]]) for part in parts
        ]
        at_end, every_position = [], []
        for part, part_end, length in zip(parts, end[order].split(sizes), lengths):
            at_end.append(part[torch.arange(len(part), device=part.device), part_end])
            if with_tokens:
                every_position.append(F.pad(part, (0, 0, 0, longest - length)))
        # ln_final normalises each position on its own: after pooling it gives the same and costs less
        x = self._project_text(clip.ln_final(torch.cat(at_end)))
        to_input_order = torch.argsort(order)[inverse]  # unique, length-sorted -> input order
        x = x.index_select(0, to_input_order)
        pooled = norm(x).reshape(*leading, x.shape[-1])
        if not with_tokens:
            return pooled
        per_position = norm(self._project_text(clip.ln_final(torch.cat(every_position))))
        position = torch.arange(longest, device=flat.device)
        sorted_end = end[order].unsqueeze(1)
        per_position = per_position.masked_fill((position > sorted_end).unsqueeze(-1), 0.0)  # past the end: padding
        content = (position > 0) & (position < sorted_end)
        token_emb = per_position.index_select(0, to_input_order).reshape(*leading, longest, x.shape[-1])
        return pooled, token_emb, content.index_select(0, to_input_order).reshape(*leading, longest)

    def _packed_text_transformer(self, parts: list[torch.Tensor]) -> list[torch.Tensor]:
        """``clip.transformer`` over each ``[n, L, width]`` run, with the per-token work packed.

        Layer norms, the attention's in- and out-projections and the MLP see every run's tokens
        as one ``[tokens, width]`` matrix, so each is one large matrix product rather than one small
        one per run; only the causal attention itself runs per run, at that run's length. The
        blocks' own weights, in open_clip's ``ResidualAttentionBlock`` order of operations; only
        for a tower :meth:`resolve_text_packing` accepts.
        """
        transformer = self.clip.transformer
        shapes = [part.shape[:2] for part in parts]
        x = torch.cat([part.reshape(-1, part.shape[-1]) for part in parts])
        for block in transformer.resblocks:
            if transformer.grad_checkpointing:
                x = torch.utils.checkpoint.checkpoint(self._packed_block, block, x, shapes, use_reentrant=False)
            else:
                x = self._packed_block(block, x, shapes)
        return [run.view(*shape, -1) for run, shape in zip(x.split([n * length for n, length in shapes]), shapes)]

    def _packed_block(self, block: nn.Module, x: torch.Tensor, shapes: list[torch.Size]) -> torch.Tensor:
        attn = block.attn
        heads, width = attn.num_heads, attn.embed_dim
        qkv = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)
        mixed = []
        for run, (n, length) in zip(qkv.split([n * length for n, length in shapes]), shapes):
            # [n * L, 3 * width] -> q, k, v as [n, heads, L, head_dim]
            q, k, v = run.view(n, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=attn.dropout if attn.training else 0.0)
            mixed.append(out.transpose(1, 2).reshape(n * length, width))
        x = x + block.ls_1(attn.out_proj(torch.cat(mixed)))
        return x + block.ls_2(block.mlp(block.ln_2(x)))

    def _project_text(self, x: torch.Tensor) -> torch.Tensor:
        projection = self.clip.text_projection
        if isinstance(projection, nn.Linear):
            return projection(x)
        return x if projection is None else x @ projection

    def _can_crop_text(self) -> bool:
        clip = self.clip
        return (
            isinstance(clip, load_open_clip().CLIP)
            and clip.attn_mask is not None
            and clip.text_pool_type in ("argmax", "eos")
        )

    def forward(
        self,
        images: torch.Tensor,
        tokens: torch.Tensor,
        with_patches: bool = True,
        with_tokens: bool = False,
        patch_projection_grad: bool = True,
    ) -> ModelOutput:
        """``with_tokens``: the texts' per-token embeddings too, for token-level grouping."""
        image_emb, patch_emb = self.encode_image(images, with_patches, patch_projection_grad)
        text_emb, token_emb, token_mask = self.encode_text(tokens, with_tokens=True) if with_tokens else (self.encode_text(tokens), None, None)
        return ModelOutput(
            image_emb=image_emb,
            text_emb=text_emb,
            patch_emb=patch_emb,
            logit_scale=self.clip.logit_scale,
            token_emb=token_emb,
            token_mask=token_mask,
        )

    @torch.no_grad()
    def clamp_logit_scale(self, max_scale: float = 100.0) -> None:
        """Keep the temperature's inverse at most ``max_scale`` (as open_clip does after each step)."""
        self.clip.logit_scale.clamp_(0, math.log(max_scale))


def _normalizer(normalize: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    return functools.partial(F.normalize, dim=-1) if normalize else (lambda x: x)


def length_buckets(lengths: list[int], buckets: int) -> tuple[list[int], list[int]]:
    """Cut texts sorted by length into exactly ``buckets`` runs that pad the fewest tokens.

    A run costs its size times its longest length. Exact dynamic programme over the distinct lengths
    (at most the context length, 77 or 248), so it costs microseconds whatever the batch; if that needs
    fewer runs, the largest are halved (free: same length). The count is fixed so that every rank
    runs the text tower equally often (FSDP2 gathers and reduces once per call); with fewer texts
    than runs, the extra runs are empty. Returns the runs' sizes and lengths, shortest first, in
    the order ``sorted(lengths)`` lists the texts.
    """
    sizes, run_lengths = _fewest_token_runs(lengths, buckets) if lengths else ([], [])
    while len(sizes) < buckets and max(sizes, default=0) > 1:
        i = max(range(len(sizes)), key=sizes.__getitem__)
        half = sizes[i] // 2
        sizes[i : i + 1] = [half, sizes[i] - half]
        run_lengths.insert(i, run_lengths[i])
    padding = buckets - len(sizes)
    return [0] * padding + sizes, [1] * padding + run_lengths


def _fewest_token_runs(lengths: list[int], max_runs: int) -> tuple[list[int], list[int]]:
    values, counts = torch.tensor(lengths, dtype=torch.float64).unique(return_counts=True)
    before = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).double()  # texts shorter than values[i]
    m = len(values)
    # cost[i, j]: one run holding every text of length values[i..j], padded to values[j]
    cost = (before[1:].unsqueeze(0) - before[:-1].unsqueeze(1)) * values.unsqueeze(0)
    cost = cost.masked_fill(~torch.ones(m, m, dtype=torch.bool).triu(), torch.inf)
    best, starts = cost[0], [torch.zeros(m, dtype=torch.long)]
    for _ in range(min(max_runs, m) - 1):
        # best[j]: fewest tokens for values[0..j] in the runs so far; a new last run starts at i
        prefix = torch.cat([best.new_zeros(1), best[:-1]])
        best, start = (prefix.unsqueeze(1) + cost).min(dim=0)
        starts.append(start)
    sizes, run_lengths, j = [], [], m - 1
    for start in reversed(starts):
        if j < 0:
            break
        i = int(start[j])
        sizes.append(int(before[j + 1] - before[i]))
        run_lengths.append(int(values[j]))
        j = i - 1
    return sizes[::-1], run_lengths[::-1]


def create_model(
    model_name: str,
    pretrained: str | None = None,
    *,
    context_length: int | None = None,
    stretch_positions: bool = False,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    **kwargs: Any,
) -> tuple[DreamLIPModel, Any, Any]:
    """Build an open_clip architecture (any name open_clip knows, plus ours in ``model_configs/``).

    ``pretrained`` is an open_clip checkpoint file (or a tag open_clip knows) to fine-tune from.
    ``context_length`` sizes the text tower's positional embedding and causal mask (default: the
    architecture's, 77 for CLIP's). Pretrained weights with fewer positions need
    ``stretch_positions=True``: Long-CLIP's knowledge-preserving stretch
    (:func:`stretch_positional_embedding`). Returns ``(model, train_transform, eval_transform)``.
    """
    if stretch_positions and pretrained is None:
        raise ValueError("stretch_positions stretches pretrained positions: give pretrained weights too")
    open_clip = load_open_clip()
    with _quiet_random_init_warning():
        clip, train_transform, eval_transform = open_clip.create_model_and_transforms(
            model_name,
            pretrained=pretrained,
            device=device,
            precision=precision,
            # pretrained weights load at their own length first, then get stretched
            force_context_length=None if pretrained else context_length,
            **kwargs,
        )
    if context_length is not None and context_length != clip.context_length:
        if not stretch_positions:
            raise ValueError(
                f"{pretrained} has {clip.context_length} text positions, context_length is "
                f"{context_length}: set stretch_positions=true (model.stretch_positions) to stretch them"
            )
        clip = with_context_length(clip, model_name, context_length, device=device, precision=precision, **kwargs)
    return DreamLIPModel(clip).to(device), train_transform, eval_transform


def with_context_length(
    clip: nn.Module, model_name: str, context_length: int, *, device: str | torch.device = "cpu", **kwargs: Any
) -> nn.Module:
    """A copy of open_clip model ``clip`` (architecture ``model_name``) with ``context_length``
    text positions: the same weights, its positional embedding stretched as Long-CLIP does."""
    open_clip = load_open_clip()
    from open_clip.model import get_model_preprocess_cfg, set_model_preprocess_cfg

    if not isinstance(clip, open_clip.CLIP):
        raise ValueError(f"changing the context length needs open_clip's own text tower, not {type(clip).__name__}")
    state = clip.state_dict()
    state["positional_embedding"] = stretch_positional_embedding(state["positional_embedding"], context_length)
    with _quiet_random_init_warning():
        longer = open_clip.create_model(
            model_name, load_weights=False, force_context_length=context_length, device=device, **kwargs
        )
    longer.load_state_dict(state)
    set_model_preprocess_cfg(longer, get_model_preprocess_cfg(clip))  # e.g. a pretrained tag's mean/std
    return longer


def stretch_positional_embedding(
    positions: torch.Tensor, context_length: int, keep: int = LONG_CLIP_KEEP
) -> torch.Tensor:
    """Long-CLIP's knowledge-preserving stretch of a ``[L, D]`` positional embedding to
    ``[context_length, D]``: the first ``keep`` rows unchanged, the others linearly interpolated
    so that rows ``keep..L-1`` spread over ``keep..context_length-1``.

    New row ``p >= keep`` sits at old coordinate ``keep + (p - keep) (L - keep) / (N - keep)``;
    the last few coordinates pass ``L - 1`` and continue the last two rows' line. For 77 -> 248
    that is Long-CLIP's 4x interpolation with ``(1 - r/4, r/4)`` weights, ending in ``4`` rows
    extrapolated from the last two (its 4L - 3 keep = 248).
    """
    length = positions.shape[0]
    if not keep < length <= context_length:
        raise ValueError(f"stretch lengthens {length} > {keep} positions; asked for {context_length}")
    if length == context_length:
        return positions.clone()
    old = positions.double()
    coordinate = keep + torch.arange(context_length - keep, dtype=torch.float64) * (length - keep) / (context_length - keep)
    left = coordinate.floor().long().clamp(max=length - 2)
    weight = (coordinate - left).unsqueeze(1)
    tail = (1 - weight) * old[left] + weight * old[left + 1]
    return torch.cat([old[:keep], tail]).to(positions.dtype)


def saved_context_length(payload: dict[str, Any]) -> int | None:
    """The text context a dreamlip checkpoint was trained with (None: the architecture's)."""
    return ((payload.get("config") or {}).get("model") or {}).get("context_length")


@contextlib.contextmanager
def _quiet_random_init_warning():
    """open_clip warns on every randomly initialised model, which is the normal case here."""

    def keep(record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def get_tokenizer(model_name: str, context_length: int | None = None):
    """open_clip's tokenizer for ``model_name`` (BPE vocab ships with open_clip: no download),
    padding and truncating to ``context_length`` (default: the architecture's)."""
    return load_open_clip().get_tokenizer(model_name, context_length=context_length)
