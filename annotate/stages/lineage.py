"""Lineage keys: for each stage of a chain, a hash of everything its stored field depends on, so that a
change recomputes only what depends on it (a new merge prompt redoes merge and the stages that read
merge, not object, validate and context).

A key has one digest per part (`PARTS`): `data` (the settings that make the prepared regions and their
masks, and the record schema), `inputs` (the keys of the stages it `reads`, so what they read counts
through them), `model` (its identity, engines/model_identity.py, and the settings that change its
answers), `prompt` (version and text), `sampling` (as sent: the model family's stop tokens added) and
`params` (the stage, its class and params, its retries). A prompt counts by what is sent (its parsed
templates, images, schema, and its tile cap if the model tiles), not by its file's comments or path.
`changed` names the parts two keys differ in. Hashes are of canonical JSON (sorted keys, no
whitespace): a key is the same in every process and Python version.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from annotate.config import PipelineConfig
from annotate.data.records import ImageRecord, Provenance, RegionRecord
from annotate.data.store import data_settings
from annotate.engines.conventions import conventions_of, effective_sampling
from annotate.engines.result_cache import answer_settings
from annotate.stages.base import PromptTemplate
from annotate.stages.chain import CORE_STAGES, STAGE_CLASSES, chain_of, stage_class

# Bumped when what a key covers changes: every stored field is then recomputed once.
LINEAGE_VERSION = 1
PARTS = ("data", "inputs", "model", "prompt", "sampling", "params")
# What answers one given request: the rest of the lineage is in the request's own text and pixels.
ANSWER_PARTS = ("model", "prompt", "sampling")


def canonical_digest(value: Any) -> str:
    """sha256 of `value` as canonical JSON: the same bytes for the same data in any process."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class LineageKey:
    """One stage's lineage: `digest` over all `parts`, each part a digest of its own."""

    digest: str
    parts: dict[str, str]

    @classmethod
    def of(cls, parts: dict[str, Any]) -> "LineageKey":
        digests = {name: canonical_digest(parts[name]) for name in PARTS}
        return cls(canonical_digest({"v": LINEAGE_VERSION, "parts": digests}), digests)

    def changed(self, other: "LineageKey") -> list[str]:
        """The parts (in `PARTS` order) in which `other` differs from this key."""
        return [name for name in PARTS if self.parts[name] != other.parts.get(name)]

    @property
    def answer_digest(self) -> str:
        """The result cache's fingerprint for this stage (engines/result_cache.py `ResultCache`): its
        weights, prompt and sampling. Data and inputs are left out because a request carries what they
        gave it (its rendered text and pixels), so a request that renders the same keeps its answer."""
        return canonical_digest({"v": LINEAGE_VERSION, "parts": {name: self.parts[name] for name in ANSWER_PARTS}})


def chain_lineage(cfg: PipelineConfig, identities: dict[str, dict[str, Any]],
                  segment_identity: dict[str, Any] | None = None) -> dict[str, LineageKey]:
    """The lineage key of every stage of `chain_of(cfg)`, in chain order. `identities` maps each model
    key the stages use to its `model_identity` (computed once per deployment: it reads the weights).
    `segment_identity`: the SAM model's, when the pipeline has one. It joins `data` (SAM's masks are the
    regions' masks, and in `parts` the parts'), so that SAM weights replaced under the same path redo
    every field, as its settings do; a pipeline without SAM keeps its keys."""
    data = data_settings(cfg)
    if segment_identity is not None:
        data = {**data, "segment_identity": segment_identity}
    keys: dict[str, LineageKey] = {}
    for name in chain_of(cfg):
        config = cfg.stages[name]
        model = cfg.models[config.model]
        cls = stage_class(name, config.stage_class)
        missing = [read for read in cls.reads if read not in keys]
        if missing:
            raise ValueError(f"stage {name} reads {', '.join(missing)}, which the chain does not run before it")
        if config.model not in identities:
            raise KeyError(f"no identity given for model {config.model!r} (stage {name})")
        prompt = PromptTemplate.load(config.prompt)
        prompt = dataclasses.replace(prompt, max_tiles=prompt.tile_cap_for(conventions_of(model)))  # as sent
        keys[name] = LineageKey.of({
            "data": data,
            "inputs": {read: keys[read].digest for read in cls.reads},
            "model": {"identity": identities[config.model], "settings": answer_settings(model.model_dump(mode="json"))},
            "prompt": {"version": prompt.version, "content": canonical_digest(dataclasses.asdict(prompt))},
            "sampling": effective_sampling(config.sampling, model).model_dump(mode="json"),
            "params": {"stage": name, "stage_class": config.stage_class,
                       "params": cls.Params.model_validate(config.params).model_dump(mode="json"),
                       "max_attempts": config.max_attempts, "retry_temperature": config.retry_temperature},
        })
    return keys


def stages_to_redo(stored: dict[str, str | None], keys: dict[str, str]) -> list[str]:
    """The stages whose field in a region was made under another lineage than `keys` (stage -> digest),
    or by a stage the chain no longer runs. A stage that never took the region (`None`) has nothing to
    redo: it takes the region again by itself if it wants it. Readers of a changed stage are among them,
    since a key holds the keys of what the stage reads."""
    return [stage for stage, key in stored.items() if key is not None and keys.get(stage) != key]


def stored_lineage(region: RegionRecord) -> dict[str, str | None]:
    """stage -> the lineage key its provenance records for `region`."""
    return {stage: region.provenance.of(stage).lineage for stage in Provenance.stage_names()}


def reset_for_lineage(record: ImageRecord, keys: dict[str, str]) -> dict[str, int]:
    """Clear, in each region, the fields whose lineage differs from `keys`, so that the chain makes them
    again and keeps the others; returns stage -> regions reset. A core stage redone puts the region back
    to `pending` (the later core stages take only pending regions); a region failed or rejected by a
    stage that is redone is taken again. Data-plane failures have no lineage and stay as they are."""
    reset: dict[str, int] = {}
    for region in record.regions:
        redo = stages_to_redo(stored_lineage(region), keys)
        if not redo:
            continue
        by = (region.error or "").split(":", 1)[0]
        for stage in redo:
            STAGE_CLASSES[stage].clear(region)  # only what this stage made (the part stages share a field)
            entry = region.provenance.of(stage)
            for name, info in type(entry).model_fields.items():
                setattr(entry, name, info.get_default(call_default_factory=True))
            reset[stage] = reset.get(stage, 0) + 1
        if any(stage in CORE_STAGES for stage in redo):
            region.status, region.error = "pending", None
        elif by in redo:  # an optional stage's failure, redone: the region is described, as before it
            region.status, region.error = "ok", None
    return reset


def chain_digest(digests: dict[str, str]) -> str:
    """One digest of a whole chain's keys (stage -> digest): what a dataset shard's manifest line keeps,
    so that a run finds the shards whose lineage changed under the same config (weights replaced)."""
    return canonical_digest({"v": LINEAGE_VERSION, "stages": digests})
