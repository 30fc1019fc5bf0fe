"""The answer rules (annotate/stages/answers.py): labels, markdown and preambles stripped; echoes of the
prompt, copies of its worked example, answers that only restate their inputs and verdicts their own
reason contradicts retried once, then failed with their reason. Each rule runs on hand-written shapes
and on real answers of SmolLM2-135M-Instruct (issue 30), through `run_stage` with a scripted engine,
so the retry-once-then-fail semantics are what is tested."""

from __future__ import annotations

import asyncio
import dataclasses
import json

import numpy as np
import pytest
import yaml
from PIL import Image

from annotate.config import CropConfig, load_config
from annotate.data.masks import encode_rle
from annotate.data.records import HardNegative, ImageRecord, RegionRecord, Validation, Verdict
from annotate.engines.base import ChatResult
from annotate.stages.answers import (RULES, VerdictWords, contradiction, counter_of, restatement_pattern,
                                     strip_answer)
from annotate.stages.base import clean_caption
from annotate.stages.batch import StageCounts, run_stage, run_stage_async
from annotate.stages.chain import build_stage
from annotate.stages.merge import MergeStage
from annotate.stages.negatives import CONTRADICTION_WORDS, TRUTH_WORDS
from annotate.stages.validate import CONSISTENCY_WORDS

from bench.harness import REPO, TINY_FIELDS

# Real answers of SmolLM2-135M-Instruct, asked by this chain's validate and merge prompts (issue 30);
# the echo answered merge-v1 (MERGE_V1, below), so it is checked against that prompt.
REAL_LABEL = ("Merge: A red ceramic saucer with a glossy glaze, under a espresso cup, in the centre of a "
              "wooden table.")
REAL_ECHO = ("Merge the two descriptions of the same object into one fine-grained description of one to three "
             "sentences that keeps every visual detail and the object's position and relations.")
REAL_PREAMBLE = "The object-level description is: a red mug. The context-level description is: on the table."
REAL_VERDICT = {"consistent": True,
                "reason": "The image is inconsistent with the description of a space shuttle model."}
REAL_COPY = ("The object is a decorative lantern with intricate carvings, positioned as the leftmost item on a "
             "wooden mantelpiece flanked by framed portraits.")
# The merge prompt those answers were given (merge-v1): it ended in a label and its example was a
# labelled block, both of which the model repeated.
MERGE_V1 = """version: merge-v1
images: []
system: >-
  You write precise referring descriptions of objects in images.
user: |-
  Merge the two descriptions of the same object into one fine-grained description of one to three
  sentences that keeps every visual detail and the object's position and relations. Write only
  the description.

  Example.
  Object-level: "a decorative lantern"
  Context-level: "the leftmost object on a mantelpiece"
  Fine-grained: "The object is a decorative lantern with intricate carvings, positioned as the
  leftmost item on a wooden mantelpiece flanked by framed portraits."

  Object-level: "{{ object_caption }}"
  Context-level: "{{ context_caption }}"
  Fine-grained:
"""
# An echo of the current prompt's instruction, in the shape SmolLM2 gave for merge-v1.
ECHO_V2 = "Describe one object in one to three sentences, combining what it looks like with where it is."
GOOD_MERGE = "The red mug with a chipped handle stands on the wooden table, left of a laptop."
ATTEMPTS = 3  # more than two: a rule's rejection is asked again once, however many attempts the stage has


@pytest.fixture(scope="module")
def cfg():
    return load_config(TINY_FIELDS)


class Scripted:
    """Answers every request with the next scripted answer (text, or JSON when a dict)."""

    def __init__(self, *answers):
        self.answers, self.requests = list(answers), []

    def __call__(self, requests):
        self.requests.extend(requests)
        return [self.answer(r) for r in requests]

    def answer(self, request):
        answer = self.answers.pop(0)
        text = json.dumps(answer) if isinstance(answer, dict) else answer
        return ChatResult(request_id=request.request_id, text=text, finish_reason="stop",
                          parsed=answer if isinstance(answer, dict) else None, completion_tokens=3)


def make_record(**fields) -> tuple[ImageRecord, Image.Image]:
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[10:40, 10:40] = 1
    region = RegionRecord(region_id="s:img:0", region_index=0, phrase="a red mug", bbox=[10, 10, 30, 30],
                          mask=encode_rle(mask), mask_source="given", **fields)
    record = ImageRecord(image_key="img", shard="s", width=64, height=64, caption="a mug on a table", regions=[region])
    return record, Image.new("RGB", (64, 64), (200, 30, 30))


