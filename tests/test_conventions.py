"""Each production model's conventions (engines/conventions.py) and the load-time check of a stage's
model against its checkpoint (engines/checkpoint_check.py): the facts and their sources, the box each
family writes, the stop tokens a stage sends, pipelines/longgrit.yaml against the families, and each
refusal shown with a tiny replica built (or configured) the wrong way."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from PIL import Image

from annotate.config import ModelConfig, load_config
from annotate.engines.checkpoint_check import CheckpointError, check_checkpoints
from annotate.engines.conventions import CONVENTIONS, GRID_1000, conventions_of, effective_stop_tokens
from annotate.stages.base import PromptTemplate
from annotate.stages.chain import build_stage, chain_of
from bench.harness import PAPER_TINY, REPO

LONGGRIT = REPO / "pipelines" / "longgrit.yaml"

# What the models' own code parses (Griffon's TextBoxFormatter, InternVL's demo `find_bounding_boxes`).
GRIFFON_BOX = re.compile(r"^\[\d{1,}\.\d{3},\d{1,}\.\d{3},\d{1,}\.\d{3},\d{1,}\.\d{3}\]$")
INTERNVL_BOX = re.compile(r"<box>\s*(\[\[.*?\]\])\s*</box>")


# ------------------------------------------------------------------------------------- facts
def test_the_production_families_facts():
    internvl = CONVENTIONS["internvl2_hermes2"]
    assert internvl.chat_format == "chatml" and internvl.end_of_turn == "<|im_end|>"
    assert "<|eot_id|>" not in internvl.stop_tokens and "<|im_end|>" in internvl.stop_tokens
    assert (internvl.image.tile_size, internvl.image.max_tiles, internvl.image.thumbnail,
            internvl.image.tokens_per_tile) == (448, 12, True, 256)
    assert internvl.image.tokens_per_tile == (448 // 14) ** 2 * 0.5 ** 2
    griffon = CONVENTIONS["griffon_gemma2"]
    assert griffon.chat_format == "gemma" and griffon.stop_tokens == ("<end_of_turn>",)
    qwen = CONVENTIONS["qwen2_chatml"]
    assert qwen.end_of_turn == "<|im_end|>" and qwen.sampling["repetition_penalty"] == 1.05 and qwen.sampling["top_k"] == 20
    r1 = CONVENTIONS["r1_distill"]
    assert r1.system_in_user and r1.reasoning_parser == "deepseek_r1"
    assert r1.sampling == {"temperature": 0.6, "top_p": 0.95} and r1.end_of_turn == "<｜end▁of▁sentence｜>"
    assert CONVENTIONS["chatml"].end_of_turn == "<|im_end|>"
    for conventions in CONVENTIONS.values():
        assert conventions.end_of_turn in conventions.stop_tokens, conventions.family
        assert conventions.facts and all(f.claim and f.source for f in conventions.facts), conventions.family
    # every production family cites its model's own repository or README
    cited = {name: " ".join(f.source for f in c.facts) for name, c in CONVENTIONS.items()}
    assert "OpenGVLab/InternVL internvl_chat/internvl/conversation.py" in cited["internvl2_hermes2"]
    assert "vllm-project/vllm examples/offline_inference/vision_language.py" in cited["internvl2_hermes2"]
    assert "jefferyZhan/Griffon griffon/coor_utils.py" in cited["griffon_gemma2"]
    assert "jefferyZhan/Griffon griffon/conversation.py" in cited["griffon_gemma2"]
    assert "deepseek-ai/DeepSeek-R1 README.md" in cited["r1_distill"]


# --------------------------------------------------------------------------------------- boxes
@pytest.mark.parametrize("family, expected", [
    ("internvl2_hermes2", "<box>[[100, 100, 300, 300]]</box>"),
    ("griffon_gemma2", "[0.100,0.100,0.300,0.300]"),
    (None, "[100, 100, 300, 300]"),
])
def test_each_family_writes_the_box_its_way(family, expected):
    fmt = CONVENTIONS[family].box if family else GRID_1000
    assert fmt.format([100, 50, 200, 100], 1000, 500) == expected


def test_boxes_parse_with_the_models_own_patterns():
    griffon, internvl = CONVENTIONS["griffon_gemma2"].box, CONVENTIONS["internvl2_hermes2"].box
    for bbox, w, h in (([0, 0, 640, 480], 640, 480), ([12.5, 7.25, 99.9, 33.3], 333, 777), ([-5, 10, 900, 20], 800, 600)):
        text = griffon.format(bbox, w, h)
        assert GRIFFON_BOX.match(text), text
        assert all(0.0 <= float(v) <= 1.0 for v in text[1:-1].split(","))  # clamped, as norm_box_xyxy
        (inner,) = INTERNVL_BOX.findall(internvl.format(bbox, w, h))
        assert all(0 <= v <= 1000 and isinstance(v, int) for v in eval(inner)[0])
    assert griffon.format([10, 20, 30, 40], 3, 7) == "[1.000,1.000,1.000,1.000]"


def test_the_context_prompt_takes_its_box_from_the_model():
    """Pointing the context stage at InternVL2 changes the box text with it."""
    from annotate.data.records import ImageRecord, RegionRecord
    from annotate.stages.base import RegionContext

    cfg = load_config(LONGGRIT)
    record = ImageRecord(image_key="k", shard="s", width=1000, height=500, caption="a photo")
    region = RegionRecord(region_id="s:k:0", region_index=0, phrase="a red cup", bbox=[100.0, 50.0, 200.0, 100.0],
                          mask=None, mask_source="box")
    record.regions = [region]
    ctx = RegionContext(record=record, region=region, image=None, crops=cfg.data.crops)
    images = {"image": Image.new("RGB", (8, 4))}

    def user_text(model_name):
        stage = build_stage("context", cfg.stages["context"], model_name, cfg.models[model_name])
        text = stage.prompt.messages(stage.fields(ctx), images)[-1]["content"][-1]["text"]
        return text.split("The object is", 1)[1]

    assert '"a red cup", in the box [0.100,0.100,0.300,0.300] (x1, y1, x2, y2, as fractions' in user_text("griffon_g")
    assert "in the box <box>[[100, 100, 300, 300]]</box> (x1, y1, x2, y2, normalised to 0-1000)" in user_text("internvl2_76b")
    generic = build_stage("context", cfg.stages["context"], "m")  # no model: no convention
    assert "in the box [100, 100, 300, 300] (x1" in generic.prompt.messages(generic.fields(ctx), images)[-1]["content"][-1]["text"]


# ------------------------------------------------------------------------------- stops, system
def test_a_stage_sends_its_own_stop_tokens_then_its_familys():
    cfg = load_config(LONGGRIT, {"stages": {"object": {"sampling": {"stop_token_ids": [7, "<|im_end|>"]}}}})
    stage = build_stage("object", cfg.stages["object"], "m", cfg.models["internvl2_76b"])
    assert stage.sampling.stop_token_ids == [7, "<|im_end|>"]  # each once
    context = build_stage("context", cfg.stages["context"], "m", cfg.models["griffon_g"])
    assert context.sampling.stop_token_ids == ["<end_of_turn>"]
    assert cfg.stages["context"].sampling.stop_token_ids == []  # the config itself is left as written
    assert build_stage("context", cfg.stages["context"], "m").sampling.stop_token_ids == []


def test_r1_gets_no_system_prompt():
    prompt = PromptTemplate(version="v", system="Be brief about {{ x }}.", user="Merge {{ x }}.")
    assert [m["role"] for m in prompt.messages({"x": "a"}, {})] == ["system", "user"]
    folded = prompt.for_model(CONVENTIONS["r1_distill"]).messages({"x": "a"}, {})
    assert folded == [{"role": "user", "content": [{"type": "text", "text": "Be brief about a.\n\nMerge a."}]}]
    assert prompt.for_model(CONVENTIONS["qwen2_chatml"]) is prompt and prompt.for_model(None) is prompt
    cfg = load_config(LONGGRIT)
    merge = build_stage("merge", cfg.stages["merge"], "m", cfg.models["deepseek_r1_70b"])
    assert merge.prompt.system_in_user and not build_stage("merge", cfg.stages["merge"], "m").prompt.system_in_user


# -------------------------------------------------------------------------- the pipeline files
@pytest.mark.parametrize("path", [LONGGRIT, PAPER_TINY], ids=lambda p: p.name)
def test_the_paper_pipelines_follow_the_models_conventions(path):
    """Checked on the files alone, no weights: every vLLM model names its family, each stage
    stops on its model's end of turn and on no other model's, the context box is the model's."""
    cfg = load_config(path)
    expected = {"internvl2_76b": "internvl2_hermes2", "qwen2_72b": "qwen2_chatml", "griffon_g": "griffon_gemma2",
                "deepseek_r1_70b": "r1_distill"}
    assert {name: m.family for name, m in cfg.models.items()} == expected
    others = {c.end_of_turn for c in CONVENTIONS.values()} | {"<|eot_id|>"}
    for name in chain_of(cfg):
        model = cfg.models[cfg.stages[name].model]
        conventions = conventions_of(model)
        stops = effective_stop_tokens(cfg.stages[name].sampling, model)
        assert conventions.end_of_turn in stops, name
        assert not (set(stops) & others) - {conventions.end_of_turn}, (name, stops)
    assert "<|eot_id|>" not in path.read_text()
    assert cfg.stages["context"].model == "griffon_g" and "{{ box }}" in Path(cfg.stages["context"].prompt).read_text()


