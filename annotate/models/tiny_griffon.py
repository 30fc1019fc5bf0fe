"""A tiny Griffon-G-style model: a model published in the LLaVA code base, not loadable by
transformers' Auto classes or vLLM, served by the `llava` engine.

The folder it writes has the layout of a real Griffon-G deployment:
  * ``code/griffon/``: the model's package (copied from ``llava_code/``), which registers
    ``GriffonGemma2ForCausalLM`` / ``gemma2_Griffon`` when imported, as ``import griffon`` does;
  * ``vision_tower/``: a separate CLIP vision tower and its ``CLIPImageProcessor`` (Griffon-G names a
    CLIP checkpoint in ``mm_vision_tower``);
  * the language model's weights and a Gemma-style tokenizer (``<bos>``, ``<start_of_turn>``,
    ``<end_of_turn>``); prompts come from the package's conversation template, not a chat template.

Turns end as Griffon-G's do (engines/conventions.py ``griffon_gemma2``): its ``gemma_instruct``
conversation writes ``<end_of_turn>`` after every message and its inference stops on that keyword,
not on EOS. So the replica's EOS is ``<eos>`` alone and its output head's stop row is
``<end_of_turn>``: only a stage whose stop tokens name ``<end_of_turn>`` (the family adds it) ends
its answers where the model ends its turn.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from annotate.models.tiny import HEADS, HIDDEN, IMAGE_SIZE, INIT_RANGE, INTERMEDIATE, LAYERS, PATCH_SIZE, SEED
from annotate.models.tiny import build_bpe_tokenizer, shape_output_head

CODE_SOURCE = Path(__file__).resolve().parent / "llava_code" / "griffon"
PACKAGE = "griffon"
END_OF_TURN = "<end_of_turn>"  # what the conversation template writes after every message
SPECIAL = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", END_OF_TURN]
# The stop row's gain: at tiny.EOS_AFTER_STOP (40) this Gemma-2 ended at once on the sample shards'
# photos (10 of 10 context prompts empty); at 13, 6 of 10 gave a caption and 4 ran to max_tokens (128).
GRIFFON_STOP_GAIN = 13.0


def _tokenizer():
    # Gemma's tokenizer puts <bos> before every encoded text; tokenizer_image_token relies on it.
    return build_bpe_tokenizer(special=SPECIAL, chat_template=None, eos="<eos>", bos="<bos>", pad="<pad>", add_bos=True)


def _vision_tower(out: Path) -> None:
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    CLIPVisionModel(CLIPVisionConfig(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
                                     num_attention_heads=HEADS, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE)
                    ).eval().save_pretrained(out)
    CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
                       ).save_pretrained(out)


def build_griffon(out: Path) -> None:
    import torch

    torch.manual_seed(SEED)
    shutil.copytree(CODE_SOURCE, out / "code" / PACKAGE, ignore=shutil.ignore_patterns("__pycache__"))
    _vision_tower(out / "vision_tower")
    tokenizer = _tokenizer()
    sys.path.insert(0, str(out / "code"))
    try:
        from griffon.model import GriffonGemma2Config, GriffonGemma2ForCausalLM
    finally:
        # `out` is a temporary folder renamed into place: forget the package imported from it, so the
        # engine imports it again from the model's final code folder.
        sys.path.remove(str(out / "code"))
        for name in [m for m in sys.modules if m == PACKAGE or m.startswith(PACKAGE + ".")]:
            del sys.modules[name]
    vocab = ((len(tokenizer) + 63) // 64) * 64
    config = GriffonGemma2Config(
        vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=HEADS, head_dim=HIDDEN // HEADS, query_pre_attn_scalar=HIDDEN // HEADS,
        max_position_embeddings=4096, initializer_range=INIT_RANGE, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, torch_dtype="float32",
        # LLaVA's multimodal keys: a relative mm_vision_tower is looked up in the model folder (the
        # engine's `llava.vision_tower` overrides it, as a real deployment names its CLIP folder).
        mm_vision_tower="vision_tower", mm_hidden_size=HIDDEN, mm_projector_type="mlp2x_gelu",
        mm_vision_select_layer=-2, mm_use_im_start_end=False, image_aspect_ratio="square")
    model = GriffonGemma2ForCausalLM(config).eval()
    shape_output_head(model, tokenizer, END_OF_TURN, stop_gain=GRIFFON_STOP_GAIN)
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.do_sample = False
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)

