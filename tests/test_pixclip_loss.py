"""The three loss terms against a direct hand computation on small tensors."""

import math

import pytest
import torch

from annotate.pixclip.loss import PixCLIPLoss, patch_coverage, region_pool

pytestmark = pytest.mark.usefixtures("one_thread")


def _info_nce_by_hand(a, b, scale):
    """Eq. 3 written out with loops: -1/(2B) sum_i [log softmax_j S(a_i,b_j)/tau + log softmax_j S(b_i,a_j)/tau]."""
    n = a.shape[0]

    def cos(x, y):
        return float(x @ y) / (float(x.norm()) * float(y.norm()))

    total = 0.0
    for i in range(n):
        num = math.exp(scale * cos(a[i], b[i]))
        total += math.log(num / sum(math.exp(scale * cos(a[i], b[j])) for j in range(n)))
        total += math.log(num / sum(math.exp(scale * cos(b[i], a[j])) for j in range(n)))
    return -total / (2 * n)


def test_each_term_matches_hand_computation():
    torch.manual_seed(0)
    main, text, crop, local = (torch.randn(4, 6, dtype=torch.float64) for _ in range(4))
    log_scale = torch.tensor(math.log(10.0))
    out = PixCLIPLoss(alpha=0.25, beta=0.25)(main, text, log_scale, crop=crop, local=local)
    assert float(out["cl"]) == pytest.approx(_info_nce_by_hand(main, text, 10.0), rel=1e-5)
    assert float(out["fc"]) == pytest.approx(_info_nce_by_hand(crop, main, 10.0), rel=1e-5)
    assert float(out["lg"]) == pytest.approx(_info_nce_by_hand(local, main, 10.0), rel=1e-5)
    expected = float(out["cl"]) + 0.25 * float(out["fc"]) + 0.25 * float(out["lg"])
    assert float(out["total"]) == pytest.approx(expected, rel=1e-6)


def test_branches_switch_off_and_scale_is_not_clamped_in_forward():
    torch.manual_seed(0)
    main, text, crop, local = (torch.randn(3, 5) for _ in range(4))
    log_scale = torch.tensor(math.log(150.0), requires_grad=True)
    out = PixCLIPLoss(use_fc=False, use_lg=False)(main, text, log_scale, crop=crop, local=local)
    assert set(out) == {"cl", "total"} and torch.equal(out["cl"], out["total"])
    # above CLIP's 100 the forward uses the value as is, and the temperature still gets a gradient
    assert float(out["cl"]) == pytest.approx(_info_nce_by_hand(main, text, 150.0), rel=1e-4)
    out["total"].backward()
    assert log_scale.grad is not None and float(log_scale.grad.abs()) > 0


def test_clamp_in_place_after_step():
    """open_clip's rule: the parameter itself is clamped to [0, ln 100] after the optimizer step."""
    from annotate.pixclip.loss import clamp_logit_scale

    p = torch.nn.Parameter(torch.tensor(math.log(150.0)))
    clamp_logit_scale(p)
    assert float(p) == pytest.approx(math.log(100.0)) and p.requires_grad
    q = torch.nn.Parameter(torch.tensor(-0.5))
    clamp_logit_scale(q)
    assert float(q) == 0.0


def test_region_pool_by_hand_with_fallback():
    dense = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    cover = torch.tensor([[0.9, 0.6, 0.1, 0.0], [0.2, 0.4, 0.3, 0.0]])
    pooled = region_pool(dense, cover, tau=0.5)
    assert torch.allclose(pooled[0], (dense[0, 0] + dense[0, 1]) / 2)
    assert torch.allclose(pooled[1], dense[1, 1])  # no patch above tau: the best-covered patch


def test_patch_coverage_is_fraction_per_patch():
    mask = torch.zeros(1, 1, 4, 4)
    mask[0, 0, :2, :1] = 1  # half of the top-left 2x2 patch
    mask[0, 0, 2:, 2:] = 1  # all of the bottom-right patch
    assert patch_coverage(mask, 2).tolist() == [[0.5, 0.0, 0.0, 1.0]]