FOR_MERGE = dict(object_caption="a red mug", validation=Validation(consistent=True, reason="it is a mug"),
                 context_caption="on the table")
FOR_VALIDATE = dict(object_caption="A red ceramic mug with a chipped handle.")
DESCRIPTION = "The object is a red ceramic mug with a chipped handle. It stands on a wooden table."
DESCRIBED = dict(FOR_MERGE, fine_caption=DESCRIPTION, status="ok")


@pytest.fixture(scope="module")
def merge_v1(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "merge-v1.yaml"
    path.write_text(MERGE_V1)
    return str(path)


def run(cfg, name, engine, fields, params=None, max_attempts=ATTEMPTS, prompt=None):
    update = ({"params": params} if params else {}) | ({"prompt": prompt} if prompt else {})
    config = cfg.stages[name].model_copy(update=update)
    stage = build_stage(name, config, "scripted")
    record, image = make_record(**fields)
    counts = run_stage(stage, [(record, image)], engine, CropConfig(max_side=64), max_attempts)
    return record.regions[0], counts


# --- the stripper --------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, clean", [
    (REAL_LABEL, REAL_LABEL.removeprefix("Merge: ")),
    ('Fine-grained: "The mug is red."', "The mug is red."),
    ("Fine-grained description: The mug is red.", "The mug is red."),
    ("Description: The mug is red.", "The mug is red."),
    ("Answer: Caption: The mug is red.", "The mug is red."),
    ("Object-level: a red mug.", "a red mug."),
    ("The merged description is: The mug is red.", "The mug is red."),
    ("**Fine-grained description:** *The mug* is **red**.", "The mug is red."),
    ("## Fine-grained description\n\n- The mug is red.\n- It has a handle.", "The mug is red. It has a handle."),
    ("1. The mug is red.", "The mug is red."),
    ("```\nThe mug is red.\n```", "The mug is red."),
    ("> The mug is red.", "The mug is red."),
    ("Here is the fine-grained description:\n\nThe mug is red.", "The mug is red."),
    ("Sure! Here's the merged description of the object: \u201cThe mug is red.\u201d", "The mug is red."),
    ('"The mug is red".', "The mug is red"),
    ("Caption:", ""),
    ("**Description:**", ""),
    # left as they are: not labels, not markup
    ("A red mug: glossy, chipped and old.", "A red mug: glossy, chipped and old."),
    ("Here is a red mug: glossy and old.", "Here is a red mug: glossy and old."),
    ("The object is a red mug on the table.", "The object is a red mug on the table."),
    ('A mug labelled "tea" on a table.', 'A mug labelled "tea" on a table.'),
    ("It is 3 cm tall, with a snake_case sticker.", "It is 3 cm tall, with a snake_case sticker."),
])
def test_labels_markdown_preambles_and_quotes_are_stripped(raw, clean):
    assert strip_answer(raw) == clean == clean_caption(raw)
    assert strip_answer(clean) == clean  # a fixed point: stripping twice changes nothing more


def _merge_restated(object_caption="a red mug", context_caption="on the table"):
    labels = MergeStage.restated_inputs
    return [(restatement_pattern(labels["object_caption"]), object_caption),
            (restatement_pattern(labels["context_caption"]), context_caption)]


@pytest.mark.parametrize("raw, clean", [
    (REAL_PREAMBLE, ""),
    (REAL_PREAMBLE + " " + GOOD_MERGE, GOOD_MERGE),
    ('The object-level description is "a red mug", and the context-level description is "on the table". '
     + GOOD_MERGE, GOOD_MERGE),
    ("Object-level: a red mug\nContext-level: on the table\nFine-grained: " + GOOD_MERGE, GOOD_MERGE),
    # a label followed by something other than its input is only a label
    ("Object-level: a red mug with a chipped handle, on the table.", "a red mug with a chipped handle, on the table."),
    # the inputs' words inside a description are not a restatement
    ("A red mug stands on the table.", "A red mug stands on the table."),
])
def test_preambles_restating_the_inputs_are_stripped(raw, clean):
    assert strip_answer(raw, _merge_restated()) == clean


# --- verdicts ------------------------------------------------------------------------------------

