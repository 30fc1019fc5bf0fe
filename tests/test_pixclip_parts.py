"""The part branch (`train.use_parts`): which parts are trained on, how they ride in a batch (flattened
across it, with an index back to their sample), the part loss, and the synthetic task's parts."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from annotate.data.masks import encode_rle
from annotate.data.records import PartRecord, RleMask, Verdict, is_trainable_part
from annotate.pixclip.build import build_pixclip
from annotate.pixclip.loss import PixCLIPLoss, masked_info_nce, part_loss
from annotate.train.data import make_sample
from annotate.train.parts import PartSample, collate_parts, part_arguments

pytestmark = pytest.mark.usefixtures("one_thread")

MASK = {"size": [4, 4], "counts": "04?0"}


def part(**changes) -> dict:
    base = {"part_id": "r-1:p0", "name": "beak", "visibility": "full", "bbox": [0, 0, 2, 2], "mask": MASK, "kept": True,
            "short_caption": "an orange beak", "long_caption": "the short orange beak of the bird",
            "verdict": {"holds": True, "reason": "it is the beak"}}
    return {**base, **changes}


@pytest.mark.parametrize("changes, default, with_unverified", [
    ({}, True, True),
    ({"kept": False}, False, False),
    ({"verdict": {"holds": False, "reason": "a wing"}}, False, False),  # a failed verdict never trains
    ({"verdict": None}, False, True),  # unverified: only when asked for
    ({"short_caption": None, "long_caption": None}, False, False),
    ({"short_caption": None}, True, True),  # one text is enough
    ({"long_caption": ""}, True, True),
    ({"mask": None}, False, False),
])
def test_is_trainable_part_rules_for_dicts_and_records(changes, default, with_unverified):
    row = part(**changes)
    assert is_trainable_part(row) is default and is_trainable_part(row, include_unverified=True) is with_unverified
    record = PartRecord(**{**row, "mask": RleMask(**row["mask"]) if row["mask"] else None,
                           "verdict": Verdict(**row["verdict"]) if row["verdict"] else None})
    assert is_trainable_part(record) is default and is_trainable_part(record, True) is with_unverified


def _sample(cfg, n_parts: int, dim: int = 6, full: bool = False) -> dict:
    image = np.zeros((32, 32, 3), np.uint8)
    region = np.zeros((32, 32), bool)
    region[4:28, 4:28] = True
    parts = []
    for i in range(n_parts):
        m = np.zeros((32, 32), bool)
        m[4 + 6 * i : 10 + 6 * i, 4:28] = True
        parts.append(PartSample(m, np.full(dim, i, np.float32), None if i == 1 else np.full(dim, -i, np.float32)))
    return make_sample(image, region, np.ones(dim, np.float32), full, cfg, parts=parts)


@pytest.mark.parametrize("counts", [(0, 0), (1, 0), (0, 3, 1), (2, 2)])
def test_collation_flattens_parts_with_an_index_to_their_sample(tiny_train_cfg, counts):
    cfg = tiny_train_cfg.model_copy(update={"use_parts": True})
    batch = collate_parts([_sample(cfg, n) for n in counts])
    total, size = sum(counts), cfg.image_size
    assert batch["image"].shape == (len(counts), 3, size, size)
    assert batch["part_mask"].shape == (total, 1, size, size) and batch["part_mask"].dtype == torch.uint8
    assert batch["part_text"].shape == (total, 2, 6) and batch["part_text_mask"].shape == (total, 2)
    assert batch["part_index"].tolist() == [i for i, n in enumerate(counts) for _ in range(n)]
    assert all(batch["part_mask"][k].any() for k in range(total))
    if 3 in counts:  # part 1 of a sample has no long text
        assert batch["part_text_mask"][batch["part_index"] == counts.index(3)].tolist() == [[True, True], [True, False],
                                                                                            [True, True]]
    args = part_arguments(batch)
    assert args["part_mask"].dtype == torch.float32 and bool((args["part_mask"] <= 1).all())


def test_parts_only_with_the_branch_on_and_not_on_full_image_samples(tiny_train_cfg):
    assert "part_mask" not in _sample(tiny_train_cfg, 2)
    assert "part_mask" not in collate_parts([_sample(tiny_train_cfg, 2)] * 2)
    cfg = tiny_train_cfg.model_copy(update={"use_parts": True, "parts_per_region": 2})
    assert _sample(cfg, 2, full=True)["part_mask"].shape[0] == 0
    assert _sample(cfg, 3)["part_mask"].shape[0] == 2  # capped at parts_per_region


def test_a_part_outside_the_regions_view_is_left_out(tiny_train_cfg):
    cfg = tiny_train_cfg.model_copy(update={"use_parts": True})
    image, region = np.zeros((32, 96, 3), np.uint8), np.ones((32, 96), bool)  # the view: the centre square
    outside, inside = np.zeros((32, 96), bool), np.zeros((32, 96), bool)
    outside[:, :8], inside[:, 40:56] = True, True
    vec = np.ones(4, np.float32)
    sample = make_sample(image, region, vec, False, cfg, parts=[PartSample(outside, vec, vec), PartSample(inside, vec, None)])
    assert sample["part_mask"].shape[0] == 1 and sample["part_text_mask"].tolist() == [[True, False]]


def test_masked_info_nce_is_the_clip_loss_on_the_valid_rows():
    torch.manual_seed(0)
    emb, text = torch.randn(5, 8), torch.randn(5, 8)
    scale = torch.tensor(7.0)
    clip = PixCLIPLoss(use_fc=False, use_lg=False)
    everything = masked_info_nce(emb, text, torch.ones(5, dtype=torch.bool), scale)
    assert float(everything) == pytest.approx(float(clip.pair(emb, text, scale)), rel=1e-5)
    valid = torch.tensor([True, False, True, True, False])
    assert float(masked_info_nce(emb, text, valid, scale)) == pytest.approx(
        float(clip.pair(emb[valid], text[valid], scale)), rel=1e-5)


def test_part_loss_is_finite_and_zero_without_parts():
    scale = torch.tensor(math.log(10.0), requires_grad=True)
    empty = torch.zeros(0, 8, requires_grad=True)
    loss = part_loss(empty, torch.zeros(0, 2, 8), torch.zeros(0, 2, dtype=torch.bool), scale.exp())
    assert float(loss.detach()) == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.isfinite(scale.grad)
    none_valid = part_loss(torch.randn(3, 8), torch.randn(3, 2, 8), torch.zeros(3, 2, dtype=torch.bool), scale.exp())
    assert float(none_valid) == 0.0
    mixed = part_loss(torch.randn(3, 8), torch.randn(3, 2, 8), torch.tensor([[True, False], [True, True], [False, True]]),
                      scale.exp())
    assert torch.isfinite(mixed) and float(mixed) > 0
    out = PixCLIPLoss(use_fc=False, use_lg=False, part_weight=0.5)(torch.randn(4, 8), torch.randn(4, 8), scale, part=empty,
                                                                   part_text=torch.zeros(0, 2, 8),
                                                                   part_text_mask=torch.zeros(0, 2, dtype=torch.bool))
    assert float(out["part"]) == 0.0 and float(out["total"]) == pytest.approx(float(out["cl"]))


def test_parts_share_the_forward_and_their_gradient_reaches_the_mask_conv(tiny_train_cfg):
    torch.manual_seed(0)
    cfg = tiny_train_cfg.model_copy(update={"use_parts": True})
    model = build_pixclip(cfg, 6).eval()
    with torch.no_grad():
        model.mask_conv.weight.normal_(0, 0.1)  # zero at init: the mask would not change the embedding yet
    batch = collate_parts([_sample(cfg, n) for n in (2, 0, 3)])
    from annotate.pixclip.transforms import to_model_input

    image, mask = to_model_input(batch["image"], batch["mask"])
    args = part_arguments(batch)
    branches = model.branch_features(image, mask, batch["text"], local_tau=0.5, **args)
    assert branches.part.shape == (5, cfg.embed_dim) and branches.part_text.shape == (5, 2, cfg.embed_dim)
    assert branches.main.shape == (3, cfg.embed_dim) and branches.local.shape == (3, cfg.embed_dim)
    with torch.no_grad():  # each part embedded on its own sample's image, with its own mask
        alone = model.encode_image(image[batch["part_index"]], args["part_mask"], normalize=False)
        assert torch.allclose(branches.part, alone, atol=1e-5)
        assert torch.allclose(branches.main, model.encode_image(image, mask, normalize=False), atol=1e-5)
        texts = model.encode_text(batch["part_text"].flatten(0, 1), normalize=False).unflatten(0, (5, 2))
        assert torch.allclose(branches.part_text, texts, atol=1e-5)
    loss = PixCLIPLoss(use_fc=False, use_lg=False, part_weight=1.0).of_branches(branches, model.logit_scale)
    loss["part"].backward()
    assert model.mask_conv.weight.grad is not None and float(model.mask_conv.weight.grad.abs().sum()) > 0


def test_synthetic_shapes_have_two_halves_inside_the_shape(tiny_train_cfg):
    from annotate.train.synthetic import SyntheticDataset

    ds = SyntheticDataset(tiny_train_cfg.model_copy(update={"image_size": 48}), n_images=4, seed=1)
    for _, regions in ds.scenes:
        for region in regions:
            names = [p["name"] for p in region["parts"]]
            assert names in (["top", "bottom"], ["left", "right"])
            union = np.zeros_like(region["mask"])
            for p in region["parts"]:
                assert not (p["mask"] & ~region["mask"]).any() and p["mask"].any()
                assert not (union & p["mask"]).any()
                union |= p["mask"]
                colour_shape = region["short"][2:]
                assert p["short"] == f"the {p['name']} of a {colour_shape}" and colour_shape in p["long"]
            assert (union == region["mask"]).all()


def test_a_few_synthetic_steps_with_parts_give_a_finite_part_loss(tiny_train_cfg, tmp_path):
    from annotate.train.job import TrainJob
    from annotate.train.trainer import train

    cfg = tiny_train_cfg.model_copy(update={"use_parts": True, "max_steps": 3})
    logs = []
    result = train(TrainJob(cfg=cfg, output=tmp_path / "run", synthetic=True), log=logs.append)
    steps = [json.loads(line) for line in logs if line.startswith("{")]
    assert result["step"] == 3 and all(math.isfinite(s["part"]) and s["part"] > 0 for s in steps)
    assert math.isfinite(result["total"])


def test_the_branch_ablation_has_a_parts_row(tmp_path, tiny_train_cfg, monkeypatch):
    from annotate.train import commands

    assert ("+ parts", {"use_parts": True}) in commands.BRANCH_ROWS
    monkeypatch.setattr(commands, "BRANCH_ROWS", tuple(r for r in commands.BRANCH_ROWS if r[0] in ("PixCLIP", "+ parts")))
    over = {k: getattr(tiny_train_cfg, k) for k in ("vision_kwargs", "image_size", "embed_dim", "adaptor_hidden", "batch_size")}
    table = commands.run_ablation(tmp_path, max_steps=1, log=lambda _: None, branches=True, **over)
    rows = [line.split("|")[1].strip() for line in table.splitlines()[2:] if line.startswith("|")]
    assert rows == ["PixCLIP", "+ parts"] and "part M2T R@1" in table.splitlines()[0]
    results = json.loads((tmp_path / "ablation.json").read_text())
    assert 0 <= results["+ parts"]["part_m2t_r1"] <= 1


def _with_parts(pipeline_out, tmp_path):
    """A copy of the pipeline output whose regions each have two parts (their mask's halves): one
    verified, one not judged."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    from annotate.data.masks import decode_rle
    from annotate.data.records import arrow_schema, image_record_to_row, row_to_image_record

    out = tmp_path / "out"
    shutil.copytree(pipeline_out, out)
    (file,) = list((out / "data").glob("*.parquet"))
    records = [row_to_image_record(r) for r in pq.read_table(file).to_pylist()]
    for record in records:
        for region in record.regions:
            if region.mask is None:
                continue
            mask = decode_rle(region.mask)
            rows = np.flatnonzero(mask.any(axis=1))
            cut = (rows[0] + rows[-1] + 1) // 2
            top, bottom = mask.copy(), mask.copy()
            top[cut:], bottom[:cut] = False, False
            region.parts = [
                PartRecord(part_id=f"{region.region_id}:p{i}", name=name, visibility="full", bbox=[0, 0, 1, 1],
                           mask=encode_rle(m), kept=True, short_caption=f"the {name} of {region.phrase}",
                           long_caption=f"the {name} half of the {region.phrase} in the photo",
                           verdict=Verdict(holds=True, reason="yes") if i == 0 else None)
                for i, (name, m) in enumerate((("top", top), ("bottom", bottom)))]
    pq.write_table(pa.Table.from_pylist([image_record_to_row(r) for r in records], schema=arrow_schema()), file)
    return out


def test_pipeline_parts_reach_the_text_cache_and_the_loader(pipeline_out, tiny_train_cfg, tmp_path):
    from annotate.train.data import RegionDataset
    from annotate.train.text_cache import iter_region_texts, write_text_cache

    out = _with_parts(pipeline_out, tmp_path)
    labels = [label for label, _ in iter_region_texts(out, parts=True)]
    assert any(label.startswith("part_short:") and label.endswith(":p0") for label in labels)
    assert not any(label.endswith(":p1") for label in labels)  # unverified: not embedded by default
    assert any(label.endswith(":p1") for label, _ in iter_region_texts(out, parts=True, unverified_parts=True))
    assert not any(label.startswith("part_") for label, _ in iter_region_texts(out))
    cache = write_text_cache(iter_region_texts(out, parts=True), lambda b: np.stack([np.full(6, len(t), np.float32) for t in b]),
                             tmp_path / "cache")
    cfg = tiny_train_cfg.model_copy(update={"use_parts": True, "eval_fraction": 0.0, "full_image_ratio": 0.0})
    ds = RegionDataset(out, cache, cfg, "train")
    assert all(len(ref.parts) == 1 and ref.parts[0].part_id.endswith(":p0") for ref in ds.refs)
    batch = collate_parts([ds[i] for i in range(3)])
    assert batch["part_mask"].shape == (3, 1, cfg.image_size, cfg.image_size) and batch["part_index"].tolist() == [0, 1, 2]
    assert batch["part_text_mask"].all()
    assert "part_mask" not in RegionDataset(out, cache, cfg.model_copy(update={"eval_fraction": 0.99}), "eval")[0]
