"""PixCLIP objective: L = L_CL + alpha * L_FC + beta * L_LG (paper eqs. 3-7).

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
    """
    keep = (coverage > tau).to(dense.dtype)
    empty = keep.sum(dim=1) == 0
    if empty.any():
        fallback = F.one_hot(coverage.argmax(dim=1), coverage.shape[1]).to(dense.dtype)
        keep = torch.where(empty[:, None], fallback, keep)
    return torch.einsum("bp,bpc->bc", keep, dense) / keep.sum(dim=1, keepdim=True)


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
    ):
        super().__init__()
        self.alpha, self.beta, self.use_fc, self.use_lg = alpha, beta, use_fc, use_lg
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
    ) -> dict[str, torch.Tensor]:
        scale = logit_scale.exp()
        out = {"cl": self.pair(main, text, scale)}
        total = out["cl"]
        if self.use_fc and crop is not None:
            out["fc"] = self.pair(crop, main, scale)
            total = total + self.alpha * out["fc"]
        if self.use_lg and local is not None:
            out["lg"] = self.pair(local, main, scale)
            total = total + self.beta * out["lg"]
        out["total"] = total
        return out

    def of_branches(self, branches, logit_scale: torch.Tensor) -> dict[str, torch.Tensor]:
        """The loss of `PixCLIP.branch_features`'s output (a `model.Branches`)."""
        return self(branches.main, branches.text, logit_scale, branches.crop, branches.local)
