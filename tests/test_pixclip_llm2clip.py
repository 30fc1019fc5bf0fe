"""PixCLIP at init equals LLM2CLIP (microsoft/LLM2CLIP): the image embedding of its EVA02-CLIP-B-16 (a
1280-d head, where open_clip's EVA02-B-16 has 512) and the text embedding of its `TextProj`, built
from a checkpoint in LLM2CLIP's own state-dict layout with nothing but the file's shapes.

The reference modules transcribe LLM2CLIP's code (MIT licence) for the EVA02-CLIP-B-16 config, with
its module and parameter names, so that `state_dict()` is an LLM2CLIP checkpoint's layout:
- `llm2clip/eva_clip/model_configs/EVA02-CLIP-B-16.json`: `embed_dim: 1280`; vision width 768, 12 layers,
  head_width 64, patch 16, mlp_ratio 2.6667, rope, pt_hw_seq_len 16, intp_freq, naiveswiglu, subln,
  xattn, fusedLN.
- `llm2clip/eva_clip/model.py`: `_build_vision_tower` -> `EVAVisionTransformer(num_classes=embed_dim,
  use_mean_pooling=False (global_average_pool), qkv_bias=True, norm_layer=LayerNorm(eps=1e-6))`;
  `TextProj.text_adaptor` = 4 x `LinearBlock(d, 2)` (x + fn(ln(x)); fn = Linear, GELU, Dropout, Linear),
  `nn.LayerNorm(d)`, `nn.Linear(d, embed_dim)`; `TextProj.forward` L2-normalises its input first
  (`l2_norm=True`). `CustomCLIP` holds `visual`, `text` and `logit_scale` (log 1/0.07).
- `llm2clip/eva_clip/eva_vit_model.py`: `Attention` with subln (q_proj with bias, k_proj without, v_proj
  with; `inner_attn_ln` before `proj`; rope on every token but the class token; the rope module is
  shared, so its buffers appear under every block), `SwiGLU` (w1, w2, SiLU, ffn_ln, w3), `Block`
  (pre-norm, no layer scale), pooling = `norm`, class token, `head` (Linear with bias).
- `llm2clip/eva_clip/rope.py`: `VisionRotaryEmbeddingFast(dim=head_dim/2, pt_seq_len=16, ft_seq_len=14)`.
xformers' memory-efficient attention (xattn) computes the same softmax(q k^T scale) v as the plain path
transcribed here; without apex, `FusedLayerNorm` is LayerNorm.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytestmark = pytest.mark.usefixtures("one_thread")
pytest.importorskip("open_clip")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)  # rearrange '... (d r) -> ... d r', r=2
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


class VisionRotaryEmbeddingFast(nn.Module):
    def __init__(self, dim: int, pt_seq_len: int, ft_seq_len: int | None = None, theta: float = 10000):
        super().__init__()
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
        ft_seq_len = ft_seq_len or pt_seq_len
        t = torch.arange(ft_seq_len) / ft_seq_len * pt_seq_len
        freqs = torch.einsum("..., f -> ... f", t, freqs).repeat_interleave(2, dim=-1)  # '... n -> ... (n r)'
        n = freqs.shape[0]
        freqs = torch.cat((freqs[:, None, :].expand(n, n, -1), freqs[None, :, :].expand(n, n, -1)), dim=-1)  # broadcat
        self.register_buffer("freqs_cos", freqs.cos().view(-1, freqs.shape[-1]))
        self.register_buffer("freqs_sin", freqs.sin().view(-1, freqs.shape[-1]))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return t * self.freqs_cos + rotate_half(t) * self.freqs_sin


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, rope: nn.Module, norm_layer):
        super().__init__()
        self.num_heads, self.scale = num_heads, (dim // num_heads) ** -0.5
        self.q_proj = nn.Linear(dim, dim, bias=True)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=True)
        self.inner_attn_ln = norm_layer(dim)
        self.proj = nn.Linear(dim, dim)
        self.rope = rope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        q, k, v = (p(x).reshape(B, N, self.num_heads, -1).permute(0, 2, 1, 3) for p in (self.q_proj, self.k_proj, self.v_proj))
        q = torch.cat((q[:, :, :1], self.rope(q[:, :, 1:])), -2).type_as(v)
        k = torch.cat((k[:, :, :1], self.rope(k[:, :, 1:])), -2).type_as(v)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj(self.inner_attn_ln((attn @ v).transpose(1, 2).reshape(B, N, -1)))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int, norm_layer):
        super().__init__()
        self.w1, self.w2 = nn.Linear(dim, hidden), nn.Linear(dim, hidden)
        self.act = nn.SiLU()
        self.ffn_ln = norm_layer(hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(self.ffn_ln(self.act(self.w1(x)) * self.w2(x)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, rope: nn.Module, norm_layer):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, rope, norm_layer)
        self.norm2 = norm_layer(dim)
        self.mlp = SwiGLU(dim, int(dim * mlp_ratio), norm_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class EVAVisionTransformer(nn.Module):
    """EVA02-CLIP-B-16's tower as LLM2CLIP builds it (use_mean_pooling=False: `norm`, class token, `head`)."""

    def __init__(self, embed_dim: int, img_size=224, patch=16, width=768, depth=12, head_width=64, mlp_ratio=2.6667):
        super().__init__()
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        heads, grid = width // head_width, img_size // patch
        self.patch_embed = PatchEmbed(patch, width)
        self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, width))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, grid * grid + 1, width))
        self.rope = VisionRotaryEmbeddingFast(width // heads // 2, pt_seq_len=16, ft_seq_len=grid)
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio, self.rope, norm_layer) for _ in range(depth))
        self.norm = norm_layer(width)
        self.head = nn.Linear(width, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x)[:, 0])


