"""Each stage's model checked against its checkpoint's own files, when a run starts (before any
model is deployed or shard read). Pure: reads files, no Ray, no vLLM.

A model whose answers never meet a stop token runs every answer to `max_tokens`, is retried and
fails: hours of GPU time and every region of the stage. The token that ends an assistant turn is the
chat template's to say, so this renders a two-turn conversation (user, assistant "XYZ", user) with the
model folder's own template (the tokenizer's chat template), takes the token the template writes
right after the assistant's text (ChatML `<|im_end|>`, Gemma `<end_of_turn>`, R1
`<｜end▁of▁sentence｜>`...), and refuses when neither the stage's effective stop tokens (its own and
its model family's, engines/conventions.py) nor the model's EOS ids cover it. The model's EOS ids
are what its engine stops on by itself: vLLM the tokenizer's EOS and generation_config.json's
`eos_token_id`; the transformers engine (`hf`) generation_config's, else the config's, else the
tokenizer's.

It also refuses:
  * a model whose declared family (`models.*.family`) ends turns with another token than its
    checkpoint's template does (a wrong folder, or a wrong family: the box format and stop tokens
    would be another model's);
  * a reasoning model (`reasoning: true`) on a stage whose prompt has a `json_schema` with no
    `reasoning_parser`: guided decoding would constrain the first generated token while the
    template has already opened `<think>`.

Model folders are read where the run is started. A folder that is not on this machine (a cluster
whose workers hold the weights), or an `openai` model, is not read: its template is not checked (a
log line says so), the reasoning rule still applies.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import yaml

from annotate.config import ENGINE_KINDS, ModelConfig, PipelineConfig, StageConfig
from annotate.engines.conventions import conventions_of, effective_stop_tokens
from annotate.engines.model_path import resolve_model_path
from annotate.engines.transformers_common import token_id

log = logging.getLogger(__name__)

# The conversation rendered to find what ends an assistant turn (texts no template changes).
USER_1, ASSISTANT, USER_2 = "ABC", "XYZ", "DEF"


class CheckpointError(ValueError):
    """A stage's model, read from its checkpoint, would not stop or not parse as configured."""


@dataclass(frozen=True)
class TurnEnd:
    """What a model's template writes right after an assistant's text."""

    text: str  # everything between the assistant's text and the next user's text
    token: str | None  # its first token when that is a special/added token (the end of turn), else None
    token_id: int | None
    source: str  # which template was rendered


@dataclass
class Checkpoint:
    """What the check reads of one model folder."""

    folder: Path
    tokenizer: object
    turn_end: TurnEnd
    eos_ids: list[int]

    def token_id(self, token: int | str) -> int | None:
        return token if isinstance(token, int) else token_id(self.tokenizer, token)

    def name(self, token_id: int) -> str:
        return str(self.tokenizer.convert_ids_to_tokens(token_id))


def _conversation() -> list[dict[str, str]]:
    return [{"role": "user", "content": USER_1}, {"role": "assistant", "content": ASSISTANT},
            {"role": "user", "content": USER_2}]


def render_two_turns(model: ModelConfig, folder: Path, tokenizer) -> tuple[str, str]:
    """The two-turn conversation as the model's engine writes it, and which template wrote it."""
    if not getattr(tokenizer, "chat_template", None):
        raise CheckpointError(f"{folder} has no chat template (tokenizer_config.json / chat_template.jinja)")
    text = tokenizer.apply_chat_template(_conversation(), tokenize=False, add_generation_prompt=False)
    return text, f"{folder.name}'s chat template"


def turn_end(model: ModelConfig, folder: Path, tokenizer) -> TurnEnd:
    """What the model's template writes right after an assistant's text."""
    text, source = render_two_turns(model, folder, tokenizer)
    start = text.index(ASSISTANT) + len(ASSISTANT)
    after = text[start:text.index(USER_2, start)]
    ids = tokenizer.encode(after, add_special_tokens=False) if after else []
    special = set(tokenizer.added_tokens_decoder) | set(tokenizer.all_special_ids)
    if ids and ids[0] in special:
        return TurnEnd(after, str(tokenizer.convert_ids_to_tokens(ids[0])), int(ids[0]), source)
    return TurnEnd(after, None, None, source)


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, list) else [value])]


def eos_ids(model: ModelConfig, folder: Path, tokenizer) -> list[int]:
    """The ids the model's engine stops on without being told (see the module docstring)."""
    def read(name: str) -> dict:
        path = folder / name
        return json.loads(path.read_text()) if path.is_file() else {}

    generation = _ids(read("generation_config.json").get("eos_token_id"))
    tokenizer_eos = _ids(tokenizer.eos_token_id)
    if ENGINE_KINDS[model.engine].vllm_stops:
        ids = tokenizer_eos + generation
    else:  # transformers' generate: the generation config's (built from config.json when the file is absent)
        config = read("config.json")
        from_config = _ids(config.get("eos_token_id", (config.get("llm_config") or config.get("text_config") or {})
                                      .get("eos_token_id")))
        ids = generation or from_config or tokenizer_eos
    return list(dict.fromkeys(ids))


def read_checkpoint(model: ModelConfig, folder: Path) -> Checkpoint:
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    trust = getattr(getattr(model, model.engine), "trust_remote_code", False)  # the engine's own section
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a LLaVA-code-base config.json names a model_type transformers does not know
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust)
    finally:
        hf_logging.set_verbosity(verbosity)
    return Checkpoint(folder, tokenizer, turn_end(model, folder, tokenizer), eos_ids(model, folder, tokenizer))