def test_family_is_optional_and_checked():
    assert ModelConfig(engine="vllm", path="x").family is None
    assert ModelConfig(engine="vllm", path="x", reasoning_parser="deepseek_r1").reasoning_parser == "deepseek_r1"
    with pytest.raises(ValueError, match="family"):
        ModelConfig(engine="vllm", path="x", family="llama3")


# ------------------------------------------------------------------ the check, on tiny replicas
@pytest.fixture(scope="module")
def paper_tiny():
    return load_config(PAPER_TINY)


def test_replicas_built_to_the_conventions_pass(paper_tiny, tiny_model_paths):
    notes = check_checkpoints(paper_tiny, chain_of(paper_tiny))
    assert any("internvl2_76b" in n and "<|im_end|>" in n for n in notes)
    assert any("griffon_g" in n and "<end_of_turn>" in n for n in notes)
    assert any("deepseek_r1_70b" in n and "<｜end▁of▁sentence｜>" in n for n in notes)


def test_the_internvl2_replica_speaks_chatml(tiny_model_paths):
    import json

    from transformers import AutoTokenizer

    folder = tiny_model_paths["internvl2"]
    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    vocab = tok.get_vocab()
    assert {"<|im_start|>", "<|im_end|>", "<|eot_id|>", "<|begin_of_text|>"} <= set(vocab)  # a Llama-3 vocabulary + ChatML
    generation = json.loads((folder / "generation_config.json").read_text())
    assert vocab["<|im_end|>"] not in generation["eos_token_id"]  # the case the stage's stop tokens are for
    assert json.loads((folder / "config.json").read_text())["template"] == "Hermes-2"