@pytest.mark.parametrize("holds, reason, cue", [
    (True, REAL_VERDICT["reason"], "inconsistent"),
    (True, "The caption does not match the phrase.", "does not match"),
    (True, "The caption names a different object.", "different object"),
    (True, "The region is not a vase.", "is not a"),
    (True, "The caption contradicts the image caption.", "contradicts"),
    (False, "The caption matches the region.", "matches"),
    (False, "The caption is consistent with the phrase and the image.", "consistent"),
    # agreeing with the verdict
    (True, "The caption matches the phrase.", None),
    (True, "Nothing in the caption contradicts the phrase.", None),
    (True, "The caption does not contradict the image caption; it is not inconsistent.", None),
    (True, "It describes a mug, not a vase, as the phrase says.", None),
    (False, "The caption does not match the phrase.", None),
    (False, "The caption names a clock, but the region is a vase.", None),
    (False, "Inconsistent: a red clock for a blue vase.", None),
])
def test_validate_verdicts_against_their_reasons(holds, reason, cue):
    assert contradiction(holds, reason, CONSISTENCY_WORDS) == cue


@pytest.mark.parametrize("words, holds, reason, contradictory", [
    (CONTRADICTION_WORDS, True, "The edit is only a paraphrase.", True),
    (CONTRADICTION_WORDS, True, "Both can be true of the same mug.", True),
    (CONTRADICTION_WORDS, True, "green is not red", False),
    (CONTRADICTION_WORDS, True, "The colours are not compatible.", False),
    (CONTRADICTION_WORDS, False, "The new colour contradicts the original.", True),
    (CONTRADICTION_WORDS, False, "It does not contradict the original.", False),
    (CONTRADICTION_WORDS, False, "compatible", False),
    (TRUTH_WORDS, True, "The mug is not green.", True),
    (TRUTH_WORDS, True, "it is green", False),
    (TRUTH_WORDS, False, "The description is true of the mug.", True),
    (TRUTH_WORDS, False, "the mug is red", False),
])
def test_negative_check_verdicts_against_their_reasons(words, holds, reason, contradictory):
    assert (contradiction(holds, reason, words) is not None) == contradictory


def test_cues_that_need_the_absence_of_a_negation_cannot_carry_one():
    with pytest.raises(ValueError, match="must not contain a negation"):
        VerdictWords(against_true=(), against_false=("does not contradict",))


# --- through run_stage: stored, cleaned, retried once, failed with the reason ----------------------

def test_a_labelled_merge_is_stored_without_its_label(cfg):
    region, counts = run(cfg, "merge", Scripted(REAL_LABEL), FOR_MERGE)
    assert region.fine_caption == REAL_LABEL.removeprefix("Merge: ") and region.status == "ok"
    assert (counts.done, counts.cleaned, counts.retried, counts.answers) == (1, 1, 0, 1)


def test_the_real_echo_of_merge_v1_is_an_echo(cfg, merge_v1):
    engine = Scripted(REAL_ECHO, REAL_ECHO)
    region, counts = run(cfg, "merge", engine, FOR_MERGE, prompt=merge_v1)
    assert len(engine.requests) == 2 and region.status == "failed" and region.fine_caption is None
    assert region.error.startswith("merge: echo: ") and counts.echo == 2 and counts.retried == 1
    # and the labelled answer it gave, once the label is stripped, is stored
    region, counts = run(cfg, "merge", Scripted(REAL_LABEL), FOR_MERGE, prompt=merge_v1)
    assert region.fine_caption == REAL_LABEL.removeprefix("Merge: ") and counts.cleaned == 1


@pytest.mark.parametrize("answer, reason, counter", [
    (ECHO_V2, "echo", "echo"),
    (ECHO_V2 + " " + REAL_COPY, "echo", "echo"),  # the instruction and the example: an echo
    (REAL_COPY, "copied example", "copied_example"),
    ("Fine-grained: " + REAL_COPY, "copied example", "copied_example"),
    (REAL_PREAMBLE, "no description", "no_description"),
    ("**Fine-grained description:**", "no description", "no_description"),
])
def test_a_merge_that_is_not_an_answer_is_asked_once_more_then_fails_with_its_reason(cfg, answer, reason, counter):
    engine = Scripted(answer, answer, GOOD_MERGE)
    region, counts = run(cfg, "merge", engine, FOR_MERGE)
    assert len(engine.requests) == 2  # asked again once, not up to max_attempts
    assert engine.requests[1].sampling.temperature >= cfg.stages["merge"].retry_temperature
    assert region.status == "failed" and region.fine_caption is None
    assert region.error.startswith(f"merge: {reason}: ") and region.error.endswith("(after 2 attempts)")
    assert getattr(counts, counter) == 2 and (counts.retried, counts.failed, counts.done) == (1, 1, 0)


