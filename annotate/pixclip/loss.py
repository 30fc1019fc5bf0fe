"""PixCLIP objective: L = L_CL + alpha * L_FC + beta * L_LG (paper eqs. 3-7), and two optional
branches for the data of the stages after merge: MulCLIP's short text (summary vs mask embedding,
weight `short_weight`) and hard negatives (each region against its own description and K verified
negatives, with its own temperature), and the part branch (each part's mask embedding vs its short and
long texts, weight `part_weight`).

Every term is the symmetric InfoNCE of eq. 3, computed by open_clip's `ClipLoss`, which also does
the cross-rank feature gather (`open_clip.loss.gather_features`) when world_size > 1. One learnable
temperature (CLIP's log-scale `logit_scale`) is shared by the three terms. It is not clamped here:
a clamp in the forward pass has zero gradient above the bound, so the temperature could never come
back; like open_clip, the trainer clamps the parameter in place after each optimizer step
(`clamp_logit_scale`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from torch import nn

MAX_LOGIT_SCALE = 100.0  # CLIP's clamp on exp(logit_scale)


@torch.no_grad()
def clamp_logit_scale(logit_scale: torch.Tensor) -> None:
    """In place, after an optimizer step: 0 <= logit_scale <= ln(100), as open_clip's training loop does."""
    logit_scale.clamp_(0, math.log(MAX_LOGIT_SCALE))


def patch_coverage(mask: torch.Tensor, patch_size: int) -> torch.Tensor:
    """|M ∩ P| / |P| for every patch: (B, 1, H, W) in [0, 1] -> (B, P), row-major like the ViT tokens."""
    return F.avg_pool2d(mask.float(), patch_size).flatten(1)


def region_pool(dense: torch.Tensor, coverage: torch.Tensor, tau: float) -> torch.Tensor:
    """AvgPool of dense tokens (B, P, C) over patches with coverage > tau (eq. 5, before `proj`).

    A region that covers no patch above tau (small or thin objects) falls back to its single patch of
    highest coverage, so every sample still gets a local feature instead of a NaN from an empty mean.
    The fallback is chosen per row by `torch.where`, never by a Python branch on a tensor's value, so
    no step waits for the GPU here (scatter, not `F.one_hot`, which may range-check its input on device).
    """
    keep = (coverage > tau).to(dense.dtype)
    empty = keep.sum(dim=1, keepdim=True) == 0
    fallback = torch.zeros_like(keep).scatter_(1, coverage.argmax(dim=1, keepdim=True), 1.0)
    keep = torch.where(empty, fallback, keep)
    return torch.einsum("bp,bpc->bc", keep, dense) / keep.sum(dim=1, keepdim=True)


