"""The training branches for the optional stages' data: MulCLIP's short text (summary vs mask
embedding) and hard negatives (each region against its own description and K negatives, with its own
temperature). Both are off by default."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from annotate.pixclip.loss import PixCLIPLoss, hard_negative_loss
from annotate.train.data import RegionDataset, make_sample
from annotate.train.job import TrainJob
from annotate.train.text_cache import iter_region_texts, write_text_cache
from annotate.train.trainer import param_groups, train

pytestmark = pytest.mark.usefixtures("one_thread")


def unit(*rows):
    return torch.nn.functional.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


def test_hard_negative_loss_is_low_for_the_own_description_and_grows_when_a_negative_is_closer():
    main = unit([1.0, 0.0, 0.0])
    scale = torch.tensor(10.0)
    mask = torch.tensor([[True, True, True]])
    right = hard_negative_loss(main, unit([1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0])[None], mask, scale)
    wrong = hard_negative_loss(main, unit([0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0])[None], mask, scale)
    expected = -torch.log_softmax(torch.tensor([10.0, 0.0, 0.0]), 0)[0]
    assert right == pytest.approx(float(expected)) and wrong > right + 5


def test_missing_negatives_are_masked_and_regions_without_any_are_left_out():
    main = unit([1.0, 0.0], [0.0, 1.0])
    texts = torch.stack([unit([1.0, 0.0], [0.0, 1.0], [0.6, 0.8]), unit([0.0, 1.0], [1.0, 0.0], [1.0, 0.0])])
    scale = torch.tensor(5.0)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    loss = hard_negative_loss(main, texts, mask, scale)
    changed = texts.clone()
    changed[0, 2] = unit([1.0, 0.0])[0]  # a masked-out negative, now identical to the description
    assert hard_negative_loss(main, changed, mask, scale) == pytest.approx(float(loss))
    only_first = -torch.log_softmax(torch.tensor([5.0, 0.0]), 0)[0]  # region 2 has no negative
    assert loss == pytest.approx(float(only_first))
    scale = torch.tensor(5.0, requires_grad=True)
    none = hard_negative_loss(main, texts, torch.tensor([[True, False, False]] * 2), scale)
    assert float(none) == 0.0 and none.requires_grad


def test_branches_off_by_default_leave_the_loss_as_it_was():
    torch.manual_seed(0)
    main, text, short = torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 8)
    scale = torch.tensor(2.0)
    base = PixCLIPLoss(use_fc=False, use_lg=False)(main, text, scale)
    assert set(base) == {"cl", "total"}
    weighted = PixCLIPLoss(use_fc=False, use_lg=False, short_weight=0.5)(main, text, scale, short=short)
    assert weighted["total"] == pytest.approx(float(base["total"] + 0.5 * weighted["short"]))
    assert weighted["short"] == pytest.approx(float(PixCLIPLoss(use_fc=False, use_lg=False)(main, short, scale)["cl"]))


def test_samples_carry_the_branch_texts_and_a_full_image_sample_has_no_negatives(tiny_train_cfg):
    cfg = tiny_train_cfg.model_copy(update={"use_short": True, "use_hard_negatives": True, "hard_negatives_k": 3})
    image, mask = np.zeros((32, 32, 3), np.uint8), np.ones((32, 32), bool)
    text, short, description = np.ones(4), np.full(4, 2.0), np.full(4, 3.0)
    sample = make_sample(image, mask, text, False, cfg, short=short, description=description, negatives=[np.zeros(4)])
    assert torch.equal(sample["short_text"], torch.full((4,), 2.0))
    assert sample["negative_text"].shape == (4, 4) and sample["negative_mask"].tolist() == [True, True, False, False]
    assert torch.equal(sample["negative_text"][0], torch.full((4,), 3.0))
    full = make_sample(image, mask, text, True, cfg, short=short, description=description, negatives=[np.zeros(4)])
    assert full["negative_mask"].tolist() == [True, False, False, False] and torch.equal(full["short_text"], full["text"])
    assert "short_text" not in make_sample(image, mask, text, False, tiny_train_cfg)


def test_pipeline_rows_give_summaries_and_negatives_to_the_loader(pipeline_out, tiny_train_cfg, tmp_path):
    cfg = tiny_train_cfg.model_copy(update={"use_short": True, "use_hard_negatives": True, "hard_negatives_k": 2,
                                            "eval_fraction": 0.0})
    texts = list(iter_region_texts(pipeline_out, summaries=True, negatives=True))
    assert any(label.startswith("summary:") for label, _ in texts) and any(label.startswith("negative0:") for label, _ in texts)
    cache = write_text_cache(texts, lambda batch: np.stack([np.full(6, len(t), np.float32) for t in batch]), tmp_path / "c")
    ds = RegionDataset(pipeline_out, cache, cfg, "train")
    ref = ds.refs[0]
    assert ref.summary.startswith("the ") and ref.negatives and "drawing" in ref.negatives[0]
    sample = ds[0]
    assert sample["negative_mask"].tolist()[:2] == [True, True] or sample["full"]


def test_training_with_both_branches_lowers_the_loss_and_learns_its_own_temperature(tmp_path, tiny_train_cfg):
    cfg = tiny_train_cfg.model_copy(update={"use_short": True, "use_hard_negatives": True, "max_steps": 30,
                                            "warmup_steps": 3, "log_every": 1, "checkpoint_every": 100})
    lines = []
    train(TrainJob(cfg=cfg, output=tmp_path / "run", synthetic=True), log=lines.append)
    records = [json.loads(line) for line in lines if line.startswith("{")]
    assert {"cl", "short", "hn", "total"} <= set(records[0])
    first, last = np.mean([r["hn"] for r in records[:5]]), np.mean([r["hn"] for r in records[-5:]])
    assert last < first, (first, last)
    assert np.mean([r["total"] for r in records[-5:]]) < np.mean([r["total"] for r in records[:5]])

    from annotate.pixclip.build import build_pixclip

    model = build_pixclip(cfg, 64)
    no_decay = [n for g in param_groups(model, cfg) if g["weight_decay"] == 0 for n in g["param_names"]]
    assert "negative_logit_scale" in no_decay
    assert "negative_logit_scale" not in dict(build_pixclip(tiny_train_cfg, 64).named_parameters())


def test_branch_ablation_table_small(tmp_path, tiny_train_cfg):
    from annotate.train.commands import run_ablation

    over = {k: getattr(tiny_train_cfg, k) for k in ("vision_kwargs", "image_size", "embed_dim", "adaptor_hidden", "batch_size")}
    table = run_ablation(tmp_path, max_steps=2, log=lambda _: None, branches=True, **over)
    rows = [line.split("|")[1].strip() for line in table.splitlines()[2:] if line.startswith("|")]
    assert rows == ["PixCLIP", "+ short text", "+ hard negatives", "+ both", "+ parts"]
    results = json.loads((tmp_path / "ablation.json").read_text())
    for name in rows:
        assert 0 <= results[name]["hn_acc"] <= 1 and {"hn_colour", "hn_object", "hn_relation"} <= set(results[name])


def test_score_writes_a_region_text_score_per_described_region(pipeline_out, tiny_train_cfg, tmp_path):
    import shutil

    from annotate.data.store import OutputStore
    from annotate.gallery import write_gallery
    from annotate.train.score import score_output

    out = tmp_path / "out"
    shutil.copytree(pipeline_out, out)
    texts = list(iter_region_texts(out))
    cache = write_text_cache(texts, lambda batch: np.stack([np.full(6, len(t), np.float32) for t in batch]), tmp_path / "c")
    cfg = tiny_train_cfg.model_copy(update={"eval_fraction": 0.0, "max_steps": 1})
    train(TrainJob(cfg=cfg, output=tmp_path / "run", data=out, text_cache=tmp_path / "c"), log=lambda _: None)
    result = score_output(out, tmp_path / "run")
    scores = OutputStore(out).region_text_scores()
    described = {label.split(":", 1)[1] for label, _ in texts if label.startswith("fine:")}
    assert result["scored"] == len(scores) == len(described) and set(scores) == described
    assert all(-1.0001 <= s <= 1.0001 for s in scores.values())
    page = write_gallery(out, tmp_path / "g").pages[0].path.read_text()
    assert "<dt>region-text score</dt>" in page
    assert len(cache) > 0