@pytest.fixture(scope="module")
def internvl2_built_the_old_way(tmp_path_factory):
    from annotate.models.tiny_paper import BUILDERS

    out = tmp_path_factory.mktemp("internvl2-llama3-template")
    BUILDERS["internvl2"](out, chat="llama3")
    return out


def test_a_replica_with_the_llama3_template_is_refused(paper_tiny, internvl2_built_the_old_way):
    """The first InternVL2 replica (Llama-3 headers, <|eot_id|>) is not what the family says."""
    cfg = paper_tiny.model_copy(deep=True)
    cfg.models["internvl2_76b"].path = str(internvl2_built_the_old_way)
    with pytest.raises(CheckpointError, match=r"declared family internvl2_hermes2, whose assistant turns end with "
                                              r"<\|im_end\|>.*ends them with <\|eot_id\|>"):
        check_checkpoints(cfg, ("object",))


def test_a_stage_that_would_never_stop_is_refused_naming_the_token(paper_tiny, tiny_model_paths):
    """The InternVL2 replica as built now, with the object stage as configured before: no family,
    stop on <|eot_id|> (a token of any Llama-3 vocabulary, so the budget check passed it)."""
    cfg = load_config(PAPER_TINY, {"models": {"internvl2_76b": {"family": None}},
                                   "stages": {"object": {"sampling": {"stop_token_ids": ["<|eot_id|>"]}}}})
    with pytest.raises(CheckpointError) as refused:
        check_checkpoints(cfg, chain_of(cfg))
    message = str(refused.value)
    assert "stage object" in message and "internvl2_76b" in message
    assert 'Add "<|im_end|>" to stages.object.sampling.stop_token_ids' in message
    assert "stage context" not in message  # the other stages are fine
    # the same with the stop token the family names passes
    fixed = load_config(PAPER_TINY, {"models": {"internvl2_76b": {"family": None}},
                                     "stages": {"object": {"sampling": {"stop_token_ids": ["<|im_end|>"]}}}})
    check_checkpoints(fixed, ("object",))


