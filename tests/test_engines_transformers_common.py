"""Where the hf engine puts a model's weights (no GPU here: torch's CUDA probe is patched,
which is the one thing this machine cannot show; the loading itself is covered on CPU elsewhere)."""

from __future__ import annotations

import torch

from annotate.engines.transformers_common import load_placement


def test_auto_spreads_over_the_replicas_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    kwargs, device = load_placement("auto")
    # device_map "auto" lets accelerate spread the layers over every GPU Ray gave the replica (a 2-GPU
    # hf model used to be put whole on one device with .to(device))
    assert kwargs == {"device_map": "auto"} and device == "cuda:0"


def test_cpu_and_explicit_devices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert load_placement("auto") == ({}, "cpu")
    assert load_placement("cpu") == ({}, "cpu")
    assert load_placement("cuda:1") == ({"device_map": {"": "cuda:1"}}, "cuda:1")


def test_hf_engine_loads_with_the_placement(monkeypatch, tiny_model_paths):
    """HfEngine passes the placement to from_pretrained (and moves nothing by hand when it did)."""
    from annotate.config import HfArgs, ModelConfig
    from annotate.engines import hf_engine

    seen = {}
    real = hf_engine.load_placement

    def spy(device):
        seen["device"] = device
        return real(device)

    monkeypatch.setattr(hf_engine, "load_placement", spy)
    engine = hf_engine.HfEngine(ModelConfig(engine="hf", path=str(tiny_model_paths["text"]), hf=HfArgs(device="auto")))
    assert seen == {"device": "auto"} and engine.device == "cpu" and engine.model.device.type == "cpu"