class LinearBlock(nn.Module):
    def __init__(self, dim: int, expansion_factor: int = 2):
        super().__init__()
        self.fn = nn.Sequential(nn.Linear(dim, expansion_factor * dim), nn.GELU(), nn.Dropout(0.0),
                                nn.Linear(expansion_factor * dim, dim))
        self.ln = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fn(self.ln(x))


class TextProj(nn.Module):
    def __init__(self, embedding_dim: int, output_dim: int, num_layers_text: int = 4):
        super().__init__()
        self.text_adaptor = nn.Sequential(*[LinearBlock(embedding_dim) for _ in range(num_layers_text)],
                                          nn.LayerNorm(embedding_dim), nn.Linear(embedding_dim, output_dim))

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        return self.text_adaptor(F.normalize(text, p=2, dim=-1))


class CustomCLIP(nn.Module):
    def __init__(self, embed_dim: int, llm_embedding_dim: int):
        super().__init__()
        self.visual = EVAVisionTransformer(embed_dim)
        self.text = TextProj(llm_embedding_dim, embed_dim)
        self.logit_scale = nn.Parameter(torch.ones([]) * torch.log(torch.tensor(1 / 0.07)))


TEXT_DIM = 48  # LLM2Vec-Llama-3-8B gives 4096; the adaptor's shape is read from the file either way


def _llm2clip_checkpoint(path, embed_dim: int = 1280) -> CustomCLIP:
    """A random LLM2CLIP whose norms are perturbed (a misplaced or skipped norm then shows) and whose head
    gives O(1) embeddings (LLM2CLIP's head init x0.001 would make any comparison vacuous), saved as the
    flat state dict LLM2CLIP's training writes."""
    torch.manual_seed(0)
    ref = CustomCLIP(embed_dim, TEXT_DIM).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
        ref.visual.head.weight.normal_(0, 0.2, generator=g)
        ref.visual.head.bias.normal_(0, 0.1, generator=g)
        ref.logit_scale.fill_(4.4)
    torch.save(ref.state_dict(), path)
    return ref


def test_llm2clip_checkpoint_layout_is_llm2clips(tmp_path):
    """The reference's keys are those LLM2CLIP's factory loads (`visual.blocks.N.attn.q_proj.bias`, no
    fused qkv; rope buffers under every block; the adaptor under `text.text_adaptor`)."""
    ref = CustomCLIP(1280, TEXT_DIM)
    keys = set(ref.state_dict())
    assert {"visual.blocks.0.attn.q_proj.bias", "visual.blocks.0.mlp.w3.weight", "visual.blocks.11.attn.rope.freqs_cos",
            "visual.head.weight", "text.text_adaptor.0.fn.3.weight", "text.text_adaptor.5.bias", "logit_scale"} <= keys
    assert "visual.blocks.0.attn.k_proj.bias" not in keys and ref.visual.head.weight.shape == (1280, 768)
    assert ref.visual.blocks[0].mlp.w1.out_features == 2048  # int(768 * 2.6667), as timm's EVA02-B (4 * 2/3)