def hard_negative_loss(main: torch.Tensor, texts: torch.Tensor, mask: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each region over its own 1+K texts: `texts` (B, 1+K, E) holds its description
    first, then its negatives; `mask` (B, 1+K) marks the texts that exist. Regions without a negative
    are left out (their loss would be 0 anyway); a batch with none gives 0, still in the graph.
    Local to each rank: a region's texts are its own, so nothing is gathered.

    The mean cross-entropy over the regions with a negative, computed as a masked sum over all rows
    divided by their count (at least 1): no boolean indexing or branch on `has`, so nothing is read
    back to the host. Rows without a negative get zero logits before the softmax (a row with every
    text masked would otherwise be NaN) and weigh 0."""
    e = F.normalize(main.float(), dim=-1)
    t = F.normalize(texts.float(), dim=-1)
    logits = scale * torch.einsum("be,bke->bk", e, t)
    logits = logits.masked_fill(~mask, float("-inf"))
    has = mask[:, 1:].any(dim=1)
    logits = torch.where(has[:, None], logits, torch.zeros_like(logits))
    own = -F.log_softmax(logits, dim=1)[:, 0]  # each region's cross-entropy with target 0, its description
    weight = has.to(own.dtype)
    return (own * weight).sum() / weight.sum().clamp(min=1.0)


def masked_info_nce(emb: torch.Tensor, text: torch.Tensor, valid: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The symmetric InfoNCE of eq. 3 over the rows with `valid` (P,) true: each valid embedding against
    every valid text and back, then the mean over valid rows. Invalid rows and columns are masked, not
    dropped, so nothing is read back to the host; no valid row (or P == 0) gives 0, still in the graph."""
    e = F.normalize(emb.float(), dim=-1)
    t = F.normalize(text.float(), dim=-1)
    pair = valid[:, None] & valid[None, :]
    logits = (scale * e @ t.T).masked_fill(~pair, float("-inf"))
    row_ok = valid[:, None]  # an all -inf row would be NaN: invalid rows become zeros, and weigh 0
    to_text = torch.where(row_ok, logits, torch.zeros_like(logits))
    to_mask = torch.where(row_ok, logits.T, torch.zeros_like(logits))
    own = -(F.log_softmax(to_text, dim=1).diagonal() + F.log_softmax(to_mask, dim=1).diagonal()) / 2
    weight = valid.to(own.dtype)
    return (own * weight).sum() / weight.sum().clamp(min=1.0)


def part_loss(part: torch.Tensor, texts: torch.Tensor, text_mask: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The part branch: part mask embeddings (P, E) against their short texts, and separately against
    their long texts (`texts` (P, 2, E), `text_mask` (P, 2) which exist), in-batch negatives being the
    other parts; the mean of the two terms. Local to each rank: the part count differs between ranks
    and batches, and `all_gather` needs equal shapes. A batch without parts gives 0."""
    return (masked_info_nce(part, texts[:, 0], text_mask[:, 0], scale)
            + masked_info_nce(part, texts[:, 1], text_mask[:, 1], scale)) / 2


class PixCLIPLoss(nn.Module):
    """The three-branch loss on one batch; branches that are off (or not given) contribute nothing.

    - L_CL(e_v, e_t): mask-conditioned image embedding vs text.
    - L_FC(v_c, e_v): crop-branch embedding vs the main embedding. Only the positive-pair relation
      is kept (InfoNCE, not a regression onto the main embedding), as the paper's text asks.
    - L_LG(f'_v, e_v): region-pooled dense features of the all-ones-mask pass vs the main embedding.
    """

    def __init__(
        self,
        alpha: float = 0.25,
        beta: float = 0.25,
        use_fc: bool = True,
        use_lg: bool = True,
        rank: int = 0,
        world_size: int = 1,
        short_weight: float = 0.0,
        hard_negative_weight: float = 0.0,
        part_weight: float = 0.0,
    ):
        super().__init__()
        self.alpha, self.beta, self.use_fc, self.use_lg = alpha, beta, use_fc, use_lg
        self.short_weight, self.hard_negative_weight, self.part_weight = short_weight, hard_negative_weight, part_weight
        # gather_with_grad: each rank back-propagates through the whole global similarity matrix.
        self.clip = ClipLoss(gather_with_grad=True, rank=rank, world_size=world_size)

    def pair(self, a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return self.clip(F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1), scale)

    def forward(
        self,
        main: torch.Tensor,
        text: torch.Tensor,
        logit_scale: torch.Tensor,
        crop: torch.Tensor | None = None,
        local: torch.Tensor | None = None,
        short: torch.Tensor | None = None,
        negatives: torch.Tensor | None = None,
        negative_mask: torch.Tensor | None = None,
        negative_logit_scale: torch.Tensor | None = None,
        part: torch.Tensor | None = None,
        part_text: torch.Tensor | None = None,
        part_text_mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """`short` (B, E): the short texts' embeddings; `negatives` (B, 1+K, E) with `negative_mask`
        and the branch's own `negative_logit_scale`: see `hard_negative_loss`; `part` (P, E) with
        `part_text` (P, 2, E) and `part_text_mask`: see `part_loss`. Absent: no term."""
        scale = logit_scale.exp()
        out = {"cl": self.pair(main, text, scale)}
        total = out["cl"]
        if self.use_fc and crop is not None:
            out["fc"] = self.pair(crop, main, scale)
            total = total + self.alpha * out["fc"]
        if self.use_lg and local is not None:
            out["lg"] = self.pair(local, main, scale)
            total = total + self.beta * out["lg"]
        if short is not None:
            out["short"] = self.pair(main, short, scale)
            total = total + self.short_weight * out["short"]
        if negatives is not None:
            out["hn"] = hard_negative_loss(main, negatives, negative_mask, negative_logit_scale.exp())
            total = total + self.hard_negative_weight * out["hn"]
        if part is not None:
            out["part"] = part_loss(part, part_text, part_text_mask, scale)
            total = total + self.part_weight * out["part"]
        out["total"] = total
        return out

    def of_branches(self, branches, logit_scale: torch.Tensor) -> dict[str, torch.Tensor]:
        """The loss of `PixCLIP.branch_features`'s output (a `model.Branches`)."""
        return self(branches.main, branches.text, logit_scale, branches.crop, branches.local, branches.short,
                    branches.negatives, branches.negative_mask, branches.negative_logit_scale,
                    branches.part, branches.part_text, branches.part_text_mask)
