"""bench/engine_occupancy.py `--stage context` (BENCHMARKS 7a on the tiny Griffon-G replica) without an
engine: the context stage's requests (the image and the box, fixed lengths), the stored `validate`
input that `annotate run --stage context` reads, and the fixed-length stage class a chain worker
loads. The measurement itself (two vLLM engines and a Serve run) is run by hand, not here.
"""

from __future__ import annotations

from PIL import Image

from annotate.data.store import OutputStore, config_fingerprint
from annotate.stages.chain import build_stage, stage_io
from bench.engine_occupancy import (CONTEXT_CAP, DEFAULT_CONFIGS, SAMPLE, FixedLengthContext, bench_config,
                                    make_stage, merge_records, merge_requests, store_context_output)


def test_context_requests_and_input(tmp_path):
    cfg = bench_config(DEFAULT_CONFIGS["context"], stage="context")
    sc = cfg.stages["context"]
    assert sc.max_attempts == 1 and sc.stage_class == "bench.engine_occupancy:FixedLengthContext"
    assert not cfg.run.breaker.enabled  # every answer ends by `length` by design: the breaker would stop the run
    model = cfg.models[sc.model]
    assert model.path == "tiny:griffon_g" and model.engine == "vllm"
    assert model.vllm.extra["disable_log_stats"] is False

    records = merge_records(cfg, [0], SAMPLE, copies=2, stage="context")
    stage = make_stage(cfg, "context")
    assert isinstance(stage, FixedLengthContext)
    # the class a chain worker builds from the config is the same one
    assert type(build_stage("context", sc, "m", model)) is FixedLengthContext
    requests = merge_requests(records, stage, cfg)
    recs = [r for rs in records.values() for r in rs]
    wanted = [g for r in recs for g in r.regions if stage.wants(g)]
    assert requests and len(requests) == len(wanted)
    assert len({r.image_key for r in recs}) == len(recs)  # copies have their own keys
    for req in requests:
        s = req.sampling
        assert s.min_tokens == s.max_tokens == FixedLengthContext.length(req.request_id) <= CONTEXT_CAP
        assert s.ignore_eos and s.temperature == 0.0
        parts = [p for m in req.messages if isinstance(m["content"], list) for p in m["content"]]
        assert any(isinstance(p.get("image"), Image.Image) for p in parts)  # the full image
        text = " ".join(p["text"] for p in parts if p.get("type") == "text" and p.get("text"))
        assert "in the box [0." in text  # Griffon-G's box format (fractions)

    store_context_output(records, cfg, tmp_path / "run", stage="context")
    assert stage_io("context").reads == "validate"
    finished = OutputStore(tmp_path / "run").finished("validate", config_fingerprint(cfg))
    assert sorted(finished) == sorted(records)
