"""PixCLIP on open_clip models: the CLIP projection and temperature are kept, so at init PixCLIP's image
embedding is open_clip's `encode_image` for any mask (random-weight checkpoints written locally)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.usefixtures("one_thread")
open_clip = pytest.importorskip("open_clip")


def _checkpoint(name: str, path=None) -> torch.nn.Module:
    """A random open_clip model whose projection is scaled up so embeddings are O(1) (EVA02's random
    head gives ~1e-3, which would make any 1e-5 comparison vacuous); its vision state dict + logit_scale
    saved as an open_clip checkpoint (`visual.*` keys)."""
    torch.manual_seed(0)
    ref = open_clip.create_model(name, pretrained=None).eval()
    with torch.no_grad():
        ref.logit_scale.fill_(4.3)
        for key, p in ref.visual.named_parameters():
            if key in ("proj", "trunk.head.weight"):
                p.normal_(0, p.shape[-1] ** -0.5 if key == "proj" else 0.2)
    if path is not None:
        state = {k: v for k, v in ref.state_dict().items() if k.startswith("visual.") or k == "logit_scale"}
        torch.save(state, path)
    return ref


@pytest.mark.parametrize("name", ["ViT-B-16", "EVA02-B-16"])
def test_from_open_clip_equals_open_clip_at_init(name, tmp_path):
    from annotate.pixclip import from_open_clip

    ckpt = tmp_path / "clip.pt"
    ref = _checkpoint(name, ckpt)
    model = from_open_clip(name, str(ckpt), text_dim=16, adaptor_layers=2, adaptor_hidden=32).eval()
    g = torch.Generator().manual_seed(1)
    image = torch.randn(2, 3, 224, 224, generator=g)
    masks = [(torch.rand(2, 1, 224, 224, generator=g) > 0.5).float(), torch.zeros(2, 1, 224, 224)]
    with torch.no_grad():
        want = ref.encode_image(image)
        assert want.abs().max() > 0.1  # a real comparison, not two near-zero vectors
        for mask in masks:
            got = model.encode_image(image, mask, normalize=False)
            assert (got - want).abs().max() <= 1e-5
    assert float(model.logit_scale.detach()) == pytest.approx(4.3)
    assert model.patch_size == 16 and model.grid_size == (14, 14)
    assert torch.count_nonzero(model.mask_conv.weight) == 0 and model.mask_conv.weight.requires_grad
    # the training forward: projected embedding, dense patch tokens for L_LG, adaptor output in the same space
    emb, dense, text = model(image[:1], masks[0][:1], torch.randn(1, 16))
    assert emb.shape == text.shape == (1, 512) and dense.shape[:2] == (1, 196)
    assert model.visual_proj(dense.mean(1)).shape == (1, 512)


def test_mask_conv_learns_and_is_the_only_fast_group(tmp_path, tiny_train_cfg):
    """Trainer param groups on an open_clip PixCLIP: the mask conv is found (lr 1e-5), the kept CLIP
    projection trains with the other layers (1e-7), and a non-zero mask conv makes the mask matter."""
    from annotate.pixclip import from_open_clip
    from annotate.train.trainer import param_groups

    ckpt = tmp_path / "clip.pt"
    _checkpoint("ViT-B-16", ckpt)
    model = from_open_clip("ViT-B-16", str(ckpt), text_dim=16, adaptor_layers=2, adaptor_hidden=32).eval()
    cfg = tiny_train_cfg.model_copy(update={"lr_mask_conv": 1e-5, "lr_other": 1e-7, "lr_adaptor": None})
    groups = {g["name"]: g for g in param_groups(model, cfg)}
    assert groups["mask_conv"]["param_names"] == ["visual.conv1.mask_proj.weight"]
    assert "visual_proj.weight" in groups["other"]["param_names"] and groups["other"]["lr"] == 1e-7
    torch.nn.init.normal_(model.mask_conv.weight, std=0.05)
    image = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        a = model.encode_image(image, torch.ones(1, 1, 224, 224))
        b = model.encode_image(image, torch.zeros(1, 1, 224, 224))
    assert not torch.allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("name,size,grid,dim", [("EVA02-L-14", 224, 16, 768), ("EVA02-L-14-336", 336, 24, 768)])
def test_large_eva02_structure(name, size, grid, dim):
    """The large EVA02 towers are too heavy to run on this CPU; built on the meta device (no memory,
    no compute), they must still expose the projection, patch grid and resolution PixCLIP relies on."""
    from annotate.pixclip.model import PixCLIP
    from annotate.pixclip.open_clip_models import detach_projection, open_clip_image_size

    clip = open_clip.create_model(name, pretrained=None, device="meta")
    tower, proj = detach_projection(clip.visual)
    assert isinstance(proj, torch.nn.Linear) and (proj.in_features, proj.out_features) == (1024, dim)
    model = PixCLIP(tower, text_dim=16, adaptor_layers=2, adaptor_hidden=32, visual_proj=proj)
    assert model.visual_proj is proj and model.patch_size == 14 and model.grid_size == (grid, grid)
    assert open_clip_image_size(name) == size
    assert model.text_adaptor[-1].out_features == dim  # the adaptor maps into the CLIP space


def test_checkpoint_that_does_not_fit_is_refused(tmp_path):
    from annotate.pixclip import from_open_clip

    torch.save({"visual.conv1.weight": torch.zeros(768, 3, 16, 16)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="does not fit"):
        from_open_clip("ViT-B-16", str(tmp_path / "bad.pt"), text_dim=16)


def test_production_default_is_eva02_clip(tmp_path):
    """The default TrainConfig builds EVA02-CLIP B/16 through open_clip (Table 9), projection kept."""
    from annotate.config import TrainConfig
    from annotate.pixclip.build import build_pixclip

    cfg = TrainConfig()
    assert (cfg.vision_source, cfg.vision_model, cfg.image_size) == ("open_clip", "EVA02-B-16", 224)
    with pytest.raises(ValueError, match="336 px"):
        build_pixclip(cfg.model_copy(update={"vision_model": "EVA02-L-14-336"}), text_dim=8)


# timm's EVA filter renames EVA-CLIP keys this way; inverted here to write an LLM2CLIP-format file.
_TO_EVA_CLIP = [("mlp.fc1_g", "mlp.w1"), ("mlp.fc1_x", "mlp.w2"), ("mlp.fc2", "mlp.w3"), ("mlp.norm", "mlp.ffn_ln"),
                ("attn.norm", "attn.inner_attn_ln"), ("attn.q_proj.bias", "attn.q_bias"), ("attn.v_proj.bias", "attn.v_bias")]


def _eva_clip_name(key: str) -> str:
    for timm_name, eva_name in _TO_EVA_CLIP:
        key = key.replace(timm_name, eva_name)
    return "visual." + key


def test_llm2clip_checkpoint_loads_vision_tower_and_adaptor(tmp_path):
    """An LLM2CLIP release (EVA-CLIP key names for the EVA02 tower, `text.text_adaptor.*` for its
    residual adaptor over LLM2Vec features): the image side equals open_clip's EVA02 with those
    weights, and the adaptor computes LLM2CLIP's x + W2 gelu(W1 LN(x)) blocks, LN, Linear."""
    from annotate.pixclip import from_open_clip
    from annotate.train.trainer import param_groups

    ref = _checkpoint("EVA02-B-16")
    state = {_eva_clip_name(k): v for k, v in ref.visual.trunk.state_dict().items()}
    assert "visual.blocks.0.mlp.w1.weight" in state and "visual.blocks.0.attn.q_bias" in state
    g = torch.Generator().manual_seed(3)
    text_dim, blocks = 24, 2
    for b in range(blocks):
        state[f"text.text_adaptor.{b}.ln.weight"] = 1 + 0.1 * torch.randn(text_dim, generator=g)
        state[f"text.text_adaptor.{b}.ln.bias"] = 0.1 * torch.randn(text_dim, generator=g)
        for i, shape in ((0, (2 * text_dim, text_dim)), (3, (text_dim, 2 * text_dim))):
            state[f"text.text_adaptor.{b}.fn.{i}.weight"] = 0.2 * torch.randn(*shape, generator=g)
            state[f"text.text_adaptor.{b}.fn.{i}.bias"] = 0.1 * torch.randn(shape[0], generator=g)
    state[f"text.text_adaptor.{blocks}.weight"] = torch.ones(text_dim)
    state[f"text.text_adaptor.{blocks}.bias"] = torch.zeros(text_dim)
    state[f"text.text_adaptor.{blocks + 1}.weight"] = 0.2 * torch.randn(512, text_dim, generator=g)
    state[f"text.text_adaptor.{blocks + 1}.bias"] = torch.zeros(512)
    state["logit_scale"] = torch.tensor(4.5)
    torch.save(state, tmp_path / "llm2clip.pt")

    model = from_open_clip("EVA02-B-16", str(tmp_path / "llm2clip.pt"), text_dim=text_dim, adaptor_layers=blocks,
                           adaptor_kind="llm2clip").eval()
    image = torch.randn(1, 3, 224, 224, generator=g)
    with torch.no_grad():
        want = ref.encode_image(image)
        assert (model.encode_image(image, torch.rand(1, 1, 224, 224), normalize=False) - want).abs().max() <= 1e-5
        x = 30 * torch.randn(3, text_dim, generator=g)
        h = F.normalize(x, dim=-1)  # LLM2CLIP's TextProj L2-normalises the LLM2Vec vector first
        for b in range(blocks):
            p = {n: state[f"text.text_adaptor.{b}.{n}"] for n in ("ln.weight", "ln.bias", "fn.0.weight", "fn.0.bias", "fn.3.weight", "fn.3.bias")}
            z = F.layer_norm(h, (text_dim,), p["ln.weight"], p["ln.bias"])
            h = h + F.linear(F.gelu(F.linear(z, p["fn.0.weight"], p["fn.0.bias"])), p["fn.3.weight"], p["fn.3.bias"])
        h = F.linear(F.layer_norm(h, (text_dim,)), state[f"text.text_adaptor.{blocks + 1}.weight"], state[f"text.text_adaptor.{blocks + 1}.bias"])
        torch.testing.assert_close(model.encode_text(x, normalize=False), h, rtol=1e-5, atol=1e-5)
    assert float(model.logit_scale.detach()) == pytest.approx(4.5) and model.adaptor_pretrained
    # the inherited adaptor is fine-tuned like the other layers (the paper's 1e-7)
    from annotate.train.synthetic import synthetic_config

    cfg = synthetic_config(lr_mask_conv=1e-5, lr_other=1e-7, lr_adaptor=None)
    assert {g_["name"]: g_["lr"] for g_ in param_groups(model, cfg)}["adaptor"] == 1e-7
    # the same file into an explicitly asked MLP adaptor is refused with the hint
    with pytest.raises(ValueError, match="adaptor_kind"):
        from_open_clip("EVA02-B-16", str(tmp_path / "llm2clip.pt"), text_dim=text_dim, adaptor_kind="mlp")