def test_pixclip_at_init_equals_llm2clip(tmp_path):
    """From the file alone (no width, adaptor kind or depth given), PixCLIP's 1280-d image embedding
    equals LLM2CLIP's `encode_image` for any mask, and its text embedding equals `TextProj` on raw
    LLM2Vec-scale features (norm ~60, where an unnormalised adaptor input gives another vector)."""
    from annotate.pixclip import from_open_clip

    ref = _llm2clip_checkpoint(tmp_path / "llm2clip.pt")
    model = from_open_clip("EVA02-B-16", str(tmp_path / "llm2clip.pt"), text_dim=TEXT_DIM).eval()
    assert model.shape_settings() == {"embed_dim": 1280, "adaptor_kind": "llm2clip", "adaptor_layers": 4,
                                      "adaptor_hidden": 2048}
    assert float(model.logit_scale.detach()) == pytest.approx(4.4) and model.adaptor_pretrained
    g = torch.Generator().manual_seed(2)
    image = torch.randn(2, 3, 224, 224, generator=g)
    text = 60 * F.normalize(torch.randn(3, TEXT_DIM, generator=g) + 0.5, dim=-1)
    with torch.no_grad():
        want = ref.visual(image)
        assert want.shape == (2, 1280) and want.abs().max() > 0.1
        for mask in ((torch.rand(2, 1, 224, 224, generator=g) > 0.5).float(), torch.zeros(2, 1, 224, 224)):
            torch.testing.assert_close(model.encode_image(image, mask, normalize=False), want, rtol=1e-4, atol=1e-4)
        want_text = ref.text(text)
        torch.testing.assert_close(model.encode_text(text, normalize=False), want_text, rtol=1e-5, atol=1e-5)
        raw = ref.text.text_adaptor(text)  # what the adaptor gave before its input was normalised
        assert F.cosine_similarity(raw, want_text).max() < 0.99


def test_width_comes_from_the_file_and_contradictions_are_refused(tmp_path):
    """The joint width is the checkpoint's (512 for an EVA-CLIP file of open_clip's width, 1280 for
    LLM2CLIP's); an explicit width, adaptor kind or text width that contradicts the file is refused."""
    from annotate.pixclip import from_open_clip

    state = CustomCLIP(512, TEXT_DIM).state_dict()
    torch.save({k: v for k, v in state.items() if not k.startswith("text.")}, tmp_path / "eva512.pt")
    assert from_open_clip("EVA02-B-16", str(tmp_path / "eva512.pt"), text_dim=8).embed_dim == 512
    _llm2clip_checkpoint(tmp_path / "llm2clip.pt")
    for kwargs, match in (({"embed_dim": 512}, "1280 dims"), ({"adaptor_kind": "mlp"}, "adaptor_kind"),
                          ({"text_dim": 4096}, "48-d features")):
        with pytest.raises(ValueError, match=match):
            from_open_clip("EVA02-B-16", str(tmp_path / "llm2clip.pt"), **{"text_dim": TEXT_DIM, **kwargs})


@pytest.mark.parametrize("kind,layers", [("mlp", 1), ("mlp", 3), ("llm2clip", 2)])
def test_adaptor_layout_reads_back_what_pixclip_builds(kind, layers):
    """A trained adaptor file (ours, `text_adaptor.*`, or LLM2CLIP's) is rebuilt with its own shape."""
    from annotate.pixclip.layout import adaptor_layout, adaptor_state
    from annotate.pixclip.model import adaptor_mlp, llm2clip_adaptor

    module = adaptor_mlp(24, 40, 12, layers) if kind == "mlp" else llm2clip_adaptor(24, 12, layers)
    layout = adaptor_layout(adaptor_state({f"text_adaptor.{k}": v for k, v in module.state_dict().items()}))
    assert (layout.kind, layout.layers, layout.text_dim, layout.embed_dim) == (kind, layers, 24, 12)
    assert layout.hidden == (40 if kind == "mlp" and layers > 1 else None)
