"""The loss computes without reading a tensor back to the host (issue 26: the `empty.any()` of
`region_pool` and the `has.any()` / `int(has.sum())` / `logits[has]` of `hard_negative_loss` were
per-step syncs), with the same values and gradients as the formulas they replace; the part branch's
loss, added later, is held to the same rule."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from annotate.pixclip.loss import PixCLIPLoss, hard_negative_loss, region_pool

pytestmark = pytest.mark.usefixtures("one_thread")

# The ops through which a CPU-side read of a tensor's value happens: `.item()`, `bool()`, `int()`
# (`_local_scalar_dense`), boolean-mask indexing and `nonzero` (its output size depends on values).
SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "index.Tensor", "is_nonzero", "equal"}


class _SyncRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in SYNC_OPS or str(func.name()).split("::")[-1] in SYNC_OPS:
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def _old_region_pool(dense, coverage, tau):
    """The formula before issue 26, as it was (a Python branch on `empty.any()`)."""
    keep = (coverage > tau).to(dense.dtype)
    empty = keep.sum(dim=1) == 0
    if empty.any():
        fallback = F.one_hot(coverage.argmax(dim=1), coverage.shape[1]).to(dense.dtype)
        keep = torch.where(empty[:, None], fallback, keep)
    return torch.einsum("bp,bpc->bc", keep, dense) / keep.sum(dim=1, keepdim=True)


def _old_hard_negative_loss(main, texts, mask, scale):
    """The formula before issue 26, as it was (`has.any()`, `int(has.sum())`, `logits[has]`)."""
    e = F.normalize(main.float(), dim=-1)
    t = F.normalize(texts.float(), dim=-1)
    logits = scale * torch.einsum("be,bke->bk", e, t)
    logits = logits.masked_fill(~mask, float("-inf"))
    has = mask[:, 1:].any(dim=1)
    if not has.any():
        return logits.new_zeros(()) + 0.0 * scale
    target = torch.zeros(int(has.sum()), dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits[has], target)


def _pool_case(coverage: torch.Tensor, tau: float, seed: int):
    torch.manual_seed(seed)
    dense = torch.randn(coverage.shape[0], coverage.shape[1], 5, dtype=torch.float64)
    out = {}
    for name, fn in (("old", _old_region_pool), ("new", region_pool)):
        d = dense.clone().requires_grad_(True)
        pooled = fn(d, coverage.to(torch.float64), tau)
        (pooled * torch.linspace(-1, 1, pooled.numel(), dtype=torch.float64).view_as(pooled)).sum().backward()
        out[name] = (pooled.detach(), d.grad)
    return out


COVERAGES = {
    "some rows empty": torch.tensor([[0.9, 0.6, 0.1, 0.0], [0.2, 0.4, 0.3, 0.0], [0.0, 0.0, 0.0, 0.1]]),
    "every row empty": torch.tensor([[0.2, 0.1, 0.0, 0.0], [0.0, 0.0, 0.3, 0.3]]),  # ties: the first wins, as argmax
    "no row empty": torch.tensor([[0.9, 0.6, 0.7, 1.0], [0.6, 0.8, 0.3, 0.0]]),
    "all zero coverage": torch.zeros(2, 4),
    "random": torch.rand(16, 9),
}


@pytest.mark.parametrize("case", sorted(COVERAGES))
def test_region_pool_equals_the_old_branching_formula(case):
    res = _pool_case(COVERAGES[case], tau=0.5, seed=1)
    (old_v, old_g), (new_v, new_g) = res["old"], res["new"]
    assert torch.isfinite(new_v).all()
    assert torch.allclose(new_v, old_v, atol=1e-6, rtol=0) and torch.allclose(new_g, old_g, atol=1e-6, rtol=0)


def _negative_case(mask: torch.Tensor, seed: int):
    torch.manual_seed(seed)
    b, k1 = mask.shape
    main, texts = torch.randn(b, 6), torch.randn(b, k1, 6)
    out = {}
    for name, fn in (("old", _old_hard_negative_loss), ("new", hard_negative_loss)):
        m, t = main.clone().requires_grad_(True), texts.clone().requires_grad_(True)
        log_scale = torch.tensor(math.log(20.0), requires_grad=True)
        loss = fn(m, t, mask, log_scale.exp())
        loss.backward()
        out[name] = (loss.detach(), m.grad, t.grad, log_scale.grad)
    return out


MASKS = {
    "every region has negatives": torch.tensor([[True, True, True], [True, True, False]]),
    "some regions without a negative": torch.tensor([[True, False, False], [True, True, True], [True, False, True],
                                                     [True, False, False]]),
    "no region has a negative": torch.tensor([[True, False, False]] * 3),
    "a row with every text missing": torch.tensor([[False, False, False], [True, True, False]]),
    "one region": torch.tensor([[True, True, True, True]]),
}


@pytest.mark.parametrize("case", sorted(MASKS))
def test_hard_negative_loss_equals_the_old_branching_formula(case):
    res = _negative_case(MASKS[case], seed=2)
    old, new = res["old"], res["new"]
    assert torch.isfinite(new[0])
    assert abs(float(new[0]) - float(old[0])) <= 1e-6
    for got, want in zip(new[1:], old[1:]):
        want = torch.zeros_like(got) if want is None else want
        assert got is not None and torch.isfinite(got).all()
        assert torch.allclose(got, want, atol=1e-6, rtol=0)


def test_no_region_with_a_negative_gives_zero_still_in_the_graph():
    mask = MASKS["no region has a negative"]
    log_scale = torch.tensor(math.log(20.0), requires_grad=True)
    loss = hard_negative_loss(torch.randn(3, 6), torch.randn(3, 3, 6), mask, log_scale.exp())
    assert float(loss.detach()) == 0.0 and loss.requires_grad
    loss.backward()
    assert float(log_scale.grad) == 0.0


def test_loss_reads_no_tensor_value_on_the_host():
    """Recorded at the dispatcher: the whole PixCLIP loss (every branch, with empty pools and regions
    without negatives) runs no op that needs a tensor's value on the host. The recorder does see the
    old formulas' reads, so it is not blind."""
    torch.manual_seed(3)
    b, e = 4, 8
    main, text, crop, short = (torch.randn(b, e, requires_grad=True) for _ in range(4))
    dense = torch.randn(b, 9, e, requires_grad=True)
    coverage = torch.rand(b, 9)
    coverage[0] = 0.1  # an empty region: the fallback patch
    negatives = torch.randn(b, 3, e, requires_grad=True)
    negative_mask = torch.tensor([[True, False, False], [True, True, False], [True, True, True], [True, False, False]])
    log_scale, neg_scale = torch.tensor(math.log(10.0), requires_grad=True), torch.tensor(math.log(20.0), requires_grad=True)
    parts, part_text = torch.randn(5, e, requires_grad=True), torch.randn(5, 2, e, requires_grad=True)
    part_text_mask = torch.tensor([[True, True], [True, False], [False, True], [True, True], [False, False]])
    loss_fn = PixCLIPLoss(short_weight=0.5, hard_negative_weight=0.5, part_weight=0.5)
    with _SyncRecorder() as rec:
        local = region_pool(dense, coverage, 0.5)
        out = loss_fn(main, text, log_scale, crop=crop, local=local, short=short, negatives=negatives,
                      negative_mask=negative_mask, negative_logit_scale=neg_scale, part=parts, part_text=part_text,
                      part_text_mask=part_text_mask)
        out["total"].backward()
        none = loss_fn(main, text, log_scale, part=parts[:0], part_text=part_text[:0], part_text_mask=part_text_mask[:0])
        none["total"].backward()  # a batch without parts
    assert rec.seen == [], rec.seen
    assert set(out) == {"cl", "fc", "lg", "short", "hn", "part", "total"} and torch.isfinite(out["total"])
    assert torch.isfinite(none["total"]) and torch.isfinite(parts.grad).all()

    with _SyncRecorder() as old:
        _old_region_pool(dense, coverage, 0.5)
        _old_hard_negative_loss(main, negatives, negative_mask, neg_scale.exp())
    assert len(old.seen) >= 2, old.seen  # empty.any(), has.any(), int(has.sum()), logits[has]
