"""A whole-chain run over a dataset made under another config: what lineage keeps and what it makes
again (counted for the run record before anything runs), and the refusal to make fields with a running
deployment whose model folder was replaced since. The clearing itself is `stages/lineage.reset_for_lineage`,
in each shard's read task."""

from __future__ import annotations

from annotate.data.store import FINAL, OutputStore, iter_region_fields
from annotate.serving.apps import ModelApp
from annotate.stages.lineage import LineageKey, stages_to_redo


def lineage_counts(store: OutputStore, items: list[dict], keys: dict[str, LineageKey]) -> dict[str, dict]:
    """Over the dataset shards a run reuses (`relineage`), per stage: regions whose field is kept, those
    made again, and which parts of the stage's lineage changed since the run that made them (from the
    keys earlier run records list; "unknown" when none does)."""
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
    earlier = _earlier_keys(store)
    for stage, old in before.items():
        changed = {part for digest in old for part in (keys[stage].changed(earlier[digest]) if digest in earlier and stage in keys
                                                          else ["unknown" if stage in keys else "stage left the chain"])}
        counts[stage]["changed"] = sorted(changed)
    return counts


def _earlier_keys(store: OutputStore) -> dict[str, LineageKey]:
    """digest -> key, from the lineage keys every earlier run record lists."""
    found: dict[str, LineageKey] = {}
    for record in store.run_records():
        for key in (record.get("lineage_keys") or {}).values():
            found[key["digest"]] = LineageKey(key["digest"], key["parts"])
    return found


def refuse_stale_deployments(store: OutputStore, identities: dict[str, dict], apps: dict[str, ModelApp]) -> None:
    """A model folder replaced under the same path since an earlier run, whose deployment this run found
    running (not started now): it may still hold the weights it loaded then, and would make the fields
    its new lineage asks for with the old ones. Stopping it costs a reload; billing a run that makes
    nothing new costs more."""
    last: dict[str, dict] = {}
    for record in store.run_records():
        last.update(record.get("model_identities") or {})
    stale = [key for key, identity in identities.items()
             if key in apps and not apps[key].deployed_now and key in last
             and last[key].get("path") == identity.get("path") and last[key] != identity]
    if stale:
        raise RuntimeError(f"the weights of model(s) {', '.join(stale)} changed under the same path since an earlier run "
                           "into this output, and their running deployment(s) may hold the old ones. Stop them "
                           "(`annotate serve --stop --config ...`) and rerun: the run deploys them again")
