"""Tiny random-weight models for CPU runs and tests: built locally, deterministic, no network.

The CPU pipeline's two models, each a few MB (registry.py names every tiny model and caches builds):
  * ``text``: a Qwen2-style causal LM (``Qwen2ForCausalLM``). Its tokenizer knows ``<think>`` and
    ``</think>`` (as ordinary added tokens, kept when decoding), so it can stand in for a reasoning
    model as well.
  * ``vlm``: a LLaVA-style vision-language model (``LlavaForConditionalGeneration``: a small CLIP
    vision tower + a small Qwen2 text model, ``CLIPImageProcessor``, an ``<image>`` token and a chat
    template that places it).

The tokenizers are byte-level BPE trained with the ``tokenizers`` library on a few hundred words
(plus JSON punctuation and digits), so every string is encodable and structured (JSON) output can be
produced. Attention heads are 64 wide (hidden 128, 2 heads): vLLM's CPU attention refuses smaller.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

SEED = 1234

HIDDEN = 128
HEADS = 2  # head_dim 64
LAYERS = 2
INTERMEDIATE = 256
MAX_POSITIONS = 4096
VOCAB_SIZE = 640  # BPE target; 256 byte symbols + merges + special tokens

# Weights wider than the usual 0.02, so that the output depends on the context (with 0.02 a random
# model repeats one token, e.g. "\n\n\n..."); see shape_output_head for the output layer.
INIT_RANGE = 0.2
HEAD_STD = 0.1
EOS_AFTER_STOP = 40.0  # EOS output row: this * HEAD_STD along the "." embedding

IMAGE_SIZE = 32
PATCH_SIZE = 8  # (32 / 8)^2 = 16 image tokens per image

EOS = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
IMAGE_TOKEN = "<image>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"

# ChatML; content may be a string or a list of OpenAI-style parts (text / image).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{- part['text'] -}}"
    "{%- elif part['type'] in ['image', 'image_url', 'image_pil'] -%}{{- '<image>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

_WORDS = """
a an the of in on at to with and or but is are was were be been has have had it its this that
these those there here near far left right top bottom middle center front back behind above below
under over next beside between inside outside small large big tiny huge long short tall wide narrow
red green blue yellow orange purple pink brown black white gray grey dark light bright pale golden
silver wooden metal glass plastic stone paper cloth leather round square flat curved striped dotted
man woman person child boy girl people dog cat bird horse cow sheep car truck bus bicycle motorcycle
train boat plane tree flower grass sky cloud sun water river lake sea beach sand snow road street
building house window door wall roof table chair bed sofa lamp cup bottle plate bowl knife fork
spoon phone laptop screen book bag hat shirt jacket dress shoe hand face hair eye head arm leg body
sitting standing walking running holding wearing looking smiling playing eating riding carrying
object region image photo picture scene background foreground part side edge corner surface shape
color texture pattern detail visible partially clearly appears seems shows contains includes
consistent inconsistent true false null yes no caption description reason answer because however
think thought first then finally so therefore check verify correct wrong same different matches
one two three four five six seven eight nine ten zero many few several some all none each every
""".split()
_EXTRA = ['{', '}', '[', ']', ':', ',', '"', "'", '.', '!', '?', '-', '(', ')', '/', '\\', '_', '\n']
_EXTRA += [str(d) for d in range(10)] + ["0.5", "1.0", "12", "100", "2024"]
_EXTRA += ['{"consistent": true, "reason": "the object matches"}', '{"a": [1, 2, 3], "b": null}']


def _corpus() -> list[str]:
    import random

    rng = random.Random(SEED)
    lines = [" ".join(_WORDS), " ".join(_EXTRA)]
    for _ in range(400):
        n = rng.randint(4, 16)
        lines.append(" ".join(rng.choice(_WORDS) for _ in range(n)) + rng.choice([".", ",", "!", "?", ""]))
    return lines


def build_tokenizer(with_image_token: bool):
    """The text and VLM models' tokenizer: ChatML markers, ``<think>``/``</think>`` kept in decoding."""
    return build_bpe_tokenizer(special=[EOS, IM_START, IM_END] + ([IMAGE_TOKEN] if with_image_token else []),
                               added=[THINK_OPEN, THINK_CLOSE], chat_template=CHAT_TEMPLATE, eos=EOS, pad=EOS,
                               model_max_length=MAX_POSITIONS)


