"""Griffon-G on vLLM (annotate/engines/griffon_vllm.py) against a plain transformers forward pass of the
same architecture (tests/griffon_reference.py), on the tiny replica with Griffon-G's real structure and
weight names (``tiny:griffon_g``): the same checkpoint folder, image and question through both.

vLLM runs as a production engine would: the plugin entry point registers the model (in the engine-core
process too), the prompt comes from the chat template through ``LLM.chat``, the image through vLLM's
multimodal processor. vLLM returns the raw logits of every vocabulary entry (``logprobs_mode
raw_logits``) so the first token's logits are compared entry by entry.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from PIL import Image

from griffon_reference import IMAGE_TOKEN_INDEX, GriffonReference

pytestmark = pytest.mark.slow

QUESTION = "Describe the red car on the left of the road."
STEPS = 16
REL_TOL = 1e-3


def _image() -> Image.Image:
    """A non-square picture with structure, so that the stretch to a square and every patch matter."""
    rng = np.random.default_rng(7)
    y, x = np.mgrid[0:180, 0:260]
    pixels = np.stack([x * 255 // 259, y * 255 // 179, (x + y) % 256], axis=-1).astype(np.uint8)
    pixels[40:120, 30:110] = (220, 30, 30)
    pixels += rng.integers(0, 20, size=pixels.shape, dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def runs():
    from annotate.models.registry import tiny_path

    path = tiny_path("griffon_g")
    image = _image()
    ref = GriffonReference(path)
    features = ref.image_features(image)
    ref_tokens, ref_logits, ref_prompt_len = ref.generate(image, QUESTION, STEPS)

    from vllm import LLM, SamplingParams

    # The engine core in this process, as the project's in-process engines run (vllm_engine.py): two
    # fewer processes importing torch and vLLM. The plugin's load in a separate vLLM process is checked
    # by test_a_fresh_vllm_process_loads_the_plugin.
    patch = pytest.MonkeyPatch()
    patch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    patch.setenv("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    patch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    started = time.perf_counter()
    vocab = ref.lm.config.vocab_size
    llm = LLM(model=str(path), dtype="float32", enforce_eager=True, max_model_len=512, max_num_seqs=2,
              limit_mm_per_prompt={"image": 1}, distributed_executor_backend="uni", generation_config="vllm",
              max_logprobs=vocab, logprobs_mode="raw_logits", enable_prefix_caching=False, seed=0)
    messages = [{"role": "user", "content": [{"type": "image_pil", "image_pil": image},
                                             {"type": "text", "text": QUESTION}]}]
    params = SamplingParams(temperature=0.0, max_tokens=STEPS, min_tokens=STEPS, ignore_eos=True, logprobs=vocab)
    out = llm.chat(messages, params, use_tqdm=False)[0]
    print(f"vLLM engine up and answered in {time.perf_counter() - started:.1f} s")
    yield dict(ref=ref, features=features, ref_tokens=ref_tokens, ref_logits=ref_logits,
               ref_prompt_len=ref_prompt_len, out=out, vocab=vocab)
    del llm
    patch.undo()


def test_prompt_is_griffons_with_the_projectors_token_count(runs):
    ref, out = runs["ref"], runs["out"]
    cfg = ref.cfg["vision_config"]
    patches = (cfg["image_size"] // cfg["patch_size"]) ** 2
    n_features = runs["features"].shape[0]
    assert n_features != patches  # conv_reduce's grid, not the patch grid
    image_id = ref.tokenizer.convert_tokens_to_ids("<image>")
    expected = []
    for token in ref.input_ids(QUESTION):  # Griffon's own tokenizer_image_token, -200 for the image
        expected.extend([image_id] * n_features if token == IMAGE_TOKEN_INDEX else [token])
    assert out.prompt_token_ids == expected
    assert len(out.prompt_token_ids) == runs["ref_prompt_len"]
    print(f"prompt tokens {len(expected)}, image tokens {n_features} (patches {patches})")


def test_first_token_logits_agree(runs):
    import torch

    first = runs["out"].outputs[0].logprobs[0]
    assert len(first) >= runs["vocab"]
    vllm_logits = torch.tensor([first[i].logprob for i in range(runs["vocab"])], dtype=torch.float64)
    ref_logits = runs["ref_logits"].double()
    diff = (vllm_logits - ref_logits).abs()
    rel = float(diff.max() / ref_logits.abs().max())
    print(f"first-token logits: max |diff| {float(diff.max()):.3e}, relative to max |logit| {rel:.3e}")
    assert rel < REL_TOL
    assert torch.allclose(vllm_logits, ref_logits, rtol=REL_TOL, atol=REL_TOL * float(ref_logits.abs().max()))


def test_greedy_continuations_agree(runs):
    tokens = list(runs["out"].outputs[0].token_ids)
    assert len(tokens) == STEPS
    agreed = next((i for i, (a, b) in enumerate(zip(tokens, runs["ref_tokens"])) if a != b), STEPS)
    print(f"greedy tokens agreed: {agreed} of {STEPS}")
    assert tokens == runs["ref_tokens"]
    assert len(set(tokens)) > 1, "a continuation of one repeated token would not test much"


def test_published_griffon_g_gives_1369_tokens_per_image():
    """The config class's default tower is the published one (ViT-L/14 at 1022 px: 73 x 73 patches), and
    conv_reduce's grid is what torch's own Conv2d(3, stride 2, padding 1) makes of it: 37 x 37."""
    import torch

    from annotate.engines.griffon_processing import GriffonGemma2Config, image_grid, num_image_tokens

    config = GriffonGemma2Config()
    assert image_grid(config) == 73 and config.vision_config.image_size == 1022
    conv = torch.nn.Conv2d(1, 1, kernel_size=3, stride=2, padding=1)
    side = conv(torch.zeros(1, 1, 73, 73)).shape[-1]
    assert num_image_tokens(config) == side * side == 1369


def test_published_weight_names_map_onto_the_model():
    from annotate.engines.griffon_vllm import checkpoint_mapper

    published = {
        "model.vision_tower.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight":
            "vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight",
        "model.vision_tower.vision_tower.vision_model.embeddings.position_embedding.weight":
            "vision_tower.vision_model.embeddings.position_embedding.weight",
        "model.mm_projector.conv.weight": "mm_projector.conv.weight",
        "model.mm_projector.linear.bias": "mm_projector.linear.bias",
        "model.embed_tokens.weight": "language_model.model.embed_tokens.weight",
        "model.layers.3.mlp.gate_proj.weight": "language_model.model.layers.3.mlp.gate_proj.weight",
        "model.norm.weight": "language_model.model.norm.weight",
    }
    for tied in (True, False):
        mapper = checkpoint_mapper(tied)
        assert {name: mapper.map_name(name) for name in published} == published
        assert mapper.map_name("lm_head.weight") == (None if tied else "lm_head.weight")


def test_the_plugin_entry_point_registers_the_config():
    """vLLM finds `register` through the installed entry point; after it AutoConfig reads the folder."""
    from importlib.metadata import entry_points

    from transformers import AutoConfig

    from annotate.engines.griffon_processing import GriffonGemma2Config
    from annotate.models.registry import tiny_path

    (plugin,) = [e for e in entry_points(group="vllm.general_plugins") if e.name == "longgrit_griffon"]
    assert plugin.value == "annotate.engines.griffon_vllm:register"
    plugin.load()()
    config = AutoConfig.from_pretrained(tiny_path("griffon_g"))
    assert isinstance(config, GriffonGemma2Config) and config.vision_config.image_size == 126


def test_a_fresh_vllm_process_loads_the_plugin():
    """What vLLM's engine-core and worker processes do at start: load the general plugins, then look the
    architecture up and read the config (a process that never imported annotate before)."""
    import subprocess
    import sys

    from annotate.models.registry import tiny_path

    code = ("from vllm.plugins import load_general_plugins; load_general_plugins(); "
            "from vllm import ModelRegistry; from transformers import AutoConfig; "
            "assert 'GriffonGemma2ForCausalLM' in ModelRegistry.get_supported_archs(); "
            f"c = AutoConfig.from_pretrained({str(tiny_path('griffon_g'))!r}); "
            "print(type(c).__module__, type(c).__name__, c.vision_config.image_size)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split()[-3:] == ["annotate.engines.griffon_processing", "GriffonGemma2Config", "126"]


def test_chat_template_renders_griffons_conversation():
    """The replica's chat template against gemma_instruct's prompt (griffon/conversation.py) with the
    system text folded into the user's turn: images first, then the system text, then the user's."""
    from transformers import AutoTokenizer

    from annotate.models.registry import tiny_path
    from griffon_reference import griffon_prompt

    tokenizer = AutoTokenizer.from_pretrained(tiny_path("griffon_g"))
    image = {"type": "image"}
    messages = [{"role": "system", "content": "You are an expert."},
                {"role": "user", "content": [image, image, {"type": "text", "text": QUESTION}]}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == "<bos>" + griffon_prompt("You are an expert.\n\n" + QUESTION, n_images=2)
    plain = tokenizer.apply_chat_template([{"role": "user", "content": "<image>\n" + QUESTION}], tokenize=False,
                                          add_generation_prompt=True)
    assert plain == "<bos>" + griffon_prompt(QUESTION)