@pytest.mark.parametrize("first", [ECHO_V2, REAL_COPY, REAL_PREAMBLE])
def test_a_retry_that_answers_is_stored(cfg, first):
    region, counts = run(cfg, "merge", Scripted(first, GOOD_MERGE), FOR_MERGE)
    assert region.status == "ok" and region.fine_caption == GOOD_MERGE
    assert counts.retried == 1 and counts.done == 1 and counts.failed == 0


def test_a_preamble_before_a_description_is_stripped(cfg):
    region, counts = run(cfg, "merge", Scripted(REAL_PREAMBLE + "\n\n" + GOOD_MERGE), FOR_MERGE)
    assert region.fine_caption == GOOD_MERGE and counts.cleaned == 1 and counts.retried == 0


def test_a_merge_reusing_its_inputs_at_length_is_not_an_echo(cfg):
    caption = "A red ceramic saucer with a glossy glaze and a thin gold rim around its edge"
    context = "under an espresso cup in the centre of a wooden table, beside a silver spoon"
    merged = f"{caption}, lying {context}."
    region, counts = run(cfg, "merge", Scripted(merged), dict(FOR_MERGE, object_caption=caption,
                                                                context_caption=context))
    assert region.fine_caption == merged and region.status == "ok" and counts.cleaned == 0


def test_the_echo_length_is_a_stage_param(cfg):
    echo = "Describe one object in one to three sentences, combining what it looks like"  # 14 words
    assert run(cfg, "merge", Scripted(echo, echo), FOR_MERGE)[0].error.startswith("merge: echo:")
    region, _ = run(cfg, "merge", Scripted(echo), FOR_MERGE, params={"echo_words": 15})
    assert region.fine_caption == echo


def test_with_one_attempt_a_rule_fails_the_region_at_once(cfg):
    region, counts = run(cfg, "merge", Scripted(ECHO_V2), FOR_MERGE, max_attempts=1)
    assert region.error.startswith("merge: echo: ") and "after" not in region.error and counts.retried == 0


def test_a_parse_retry_and_a_rule_retry_are_counted_apart(cfg):
    # an empty answer is a parse problem (retried up to max_attempts); the echo after it still gets its retry
    region, counts = run(cfg, "merge", Scripted("", ECHO_V2, GOOD_MERGE), FOR_MERGE)
    assert region.fine_caption == GOOD_MERGE and counts.retried == 2 and counts.echo == 1


def test_the_async_path_follows_the_same_rules(cfg):
    engine = Scripted(ECHO_V2, ECHO_V2)

    async def chat_one(request):
        engine.requests.append(request)
        return engine.answer(request)

    stage = build_stage("merge", cfg.stages["merge"], "scripted")
    record, image = make_record(**FOR_MERGE)
    counts = asyncio.run(run_stage_async(stage, [(record, image)], chat_one, CropConfig(max_side=64), ATTEMPTS))
    assert record.regions[0].error.startswith("merge: echo:") and counts.echo == 2 and len(engine.requests) == 2


def test_object_and_summarize_answers_are_stripped_and_checked(cfg):
    region, counts = run(cfg, "object", Scripted("**Caption:** A red ceramic mug with a chipped handle."),
                         dict(status="pending"))
    assert region.object_caption == "A red ceramic mug with a chipped handle." and counts.cleaned == 1
    echo = "Describe the object's visual appearance in one or two sentences: its category, shape, colour."
    region, _ = run(cfg, "object", Scripted(echo, echo), dict(status="pending"))
    assert region.error.startswith("object: echo:")

    region, counts = run(cfg, "summarize", Scripted("Summary: A red ceramic mug on a wooden table."), DESCRIBED)
    assert region.summary == "A red ceramic mug on a wooden table." and region.status == "ok"
    restated = f'Description: "{DESCRIPTION}"\nSummary: A chipped red mug on a table.'
    region, _ = run(cfg, "summarize", Scripted(restated), DESCRIBED)
    assert region.summary == "A chipped red mug on a table."


def test_a_contradictory_verdict_is_asked_once_more_then_fails(cfg):
    engine = Scripted(REAL_VERDICT, REAL_VERDICT, {"reason": "fine", "consistent": True})
    region, counts = run(cfg, "validate", engine, FOR_VALIDATE)
    assert len(engine.requests) == 2 and region.validation is None and region.status == "failed"
    assert region.error.startswith(
        'validate: contradictory verdict: "consistent": true but the reason says "inconsistent"')
    assert counts.contradictory_verdict == 2 and counts.failed == 1