def build_bpe_tokenizer(
    *,
    special: list[str],
    added: Iterable[str] = (),
    chat_template: str | None,
    eos: str,
    bos: str | None = None,
    pad: str | None = None,
    add_bos: bool = False,
    model_max_length: int = 4096,
    extra_special: Iterable[str] = (),
):
    """A byte-level BPE tokenizer trained on ``_corpus()``, for every tiny model: ``special`` tokens
    first (ids 0..), then the merges, then ``added`` tokens that are *not* special (kept when
    decoding, e.g. ``<think>``); ``extra_special`` are added
    special tokens after the merges. ``add_bos``: a post-processor puts ``bos`` in front of every
    encoding, as Llama 3's tokenizers do (chat templates then carry ``bos_token`` themselves and vLLM
    encodes rendered chats without special tokens)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(special),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    extra_special = list(extra_special)
    if extra_special:
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in extra_special])
    added = list(added)
    if added:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in added])
    if add_bos:
        assert bos is not None
        bos_id = tok.token_to_id(bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)]
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=eos,
        bos_token=bos,
        pad_token=pad,
        unk_token=None,
        padding_side="left",
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    others = [t for t in list(special) + extra_special if t not in (eos, bos, pad)]
    if others:
        fast.add_special_tokens({"additional_special_tokens": others})
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


def shape_output_head(model, tokenizer, stop: str, *, along: dict[str, tuple[str, float]] | None = None,
                      stop_gain: float = EOS_AFTER_STOP) -> None:
    """Make a random model's greedy output look like text: output rows of whitespace-only, added
    (special or not: chat markers, ``<think>``...) and partial-UTF-8 tokens are zeroed (their logit is
    0 while the best of the others is well above), and the ``stop`` row (end of turn) points along the
    embedding of "." so that generations tend to end after a full stop (a few to a few dozen tokens)
    instead of at once or never (``stop_gain`` sets how strongly). Each ``along`` entry ``token: (anchor, gain)`` is kept and points
    that token's row along the embedding of ``anchor`` instead (so it tends to follow ``anchor``)."""
    import torch

    along = dict(along or {})
    head = model.get_output_embeddings().weight
    embed = model.get_input_embeddings().weight
    ids = tokenizer.convert_tokens_to_ids
    stop_id = ids(stop)
    keep = {ids(t) for t in along}
    added = set(tokenizer.added_tokens_decoder) | set(tokenizer.all_special_ids)
    muted = []
    for i in range(head.shape[0]):
        if i >= len(tokenizer) or (i in added and i not in keep):
            muted.append(i)
            continue
        if i in keep:
            continue
        piece = tokenizer.decode([i])
        if not piece.strip() or "\ufffd" in piece or any(ord(c) < 32 for c in piece):
            muted.append(i)
    with torch.no_grad():
        head.normal_(0.0, HEAD_STD)
        head[muted] = 0.0
        dot = embed[ids(".")]
        head[stop_id] = dot / dot.norm() * HEAD_STD * stop_gain
        for token, (anchor, gain) in along.items():
            vec = embed[ids(anchor)]
            head[ids(token)] = vec / vec.norm() * HEAD_STD * gain


