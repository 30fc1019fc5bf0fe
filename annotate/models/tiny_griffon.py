"""A tiny Griffon-G replica (``tiny:griffon_g``): Griffon-G's real structure and checkpoint weight
names (CLIP tower + ``conv_reduce`` projector + Gemma-2, one folder), served by vLLM through the
out-of-tree model in annotate/engines/griffon_vllm.py and checked against tests/griffon_reference.py.

It ends turns as Griffon-G does (engines/conventions.py ``griffon_gemma2``): its ``gemma_instruct``
conversation writes ``<end_of_turn>`` after every message and its inference stops on that keyword,
not on EOS. So the replica's EOS is ``<eos>`` alone and its output head's stop row is
``<end_of_turn>``: only a stage whose stop tokens name ``<end_of_turn>`` (the family adds it) ends
its answers where the model ends its turn.
"""

from __future__ import annotations

from pathlib import Path

from annotate.models.tiny import HEADS, HIDDEN, INIT_RANGE, INTERMEDIATE, LAYERS, SEED
from annotate.models.tiny import build_bpe_tokenizer, shape_output_head

END_OF_TURN = "<end_of_turn>"  # what the conversation template writes after every message
SPECIAL = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", END_OF_TURN]
# The stop row's gain: at tiny.EOS_AFTER_STOP (40) this Gemma-2 ended at once on the sample shards'
# photos (10 of 10 context prompts empty); at 13, 6 of 10 gave a caption and 4 ran to max_tokens (128).
GRIFFON_STOP_GAIN = 13.0


# ------------------------------------------------------------------------------------------------
# Griffon-G with its real structure (``tiny:griffon_g``, served by vLLM through
# annotate/engines/griffon_vllm.py): one checkpoint folder with the published checkpoint's weight
# names, a CLIP tower at a small square size with ``conv_reduce``, Gemma-2 with an untied ``lm_head``.
# The published layout (jefferyZhan/Griffon): model.vision_tower.vision_tower.vision_model.*,
# model.mm_projector.{conv,linear}.*, model.{embed_tokens,layers,norm}.*, lm_head.weight.

IMAGE_TOKEN = "<image>"
G_IMAGE_SIZE = 126  # 9 x 9 patches of 14 px: an odd grid like the real 73 x 73; conv_reduce -> 5 x 5 = 25 tokens
G_PATCH_SIZE = 14
G_VISION_LAYERS = 3  # mm_vision_select_layer -2: the last layer's output is not used
G_KV_HEADS = 1  # grouped-query attention, as both Griffon-G sizes have

# Griffon's `gemma_instruct` conversation (griffon/conversation.py, SeparatorStyle.GEMMA): roles
# '<start_of_turn>user\n' / '<start_of_turn>model\n', every message followed by '<end_of_turn>\n', the
# first user message '<image>\n' + text (run_griffon.py), <bos> first (tokenizer_image_token keeps the
# tokenizer's BOS). System text goes into the next user turn, before its text. Content may be a
# string or OpenAI-style parts (vLLM then renders the images' placeholders through this template).
GEMMA_INSTRUCT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- set ns = namespace(system='') -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- if message['content'] is string -%}{%- set ns.system = ns.system + message['content'] + '\\n\\n' -%}"
    "{%- else -%}{%- for part in message['content'] -%}{%- if part['type'] == 'text' -%}"
    "{%- set ns.system = ns.system + part['text'] + '\\n\\n' -%}{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- else -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{- '<start_of_turn>' + role + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{%- if role == 'user' -%}{{- ns.system -}}{%- set ns.system = '' -%}{%- endif -%}{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] in ['image', 'image_url', 'image_pil'] -%}{{- '<image>\\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if role == 'user' -%}{{- ns.system -}}{%- set ns.system = '' -%}{%- endif -%}"
    "{%- for part in message['content'] -%}{%- if part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<end_of_turn>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\\n' -}}{%- endif -%}"
)


def griffon_g_tokenizer():
    """The Gemma-style tokenizer plus ``<image>`` as one special token and the gemma_instruct template."""
    return build_bpe_tokenizer(special=SPECIAL + [IMAGE_TOKEN], chat_template=GEMMA_INSTRUCT_TEMPLATE,
                               eos="<eos>", bos="<bos>", pad="<pad>", add_bos=True)


def build_griffon_g(out: Path) -> None:
    import json

    import torch
    from safetensors.torch import save_file
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(SEED)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = griffon_g_tokenizer()
    vocab = ((len(tokenizer) + 63) // 64) * 64
    vision = dict(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=G_VISION_LAYERS,
                  num_attention_heads=HEADS, image_size=G_IMAGE_SIZE, patch_size=G_PATCH_SIZE,
                  hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=HIDDEN)
    tower = CLIPVisionModel(CLIPVisionConfig(**vision, initializer_range=INIT_RANGE)).eval()
    text = Gemma2Config(
        vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=G_KV_HEADS, head_dim=HIDDEN // HEADS,
        query_pre_attn_scalar=HIDDEN // HEADS, max_position_embeddings=4096, initializer_range=INIT_RANGE,
        tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    lm = Gemma2ForCausalLM(text).eval()
    shape_output_head(lm, tokenizer, END_OF_TURN, stop_gain=GRIFFON_STOP_GAIN)
    conv = torch.nn.Conv2d(HIDDEN, HIDDEN, kernel_size=3, stride=2, padding=1)
    linear = torch.nn.Linear(HIDDEN, HIDDEN)
    with torch.no_grad():  # projector weights as wide as the rest, so image features move the output
        for layer in (conv, linear):
            layer.weight.normal_(0.0, INIT_RANGE / 4)
            layer.bias.normal_(0.0, INIT_RANGE / 4)
    weights = {f"model.vision_tower.vision_tower.vision_model.{k}": v for k, v in tower.state_dict().items()}
    weights |= {f"model.mm_projector.conv.{k}": v for k, v in conv.state_dict().items()}
    weights |= {f"model.mm_projector.linear.{k}": v for k, v in linear.state_dict().items()}
    weights |= lm.state_dict()
    save_file({k: v.detach().contiguous() for k, v in weights.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    config = {k: v for k, v in text.to_dict().items() if k not in ("transformers_version", "dtype", "torch_dtype")}
    config |= dict(
        model_type="gemma2_Griffon", architectures=["GriffonGemma2ForCausalLM"], torch_dtype="float32",
        # LLaVA's multimodal keys as Griffon-G's training scripts set them (scripts/gemma2/sft.sh).
        mm_vision_tower="vision_tower", mm_hidden_size=HIDDEN, mm_projector_type="conv_reduce",
        mm_vision_select_layer=-2, mm_vision_select_feature="patch", mm_use_im_start_end=False,
        mm_use_im_patch_token=False, image_aspect_ratio="square",
        # The published config.json has no vision_config (its tower is CLIP ViT-L/14 at 1022 px, the
        # config class's default); this replica's tower is smaller, so it says so here.
        vision_config=vision)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
         "pad_token_id": tokenizer.pad_token_id, "do_sample": False}))
    # Griffon preprocesses with its tower's CLIPImageProcessor (shortest_edge = crop = the tower's size).
    CLIPImageProcessor(size={"shortest_edge": G_IMAGE_SIZE}, crop_size={"height": G_IMAGE_SIZE, "width": G_IMAGE_SIZE}
                       ).save_pretrained(out)
    tokenizer.save_pretrained(out)
