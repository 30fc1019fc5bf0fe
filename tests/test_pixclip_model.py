"""PixCLIP model: the zero-initialised mask embedding leaves the ViT unchanged at step 0."""

import copy

import pytest
import torch

from annotate.pixclip.model import MASK_MEAN, MASK_STD, PixCLIP, create_vision

from annotate.pixclip.build import build_pixclip

pytestmark = pytest.mark.usefixtures("one_thread")


def _vit():
    return create_vision("vit_base_patch16_224", 32, patch_size=8, embed_dim=32, depth=1, num_heads=2)


def test_zero_init_is_identity():
    torch.manual_seed(0)
    vit = _vit()
    reference = copy.deepcopy(vit).eval()
    model = PixCLIP(vit, text_dim=8, embed_dim=16, adaptor_layers=2, adaptor_hidden=16).eval()
    image = torch.randn(2, 3, 32, 32)
    mask = (torch.rand(2, 1, 32, 32) > 0.5).float()
    conv = model.visual.patch_embed.mask_proj
    assert conv.bias is None and conv.in_channels == 1
    assert conv.kernel_size == (8, 8) and conv.stride == (8, 8)
    assert torch.count_nonzero(conv.weight) == 0
    with torch.no_grad():
        tokens = model.visual.forward_features(torch.cat([image, mask], 1))
        ref_tokens = reference.forward_features(image)
        assert torch.equal(tokens, ref_tokens)
        pooled, dense = model.forward_visual(image, mask)
        assert torch.equal(pooled, model.visual_proj(reference.forward_head(ref_tokens, pre_logits=True)))
        assert dense.shape == (2, 16, 32)  # 4x4 patch tokens, class token dropped
        assert torch.equal(dense, ref_tokens[:, 1:])
        # any mask gives the same output while the mask conv is zero
        assert torch.equal(model.encode_image(image, mask), model.encode_image(image, torch.zeros_like(mask)))


def test_mask_changes_output_once_trained():
    torch.manual_seed(0)
    model = PixCLIP(_vit(), text_dim=8, embed_dim=16, adaptor_layers=2, adaptor_hidden=16).eval()
    torch.nn.init.normal_(model.visual.patch_embed.mask_proj.weight, std=0.1)
    image = torch.randn(1, 3, 32, 32)
    m1, m0 = torch.ones(1, 1, 32, 32), torch.zeros(1, 1, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(model.encode_image(image, m1), model.encode_image(image, m0))
        # the conv sees the Alpha-CLIP-normalised mask
        x = model.visual.patch_embed.mask_proj((m1 - MASK_MEAN) / MASK_STD)
        direct = model.visual.patch_embed.image_embed(image) + x.flatten(2).transpose(1, 2)
        assert torch.allclose(model.visual.patch_embed(torch.cat([image, m1], 1)), direct)


def test_eva02_family_zero_init(tiny_train_cfg):
    torch.manual_seed(0)
    vit = create_vision("eva02_tiny_patch14_224", 28, depth=1)
    reference = copy.deepcopy(vit).eval()
    model = PixCLIP(vit, text_dim=8, embed_dim=16).eval()
    image = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        out = model.visual.forward_features(torch.cat([image, torch.ones(1, 1, 28, 28)], 1))
        assert torch.equal(out, reference.forward_features(image))


def test_build_from_config_and_text_adaptor(tiny_train_cfg):
    model = build_pixclip(tiny_train_cfg, text_dim=64)
    assert model.patch_size == 8 and model.grid_size == (4, 4)
    assert float(model.logit_scale.detach()) == pytest.approx(4.0652)
    linears = [m for m in model.text_adaptor if isinstance(m, torch.nn.Linear)]
    assert len(linears) == tiny_train_cfg.adaptor_layers
    emb, dense, text = model(torch.randn(2, 3, 32, 32), torch.ones(2, 1, 32, 32), torch.randn(2, 64))
    assert emb.shape == (2, 16) and text.shape == (2, 16) and dense.shape == (2, 16, 32)


def test_branch_features_feed_the_loss_without_the_trainer():
    """The library alone (model + loss, no annotate.train) gives the paper's three-branch loss: the
    model assembles the main, crop and all-ones-mask passes in one forward, the loss compares them."""
    import subprocess
    import sys

    from annotate.pixclip.loss import PixCLIPLoss

    torch.manual_seed(0)
    model = PixCLIP(_vit(), text_dim=8, embed_dim=16)
    image, crop = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    mask = torch.zeros(4, 1, 32, 32)
    mask[:, :, 8:24, 8:24] = 1
    calls = []

    def counting_forward(*args):
        calls.append(args[0].shape[0])
        return model(*args)

    branches = model.branch_features(image, mask, torch.randn(4, 8), crop, torch.ones_like(mask), local_tau=0.1,
                                     forward=counting_forward)
    assert calls == [12]  # main, crop and all-ones passes batched into one forward
    assert branches.main.shape == branches.text.shape == branches.crop.shape == branches.local.shape == (4, 16)
    out = PixCLIPLoss(alpha=0.25, beta=0.25).of_branches(branches, model.logit_scale)
    assert set(out) == {"cl", "fc", "lg", "total"}
    assert torch.allclose(out["total"], out["cl"] + 0.25 * out["fc"] + 0.25 * out["lg"])
    out["total"].backward()
    assert model.mask_conv.weight.grad is not None and model.text_adaptor[0].weight.grad is not None

    only_main = model.branch_features(image, mask, torch.randn(4, 8))
    assert only_main.crop is None and only_main.local is None
    assert set(PixCLIPLoss().of_branches(only_main, model.logit_scale)) == {"cl", "total"}

    code = ("import sys, annotate.pixclip, annotate.pixclip.build; "
            "assert not [m for m in sys.modules if m.startswith(('annotate.train', 'ray'))], 'trainer or Ray imported'")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).returncode == 0