def _qwen2_config(tokenizer):
    from transformers import Qwen2Config

    vocab = ((len(tokenizer) + 63) // 64) * 64
    return Qwen2Config(
        vocab_size=vocab,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        head_dim=HIDDEN // HEADS,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=False,
        initializer_range=INIT_RANGE,
        eos_token_id=tokenizer.convert_tokens_to_ids(EOS),
        pad_token_id=tokenizer.convert_tokens_to_ids(EOS),
        bos_token_id=None,
        torch_dtype="float32",
    )


def _set_generation_config(model, tokenizer) -> None:
    eos = [tokenizer.convert_tokens_to_ids(EOS), tokenizer.convert_tokens_to_ids(IM_END)]
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = eos[0]
    model.generation_config.bos_token_id = None
    model.generation_config.do_sample = False


def _build_text(out: Path) -> None:
    import torch
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(SEED)
    tokenizer = build_tokenizer(with_image_token=False)
    model = Qwen2ForCausalLM(_qwen2_config(tokenizer)).eval()
    shape_output_head(model, tokenizer, EOS)
    _set_generation_config(model, tokenizer)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _build_vlm(out: Path) -> None:
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    torch.manual_seed(SEED)
    tokenizer = build_tokenizer(with_image_token=True)
    vision = CLIPVisionConfig(
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=HIDDEN,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=_qwen2_config(tokenizer),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )
    model = LlavaForConditionalGeneration(config).eval()
    shape_output_head(model, tokenizer, EOS)
    _set_generation_config(model, tokenizer)
    model.save_pretrained(out)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_center_crop=True,
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,  # CLIP's CLS token ("default" strategy drops it again)
    )
    processor.save_pretrained(out)
    tokenizer.save_pretrained(out)
    _rename_vision_tower_keys(out)


def _build_sam(out: Path) -> None:
    """A segment-anything model (transformers `SamModel`) for the optional segment stage: 128 px
    input, 2-layer ViT, box prompts in, masks out; random weights, so its masks are arbitrary."""
    import torch
    from transformers import SamConfig, SamImageProcessor, SamModel, SamProcessor
    from transformers.models.sam.configuration_sam import (
        SamMaskDecoderConfig,
        SamPromptEncoderConfig,
        SamVisionConfig,
    )

    torch.manual_seed(SEED)
    vision = SamVisionConfig(hidden_size=64, output_channels=32, num_hidden_layers=2, num_attention_heads=2,
                             image_size=128, patch_size=16, mlp_dim=128, global_attn_indexes=[1], window_size=4,
                             num_pos_feats=16)
    prompt = SamPromptEncoderConfig(hidden_size=32, image_size=128, patch_size=16, mask_input_channels=4)
    decoder = SamMaskDecoderConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_dim=64,
                                   iou_head_hidden_dim=32)
    config = SamConfig(vision_config=vision.to_dict(), prompt_encoder_config=prompt.to_dict(),
                       mask_decoder_config=decoder.to_dict())
    SamModel(config).eval().save_pretrained(out)
    SamProcessor(SamImageProcessor(size={"longest_edge": 128}, pad_size={"height": 128, "width": 128},
                                   mask_size={"longest_edge": 32}, mask_pad_size={"height": 32, "width": 32})
                 ).save_pretrained(out)


def _rename_vision_tower_keys(out: Path) -> None:
    """transformers 5 saves ``model.vision_tower.embeddings...``; vLLM (and the llava-hf checkpoints)
    use ``model.vision_tower.vision_model.embeddings...``. Rewrite the keys the vLLM way."""
    from safetensors.torch import load_file, save_file

    for path in sorted(out.glob("*.safetensors")):
        tensors = load_file(str(path))
        renamed = {}
        for key, value in tensors.items():
            if ".vision_tower." in key and ".vision_tower.vision_model." not in key:
                head, tail = key.split(".vision_tower.", 1)
                key = f"{head}.vision_tower.vision_model.{tail}"
            elif key.startswith("vision_tower.") and not key.startswith("vision_tower.vision_model."):
                key = "vision_tower.vision_model." + key[len("vision_tower."):]
            renamed[key] = value
        save_file(renamed, str(path), metadata={"format": "pt"})


BUILDERS = {"text": _build_text, "vlm": _build_vlm, "sam": _build_sam}