def test_a_verdict_agreeing_with_its_reason_is_recorded(cfg):
    agreeing = {"reason": "The caption names a clock, but the region is a vase.", "consistent": False}
    region, counts = run(cfg, "validate", Scripted(REAL_VERDICT, agreeing), FOR_VALIDATE)
    assert region.validation == Validation(**agreeing) and region.status == "rejected"
    assert counts.contradictory_verdict == 1 and counts.rejected == 1
    region, counts = run(cfg, "validate", Scripted({"reason": "It is a mug, not a vase.", "consistent": True}),
                         FOR_VALIDATE)
    assert region.validation.consistent and region.status == "pending" and counts.retried == 0


def test_a_contradictory_negative_check_costs_its_candidate_not_the_region(cfg):
    candidates = [HardNegative(text=DESCRIPTION.replace("red", "green"), edit_type="colour", start=16, end=19,
                               replacement="green"),
                  HardNegative(text=DESCRIPTION.replace("ceramic", "glass"), edit_type="material", start=20,
                               end=27, replacement="glass")]
    answer = {"verdicts": [{"reason": "The edit is only a paraphrase.", "holds": True},
                           {"reason": "glass is not ceramic", "holds": True}]}
    engine = Scripted(answer, answer)
    region, counts = run(cfg, "negatives_text", engine, dict(DESCRIBED, negative_candidates=candidates))
    assert len(engine.requests) == 2 and region.status == "ok" and counts.contradictory_verdict == 2
    first, second = region.negative_text_verdicts
    assert not first.holds and first.reason == "contradictory verdict: The edit is only a paraphrase."
    assert second == Verdict(holds=True, reason="glass is not ceramic")

    checked = [c.model_copy(update={"contradiction": Verdict(holds=True, reason="differs")}) for c in candidates]
    answer = {"verdicts": [{"reason": "The mug is not green.", "holds": True},
                           {"reason": "the mug is ceramic", "holds": False}]}
    region, _ = run(cfg, "negatives_visual", Scripted(answer, answer),
                    dict(DESCRIBED, negative_candidates=checked, negative_text_verdicts=[]))
    assert [n.replacement for n in region.negatives] == ["glass"]  # the contradictory one is not kept
    assert region.negative_candidates[0].visual.holds is False


def test_every_rule_has_a_counter_that_is_summed():
    total, part = StageCounts(), StageCounts()
    for rule in RULES:
        setattr(part, counter_of(rule), 1)
    part.cleaned = part.answers = 1
    total.add(part)
    total.add(part)
    assert all(getattr(total, counter_of(rule)) == 2 for rule in RULES) and total.cleaned == total.answers == 2


# --- the prompts ---------------------------------------------------------------------------------

def test_the_merge_prompt_ends_without_a_label_and_marks_its_example():
    raw = yaml.safe_load((REPO / "prompts" / "merge.yaml").read_text())
    assert raw["version"] != "merge-v1"
    assert not raw["user"].rstrip().endswith(":") and "Fine-grained:" not in raw["user"]
    assert "{#- example #}" in raw["user"] and "{#- end example #}" in raw["user"]


@pytest.mark.parametrize("name, verdict", [("validate", "consistent"), ("negatives_text", "holds"),
                                           ("negatives_visual", "holds")])
def test_verdict_schemas_ask_for_the_reason_first(name, verdict):
    raw = yaml.safe_load((REPO / "prompts" / f"{name}.yaml").read_text())
    schema = raw["json_schema"]
    item = schema if verdict == "consistent" else schema["properties"]["verdicts"]["items"]
    assert list(item["properties"]) == ["reason", verdict] and item["required"] == ["reason", verdict]
    assert raw["user"].index('"reason"') < raw["user"].index(f'"{verdict}"')


def test_reviewed_results_keep_everything_but_the_text(cfg):
    stage = build_stage("merge", cfg.stages["merge"], "scripted")
    record, image = make_record(**FOR_MERGE)
    from annotate.stages.base import RegionContext

    ctx = RegionContext(record=record, region=record.regions[0], image=image, crops=CropConfig(max_side=64))
    result = ChatResult(request_id="x", text=REAL_LABEL, completion_tokens=7, reasoning="thought")
    reviewed = stage.review(ctx, result)
    assert reviewed == dataclasses.replace(result, text=REAL_LABEL.removeprefix("Merge: "))
