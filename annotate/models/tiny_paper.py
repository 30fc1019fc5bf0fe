"""Tiny random-weight replicas of the paper's production checkpoints (pipelines/longgrit.yaml):
built locally, deterministic, no network, a few MB each.

Where :mod:`annotate.models.tiny` builds generic stand-ins (a Qwen2 text model, a LLaVA VLM), these
copy what the serving stack sees of the real checkpoints -- architecture names, config layout,
remote configuration code, weight names, special tokens, chat templates, end-of-turn ids -- so that
the code paths taken with them are the production ones:

  * ``internvl2``: OpenGVLab/InternVL2-Llama3-76B's layout. ``config.json`` of ``model_type``
    ``internvl_chat`` / ``InternVLChatModel`` with ``auto_map`` pointing at
    ``configuration_internvl_chat.InternVLChatConfig`` and ``configuration_intern_vit.InternVisionConfig``
    (written here: the same class names and fields as the checkpoint's own files, so vLLM needs
    ``trust_remote_code``), an InternViT-6B-style vision tower (RMSNorm, QK-norm, layer scale, no QKV
    bias) of ``INTERNVL_IMAGE_SIZE`` px tiles, a pixel-shuffle MLP projector (``mlp1``) and a Llama-3
    language model; weights named ``vision_model.*``, ``mlp1.*``, ``language_model.model.*``,
    ``language_model.lm_head.*``. Dynamic tiling as in the checkpoint (``dynamic_image_size``,
    ``use_thumbnail``, ``max_dynamic_patch`` 12): ``INTERNVL_TOKENS_PER_TILE`` image tokens per tile.
    Llama-3 special tokens plus ChatML's ``<|im_start|>``/``<|im_end|>`` (its language model is
    Hermes-2-Theta-Llama-3-70B: a Llama-3 vocabulary that speaks ChatML) and InternVL's ``<img>``,
    ``</img>``, ``<IMG_CONTEXT>`` (and ``<ref>``, ``<box>``, ``<quad>`` pairs); InternVL's ``Hermes-2``
    conversation as a ChatML chat template, end of turn ``<|im_end|>`` (engines/conventions.py
    ``internvl2_hermes2``). Its generation config names only ``<|end_of_text|>``: as InternVL's own
    ``chat()`` does not trust it either, only a stage's stop tokens end its turns (the family adds
    ``<|im_end|>``). ``chat="llama3"`` builds it the old, wrong way (Llama-3 header template,
    ``<|eot_id|>``), for the test that the load-time check refuses it.
  * ``qwen2_instruct``: Qwen/Qwen2-72B-Instruct's: ``Qwen2ForCausalLM``, ChatML with Qwen2-Instruct's
    own template (default system prompt "You are a helpful assistant."), eos ``<|im_end|>`` /
    ``<|endoftext|>``.
  * ``r1_llama``: deepseek-ai/DeepSeek-R1-Distill-Llama-70B's: ``LlamaForCausalLM`` with Llama-3.1
    RoPE scaling and 131072 positions, DeepSeek's tokens (``<｜begin▁of▁sentence｜>``, ``<｜User｜>``,
    ``<｜Assistant｜>``, ``<｜end▁of▁sentence｜>``, tool-call tokens, ``<think>``/``</think>`` as
    non-special added tokens, kept when decoding) and the R1 template whose generation prompt ends
    with ``<｜Assistant｜><think>\\n``. The output head can emit ``</think>`` (see
    ``R1_THINK_CLOSE_GAIN``), so some generations close their reasoning once and some never or twice.

All chat templates use content as a string (vLLM's "string" content format, as the real ones do:
vLLM then inserts the image placeholders into the text itself).

``BUILDERS[name](out_dir)`` writes a complete model folder (config, safetensors, tokenizer with chat
template, generation_config, image preprocessor config where the checkpoint has one).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

from annotate.models.tiny import (
    HEADS,
    HIDDEN,
    INIT_RANGE,
    INTERMEDIATE,
    LAYERS,
    SEED,
    THINK_CLOSE,
    THINK_OPEN,
    build_bpe_tokenizer,
    shape_output_head,
)

# InternVL's configuration code, as real files (the checkpoint ships its own; vLLM imports them).
INTERNVL_CODE = Path(__file__).resolve().parent / "internvl_code"

# ------------------------------------------------------------------------------------ tokens
# Llama 3
BEGIN_OF_TEXT = "<|begin_of_text|>"
END_OF_TEXT = "<|end_of_text|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOT = "<|eot_id|>"
# InternVL (added to its Llama-3 tokenizer)
IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
INTERNVL_EXTRA = ["<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>"]
# Qwen2
QWEN_EOS = "<|endoftext|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# DeepSeek R1 distills
R1_BOS = "<｜begin▁of▁sentence｜>"
R1_EOS = "<｜end▁of▁sentence｜>"
R1_PAD = "<｜▁pad▁｜>"
R1_USER, R1_ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
R1_TOOL_TOKENS = [
    "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>",
    "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>", "<｜tool▁output▁begin｜>",
    "<｜tool▁output▁end｜>", "<｜tool▁sep｜>",
]

# ------------------------------------------------------------------------------ templates
# InternVL2's Hermes-2 conversation (internvl_chat/internvl/conversation.py) as its checkpoints' chat
# template: ChatML, no default system prompt in the template.
HERMES2_CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>'"
    " + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Meta-Llama-3-Instruct's template (content used as a string): what the InternVL2 replica was first
# (wrongly) built with; kept for `chat="llama3"`.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Qwen2-Instruct's template.
QWEN2_INSTRUCT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# DeepSeek-R1(-Distill)'s template, the revision whose generation prompt ends with "<think>\n".
R1_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='') %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}"
    "{% set ns.system_prompt = message['content'] %}{%- endif %}{%- endfor %}"
    "{{bos_token}}{{ns.system_prompt}}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}"
    "{{'<｜User｜>' + message['content']}}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is none %}{%- set ns.is_tool = false -%}"
    "{%- for tool in message['tool_calls']%}{%- if not ns.is_first %}"
    "{{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>'"
    " + tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n'"
    " + '```' + '<｜tool▁call▁end｜>'}}{%- set ns.is_first = true -%}"
    "{%- else %}{{'\\n' + '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>'"
    " + tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n'"
    " + '```' + '<｜tool▁call▁end｜>'}}{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}"
    "{%- endif %}{%- endfor %}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is not none %}"
    "{%- if ns.is_tool %}{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}"
    "{%- set ns.is_tool = false -%}{%- else %}{% set content = message['content'] %}"
    "{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}{%- endif %}{%- endif %}"
    "{%- if message['role'] == 'tool' %}{%- set ns.is_tool = true -%}"
    "{%- if ns.is_output_first %}"
    "{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}"
    "{%- set ns.is_output_first = false %}"
    "{%- else %}{{'\\n<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}"
    "{%- endif %}{%- endif %}{%- endfor -%}"
    "{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{% endif %}"
    "{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜><think>\\n'}}{% endif %}"
)

# ------------------------------------------------------------------------------ InternVL sizes
INTERNVL_IMAGE_SIZE = 56  # tile side (the checkpoint: 448)
INTERNVL_PATCH_SIZE = 14  # as the checkpoint: (56 / 14)^2 = 16 patches per tile
INTERNVL_DOWNSAMPLE = 0.5  # pixel shuffle: 16 patches -> 4 tokens
INTERNVL_TOKENS_PER_TILE = int((INTERNVL_IMAGE_SIZE // INTERNVL_PATCH_SIZE) ** 2 * INTERNVL_DOWNSAMPLE**2)
INTERNVL_MAX_TILES = 12  # + 1 thumbnail when an image is split
LLAMA3_MAX_POSITIONS = 8192
QWEN2_MAX_POSITIONS = 32768
R1_MAX_POSITIONS = 131072  # Llama-3.1 RoPE scaling, as the checkpoint
# The "</think>" output row points along the input embedding of the newline that ends the template's
# generation prompt ("<think>\n", byte-level "Ċ"), with this gain (x HEAD_STD): the reasoning block is
# often closed early, sometimes never, sometimes twice. Measured on 24 merge prompts of
# pipelines/paper-tiny.yaml (temperature 0.6, vLLM on CPU): 10 finished (a closed block, then an
# answer), 4 never closed, 8 closed again inside the answer, 2 had no answer. Along "," (as first
# built) at gain 20-26 only 1-2 of 24 finished, so the end-to-end test rarely saw a merge succeed.
R1_THINK_CLOSE_GAIN = 50.0
R1_THINK_CLOSE_AFTER = "Ċ"


# ---------------------------------------------------------------------------------- helpers
def _padded_vocab(tokenizer) -> int:
    return ((len(tokenizer) + 63) // 64) * 64


def _llama_config(tokenizer, *, bos: str, eos: str | list[str], max_positions: int, rope: dict):
    from transformers import LlamaConfig

    ids = tokenizer.convert_tokens_to_ids
    eos_ids = [ids(t) for t in eos] if isinstance(eos, list) else ids(eos)
    return LlamaConfig(
        vocab_size=_padded_vocab(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        head_dim=HIDDEN // HEADS,
        hidden_act="silu",
        max_position_embeddings=max_positions,
        rms_norm_eps=1e-5,
        rope_parameters=rope,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        initializer_range=INIT_RANGE,
        bos_token_id=ids(bos),
        eos_token_id=eos_ids,
        pad_token_id=None,
        dtype="float32",
        architectures=["LlamaForCausalLM"],
    )


def _write_generation_config(out: Path, **fields) -> None:
    from transformers import GenerationConfig

    GenerationConfig(**fields).save_pretrained(out)


# --------------------------------------------------------------------------------- InternVL2



def _internvl_vision_config() -> dict:
    return {
        "architectures": ["InternVisionModel"],
        "model_type": "intern_vit_6b",
        "num_channels": 3,
        "image_size": INTERNVL_IMAGE_SIZE,
        "patch_size": INTERNVL_PATCH_SIZE,
        "hidden_size": HIDDEN,
        "num_attention_heads": HEADS,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS,
        "qkv_bias": False,
        "qk_normalization": True,
        "norm_type": "rms_norm",
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-6,
        "dropout": 0.0,
        "drop_path_rate": 0.0,
        "attention_dropout": 0.0,
        "initializer_range": 1e-10,
        "initializer_factor": 0.1,
        "use_flash_attn": False,
        "torch_dtype": "float32",
    }


def _internvl_vision_weights(gen) -> dict:
    """InternViT-6B-style tower + mlp1 projector, named as the checkpoint (and vLLM) name them."""
    import torch

    c, inter, p = HIDDEN, INTERMEDIATE, INTERNVL_PATCH_SIZE
    positions = (INTERNVL_IMAGE_SIZE // p) ** 2 + 1

    def rnd(*shape, std=INIT_RANGE):
        return torch.randn(*shape, generator=gen) * std

    w = {
        "vision_model.embeddings.class_embedding": rnd(1, 1, c),
        "vision_model.embeddings.patch_embedding.weight": rnd(c, 3, p, p, std=0.05),
        "vision_model.embeddings.patch_embedding.bias": torch.zeros(c),
        "vision_model.embeddings.position_embedding": rnd(1, positions, c),
    }
    for i in range(LAYERS):
        pre = f"vision_model.encoder.layers.{i}."
        w.update({
            pre + "attn.qkv.weight": rnd(3 * c, c, std=0.05),
            pre + "attn.q_norm.weight": torch.ones(c),
            pre + "attn.k_norm.weight": torch.ones(c),
            pre + "attn.proj.weight": rnd(c, c, std=0.05),
            pre + "attn.proj.bias": torch.zeros(c),
            pre + "mlp.fc1.weight": rnd(inter, c, std=0.05),
            pre + "mlp.fc1.bias": torch.zeros(inter),
            pre + "mlp.fc2.weight": rnd(c, inter, std=0.05),
            pre + "mlp.fc2.bias": torch.zeros(c),
            pre + "norm1.weight": torch.ones(c),
            pre + "norm2.weight": torch.ones(c),
            pre + "ls1": torch.full((c,), 0.1),
            pre + "ls2": torch.full((c,), 0.1),
        })
    shuffled = c * int(1 / INTERNVL_DOWNSAMPLE) ** 2
    w.update({
        "mlp1.0.weight": torch.ones(shuffled),
        "mlp1.0.bias": torch.zeros(shuffled),
        "mlp1.1.weight": rnd(HIDDEN, shuffled, std=0.05),
        "mlp1.1.bias": torch.zeros(HIDDEN),
        "mlp1.3.weight": rnd(HIDDEN, HIDDEN, std=0.1),
        "mlp1.3.bias": torch.zeros(HIDDEN),
    })
    return w


def _build_internvl2(out: Path, chat: str = "hermes2") -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    if chat not in ("hermes2", "llama3"):
        raise ValueError(f"chat must be hermes2 or llama3, not {chat!r}")
    hermes2 = chat == "hermes2"
    # end of turn, and what the tokenizer, the language model's config and the generation config call EOS
    turn_end, eos = (IM_END, END_OF_TEXT) if hermes2 else (EOT, EOT)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED)
    tokenizer = build_bpe_tokenizer(
        special=[BEGIN_OF_TEXT, END_OF_TEXT, START_HEADER, END_HEADER, EOT, *([IM_START, IM_END] if hermes2 else [])],
        extra_special=[IMG_START, IMG_END, IMG_CONTEXT, *INTERNVL_EXTRA],
        chat_template=HERMES2_CHATML_TEMPLATE if hermes2 else LLAMA3_TEMPLATE,
        eos=eos,
        bos=BEGIN_OF_TEXT,
        pad=END_OF_TEXT,
        add_bos=True,
        model_max_length=LLAMA3_MAX_POSITIONS,
    )
    llm_config = _llama_config(
        tokenizer,
        bos=BEGIN_OF_TEXT,
        eos=eos,
        max_positions=LLAMA3_MAX_POSITIONS,
        rope={"rope_type": "default", "rope_theta": 500000.0},
    )
    llm = LlamaForCausalLM(llm_config).eval()
    shape_output_head(llm, tokenizer, turn_end)  # generations tend to end with the template's end of turn
    gen = torch.Generator().manual_seed(SEED)
    tensors = _internvl_vision_weights(gen)
    for key, value in llm.state_dict().items():
        if "rotary_emb" in key:
            continue
        tensors["language_model." + key] = value
    tensors = {k: v.detach().to(torch.float32).contiguous() for k, v in sorted(tensors.items())}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})

    llm_dict = llm_config.to_dict()
    llm_dict["architectures"] = ["LlamaForCausalLM"]
    config = {
        "architectures": ["InternVLChatModel"],
        "auto_map": {
            "AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
            "AutoModel": "modeling_internvl_chat.InternVLChatModel",
            "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel",
        },
        "model_type": "internvl_chat",
        "downsample_ratio": INTERNVL_DOWNSAMPLE,
        "dynamic_image_size": True,
        "force_image_size": INTERNVL_IMAGE_SIZE,
        "min_dynamic_patch": 1,
        "max_dynamic_patch": INTERNVL_MAX_TILES,
        "use_thumbnail": True,
        "ps_version": "v2",
        "select_layer": -1,
        "template": "Hermes-2" if hermes2 else "internvl2_5",  # InternVL's conversation template name
        "use_backbone_lora": 0,
        "use_llm_lora": 0,
        "torch_dtype": "float32",
        "transformers_version": "4.37.2",
        "llm_config": llm_dict,
        "vision_config": _internvl_vision_config(),
    }
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for code in INTERNVL_CODE.glob("configuration_*.py"):  # the checkpoint's config classes (remote code)
        shutil.copy(code, out / code.name)
    preprocessor = {
        "crop_size": INTERNVL_IMAGE_SIZE,
        "do_center_crop": True,
        "do_normalize": True,
        "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225],
        "resample": 3,
        "size": INTERNVL_IMAGE_SIZE,
    }
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
    ids = tokenizer.convert_tokens_to_ids
    _write_generation_config(
        out,
        bos_token_id=ids(BEGIN_OF_TEXT),
        eos_token_id=[ids(END_OF_TEXT)] if hermes2 else [ids(EOT), ids(END_OF_TEXT)],
        pad_token_id=ids(END_OF_TEXT),
        do_sample=False,
    )
    tokenizer.save_pretrained(out)


# ------------------------------------------------------------------------------------ Qwen2
def _build_qwen2_instruct(out: Path) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED)
    tokenizer = build_bpe_tokenizer(
        special=[QWEN_EOS, IM_START, IM_END],
        chat_template=QWEN2_INSTRUCT_TEMPLATE,
        eos=IM_END,
        pad=QWEN_EOS,
        model_max_length=QWEN2_MAX_POSITIONS,
    )
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2Config(
        vocab_size=_padded_vocab(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        head_dim=HIDDEN // HEADS,
        hidden_act="silu",
        max_position_embeddings=QWEN2_MAX_POSITIONS,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        use_sliding_window=False,
        tie_word_embeddings=False,
        initializer_range=INIT_RANGE,
        bos_token_id=ids(QWEN_EOS),
        eos_token_id=ids(IM_END),
        pad_token_id=None,
        dtype="float32",
        architectures=["Qwen2ForCausalLM"],
    )
    model = Qwen2ForCausalLM(config).eval()
    shape_output_head(model, tokenizer, IM_END)
    model.generation_config = _generation_config(
        bos_token_id=ids(QWEN_EOS),
        eos_token_id=[ids(IM_END), ids(QWEN_EOS)],
        pad_token_id=ids(QWEN_EOS),
        do_sample=True,
        temperature=0.7,
        top_p=0.8,
        top_k=20,
        repetition_penalty=1.05,
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _generation_config(**fields):
    from transformers import GenerationConfig

    return GenerationConfig(**fields)


# --------------------------------------------------------------------------------- R1 distill
def _build_r1_llama(out: Path) -> None:
    import torch
    from transformers import LlamaForCausalLM

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED)
    tokenizer = build_bpe_tokenizer(
        special=[R1_BOS, R1_EOS, R1_PAD],
        added=[R1_USER, R1_ASSISTANT, *R1_TOOL_TOKENS, THINK_OPEN, THINK_CLOSE],
        chat_template=R1_TEMPLATE,
        eos=R1_EOS,
        bos=R1_BOS,
        pad=R1_EOS,
        add_bos=True,
        model_max_length=16384,
    )
    ids = tokenizer.convert_tokens_to_ids
    config = _llama_config(
        tokenizer,
        bos=R1_BOS,
        eos=R1_EOS,
        max_positions=R1_MAX_POSITIONS,
        rope={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    )
    model = LlamaForCausalLM(config).eval()
    shape_output_head(model, tokenizer, R1_EOS, along={THINK_CLOSE: (R1_THINK_CLOSE_AFTER, R1_THINK_CLOSE_GAIN)})
    model.generation_config = _generation_config(
        bos_token_id=ids(R1_BOS),
        eos_token_id=ids(R1_EOS),
        do_sample=True,
        temperature=0.6,
        top_p=0.95,
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


BUILDERS: dict[str, Callable[[Path], None]] = {
    "internvl2": _build_internvl2,
    "qwen2_instruct": _build_qwen2_instruct,
    "r1_llama": _build_r1_llama,
}
