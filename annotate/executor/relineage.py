"""A run's lineage: the chain's keys, made only when needed (`RunLineage`); over a dataset made under
another config, what lineage keeps and what it makes again (counted for the run record before anything
runs); and the refusal to make fields with a running deployment whose model folder was replaced since.
The clearing itself is `stages/lineage.reset_for_lineage`, in each shard's read task."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import cached_property
from typing import Any

from annotate.config import PipelineConfig
from annotate.data.store import FINAL, OutputStore, iter_region_fields
from annotate.engines.model_identity import model_identity
from annotate.serving.apps import SEGMENT_MODEL, ModelApp
from annotate.stages.chain import chain_of, stage_writing
from annotate.stages.lineage import LineageKey, chain_digest, chain_lineage, stages_to_redo


class RunLineage:
    """The lineage keys of one run's chain, each made once, on first use. They need every model's
    identity, and a local folder's first identity reads all its weights: a run whose shards are all
    finished asks for them only to check a finished shard's lineage (`plan_work`), never otherwise."""

    def __init__(self, cfg: PipelineConfig, announce: Callable[[str], None] = lambda _: None, console=None):
        # `console`: the run's terminal console, where a first digest of a big folder shows its bar
        self._cfg, self._announce, self._console = cfg, announce, console

    @cached_property
    def identities(self) -> dict[str, dict[str, Any]]:
        """model key -> `model_identity`, for every model the chain uses, and the SAM model's (under
        SEGMENT_MODEL, its deployment's name) when the pipeline has one."""
        models = {key: self._cfg.models[key] for key in sorted({self._cfg.stages[s].model for s in chain_of(self._cfg)})}
        if self._cfg.segment is not None:
            models[SEGMENT_MODEL] = self._cfg.segment
        self._announce(f"lineage: identifying {len(models)} model(s) by their files (a folder's first time reads "
                       "every weight file; then cached by size and mtime)")
        return {key: model_identity(model, console=self._console) for key, model in models.items()}

    @cached_property
    def keys(self) -> dict[str, LineageKey]:
        """stage -> its lineage key (stages/lineage.chain_lineage)."""
        return chain_lineage(self._cfg, self.identities, self.identities.get(SEGMENT_MODEL))

    @cached_property
    def digests(self) -> dict[str, str]:
        """stage -> its key's digest: what a region's provenance keeps."""
        return {stage: key.digest for stage, key in self.keys.items()}

    @cached_property
    def chain(self) -> str:
        """The whole chain's digest: what a dataset shard's manifest line keeps."""
        return chain_digest(self.digests)

    def through(self, stage: str) -> str:
        """The digest of the chain's keys up to and including `stage`: what a `--stage` output's manifest
        line keeps, as its file holds the fields of those stages (the last stage's is `chain`)."""
        order = list(self.digests)
        return chain_digest({name: self.digests[name] for name in order[: order.index(stage) + 1]})

    def of_output(self, output: str) -> str:
        """`through` the stage whose `--stage` run writes `output` (the dataset: the chain's last)."""
        return self.through(stage_writing(output, chain_of(self._cfg)))


def lineage_counts(store: OutputStore, items: list[dict], keys: dict[str, LineageKey],
                   records: list[dict[str, Any]]) -> dict[str, dict]:
    """Over the dataset shards a run reuses (`relineage`), per stage: regions whose field is kept, those
    made again, and which parts of the stage's lineage changed since the run that made them (from the
    keys the earlier run `records` list; "unknown" when none does)."""
    digests = {stage: key.digest for stage, key in keys.items()}
    counts: dict[str, dict] = {}
    before: dict[str, set[str]] = {}
    for item in items:
        if not item["relineage"]:
            continue
        for region in iter_region_fields(store.output_path(FINAL, item["shard"]), ["provenance"]):
            stored = {stage: (entry or {}).get("lineage") for stage, entry in (region["provenance"] or {}).items()}
            redo = set(stages_to_redo(stored, digests))
            for stage, key in stored.items():
                if key is None:
                    continue
                entry = counts.setdefault(stage, {"kept": 0, "recomputed": 0, "changed": []})
                entry["recomputed" if stage in redo else "kept"] += 1
                if stage in redo:
                    before.setdefault(stage, set()).add(key)
    earlier = _earlier_keys(records)
    for stage, old in before.items():
        counts[stage]["changed"] = sorted(_changed_parts(keys.get(stage), old, earlier))
    return counts


def _changed_parts(key: LineageKey | None, old_digests: Iterable[str], earlier: dict[str, LineageKey]) -> set[str]:
    """Which parts of a stage's lineage `key` differ from the keys it had (`old_digests`, looked up in
    `earlier`): "unknown" for a digest no run record lists, "stage left the chain" when it has no key now."""
    if key is None:
        return {"stage left the chain"}
    parts: set[str] = set()
    for digest in old_digests:
        parts.update(key.changed(earlier[digest]) if digest in earlier else ["unknown"])
    return parts


def _earlier_keys(records: list[dict[str, Any]]) -> dict[str, LineageKey]:
    """digest -> key, from the lineage keys every earlier run record lists."""
    found: dict[str, LineageKey] = {}
    for record in records:
        for key in (record.get("lineage_keys") or {}).values():
            found[key["digest"]] = LineageKey(key["digest"], key["parts"])
    return found


def refuse_stale_deployments(records: list[dict[str, Any]], identities: dict[str, dict],
                             apps: dict[str, ModelApp]) -> None:
    """A model folder replaced under the same path since an earlier run (its `records`), whose deployment
    this run found running (not started now): it may still hold the weights it loaded then, and would make
    the fields its new lineage asks for with the old ones. Stopping it costs a reload; billing a run that
    makes nothing new costs more."""
    last: dict[str, dict] = {}
    for record in records:
        last.update(record.get("model_identities") or {})
    stale = [key for key, identity in identities.items()
             if key in apps and not apps[key].deployed_now and key in last
             and last[key].get("path") == identity.get("path") and last[key] != identity]
    if stale:
        raise RuntimeError(f"the weights of model(s) {', '.join(stale)} changed under the same path since an earlier run "
                           "into this output, and their running deployment(s) may hold the old ones. Stop them "
                           "(`annotate serve --stop --config ...`) and rerun: the run deploys them again")