def test_griffon_without_its_end_of_turn_is_refused(tiny_model_paths):
    """Griffon-G stops on <end_of_turn>, not on EOS: a context stage without it never ends a turn."""
    cfg = load_config(PAPER_TINY, {"models": {"griffon_g": {"family": None}}})
    # Griffon-G is served by vLLM: the turn's end is read from the checkpoint's own chat template.
    with pytest.raises(CheckpointError, match=r"stage context: model griffon_g's griffon_g-v\d+'s chat template "
                                              r"ends an assistant turn with <end_of_turn> \(id \d+\).*"
                                              r'Add "<end_of_turn>" to stages\.context\.sampling\.stop_token_ids'):
        check_checkpoints(cfg, ("context",))
    fixed = load_config(PAPER_TINY, {"models": {"griffon_g": {"family": None}},
                                     "stages": {"context": {"sampling": {"stop_token_ids": ["<end_of_turn>"]}}}})
    check_checkpoints(fixed, ("context",))


# R1 on the validate stage, its reasoning parser (and so the merge stage's thinking budget) taken away.
R1_VALIDATES_WITHOUT_PARSER = {"stages": {"validate": {"model": "deepseek_r1_70b"},
                                          "merge": {"sampling": {"thinking_token_budget": None}}},
                               "models": {"deepseek_r1_70b": {"reasoning_parser": None}}}


def test_a_reasoning_model_on_a_json_stage_is_refused(paper_tiny, tiny_model_paths):
    cfg = load_config(PAPER_TINY, R1_VALIDATES_WITHOUT_PARSER)
    with pytest.raises(CheckpointError, match=r"stage validate: model deepseek_r1_70b is a reasoning model .*json_schema"
                                              r".*models\.deepseek_r1_70b\.reasoning_parser \(deepseek_r1\)"):
        check_checkpoints(cfg, ("validate",))
    parsed = load_config(PAPER_TINY, {"stages": {"validate": {"model": "deepseek_r1_70b"}},
                                      "models": {"deepseek_r1_70b": {"reasoning_parser": "deepseek_r1"}}})
    check_checkpoints(parsed, ("validate",))
    check_checkpoints(paper_tiny, ("merge",))  # free text: no parser needed


def test_folders_not_on_this_machine_are_noted_not_refused():
    cfg = load_config(LONGGRIT)
    notes = check_checkpoints(cfg, chain_of(cfg))
    assert len(notes) == 4 and all("is not on this machine" in n for n in notes)
    # the reasoning rule needs no folder
    with pytest.raises(CheckpointError, match="reasoning"):
        check_checkpoints(load_config(LONGGRIT, R1_VALIDATES_WITHOUT_PARSER), ("validate",))


def test_the_run_refuses_before_any_shard_is_read(tmp_path, tiny_model_paths):
    from annotate.executor.runner import run_pipeline
    from bench.harness import SAMPLE_SHARDS

    cfg = load_config(PAPER_TINY, {"models": {"griffon_g": {"family": None}}})
    with pytest.raises(CheckpointError, match="<end_of_turn>"):
        run_pipeline(cfg, SAMPLE_SHARDS, tmp_path, [0], stage="all")
    assert not list(tmp_path.glob("data/*.parquet")) and not (tmp_path / "stages").exists()


def test_each_box_format_reads_back_the_box_it_writes():
    """`BoxFormat.parse` is `format`'s inverse in every family's convention (to its rounding), so a box
    a model writes its own way (the `parts` stage's) lands on the same pixels; text without exactly
    four numbers is no box."""
    bbox, width, height = [40, 30, 100, 50], 400, 300
    formats = {GRID_1000.name: GRID_1000, **{c.box.name: c.box for c in CONVENTIONS.values()}}
    assert len(formats) == 3
    for fmt in formats.values():
        back = fmt.parse(fmt.format(bbox, width, height), width, height)
        assert back == pytest.approx(bbox, abs=0.5), fmt.name
    assert CONVENTIONS["griffon_gemma2"].box.parse("[0.100,0.100,0.350,0.267]", 400, 300) == pytest.approx(
        [40, 30, 100, 50], abs=0.2)
    assert CONVENTIONS["internvl2_hermes2"].box.parse("<box>[[100, 100, 350, 267]]</box>", 400, 300) == \
        pytest.approx([40, 30, 100, 50], abs=0.2)
    assert GRID_1000.parse("[1, 2, 3]", 400, 300) is None and GRID_1000.parse("no box", 400, 300) is None
    # corners bottom-right first, as models sometimes write them: the same box
    assert GRID_1000.parse("[350, 267, 100, 100]", 400, 300) == pytest.approx([40, 30, 100, 50], abs=0.2)