def prompt_has_json_schema(stage: StageConfig) -> bool:
    path = Path(stage.prompt)
    return path.is_file() and bool((yaml.safe_load(path.read_text()) or {}).get("json_schema"))


def reasoning_problems(stage_name: str, stage: StageConfig, model_name: str, model: ModelConfig) -> list[str]:
    if not (model.reasoning and model.reasoning_parser is None and prompt_has_json_schema(stage)):
        return []
    conventions = conventions_of(model)
    parser = conventions.reasoning_parser if conventions and conventions.reasoning_parser else "the model's parser"
    return [f"stage {stage_name}: model {model_name} is a reasoning model (reasoning: true) and the stage's prompt has "
            f"a json_schema, but no reasoning parser is configured: guided decoding would constrain the first token "
            f"while the template has opened <think>, and every region would fail. Set models.{model_name}."
            f"reasoning_parser ({parser}), or give the stage a model that does not reason"]


def family_problems(model_name: str, model: ModelConfig, checkpoint: Checkpoint) -> list[str]:
    conventions = conventions_of(model)
    end = checkpoint.turn_end
    if conventions is None or end.token == conventions.end_of_turn:
        return []
    found = end.token or f"the text {end.text!r}"
    return [f"model {model_name} ({checkpoint.folder}) is declared family {conventions.family}, whose assistant turns end "
            f"with {conventions.end_of_turn} ({', '.join(conventions.models)}), but {end.source} ends them with {found}: "
            f"the folder holds another model, or models.{model_name}.family is wrong"]


def stop_problems(stage_name: str, stage: StageConfig, model_name: str, model: ModelConfig,
                  checkpoint: Checkpoint) -> list[str]:
    """The stage's effective stop tokens (or the model's EOS) end the model's turns."""
    problems = []
    stops = effective_stop_tokens(stage.sampling, model)
    # A string that is not one token stops nothing; the token-budget check (stages/budget.py) names it.
    stop_ids = [i for i in map(checkpoint.token_id, stops) if i is not None]
    end = checkpoint.turn_end
    if ignored := stage.sampling.ignore_eos:
        eos: list[int] = []
    else:
        eos = checkpoint.eos_ids
    if end.token is not None:
        if end.token_id in stop_ids or end.token_id in eos:
            return problems
        eos_names = ", ".join(f"{checkpoint.name(i)} ({i})" for i in eos) or ("none: ignore_eos" if ignored else "none")
        problems.append(
            f"stage {stage_name}: model {model_name}'s {end.source} ends an assistant turn with {end.token} "
            f"(id {end.token_id}), which neither the stage's stop tokens ({', '.join(map(str, stops)) or 'none'}) nor "
            f"the model's EOS ids ({eos_names}) cover: every answer would run to max_tokens. Add \"{end.token}\" to "
            f"stages.{stage_name}.sampling.stop_token_ids (or set models.{model_name}.family to the model's family)")
        return problems
    marker = end.text.strip()
    if marker and not any(s and marker.startswith(s.strip()) for s in stage.sampling.stop):
        problems.append(f"stage {stage_name}: model {model_name}'s {end.source} ends an assistant turn with the text "
                        f"{end.text!r}, not a token: add {marker.splitlines()[0]!r} to stages.{stage_name}.sampling.stop")
    return problems


def check_checkpoints(cfg: PipelineConfig, chain: Iterable[str], read=read_checkpoint) -> list[str]:
    """Check every stage of `chain` against its model's checkpoint; CheckpointError naming each
    problem and what to change, else the lines saying what was checked (for the run's log)."""
    problems: list[str] = []
    notes: list[str] = []
    checkpoints: dict[str, Checkpoint | None] = {}
    for stage_name in chain:
        stage = cfg.stages[stage_name]
        model_name, model = stage.model, cfg.models[stage.model]
        problems += reasoning_problems(stage_name, stage, model_name, model)
        if model_name not in checkpoints:
            checkpoints[model_name] = None
            # A kind that is not deployed is a server elsewhere: no checkpoint here to read.
            folder = Path(resolve_model_path(model.path)) if ENGINE_KINDS[model.engine].served_by else None
            if folder is None or not folder.is_dir():
                where = "served at " + model.openai.base_url if folder is None else f"{model.path} is not on this machine"
                notes.append(f"model {model_name}: {where}; its chat template and stop tokens are not checked here")
                log.warning(notes[-1])
            else:
                try:
                    checkpoint = read(model, folder)
                except (OSError, ValueError, KeyError, ImportError) as exc:
                    problems.append(f"model {model_name}: cannot read its chat template from {folder}: {exc}")
                else:
                    checkpoints[model_name] = checkpoint
                    problems += family_problems(model_name, model, checkpoint)
                    end = checkpoint.turn_end
                    notes.append(f"model {model_name}: {end.source} ends an assistant turn with "
                                 f"{end.token or repr(end.text)}; EOS ids {checkpoint.eos_ids}")
        checkpoint = checkpoints[model_name]
        if checkpoint is not None:
            problems += stop_problems(stage_name, stage, model_name, model, checkpoint)
    if problems:
        raise CheckpointError("checkpoint check failed at load time:\n  " + "\n  ".join(problems))
    return notes
