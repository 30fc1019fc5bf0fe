"""One definition of a trainable region (data/records.is_trainable), used by the trainer's dataset,
the text cache and `annotate score`: status "ok", a fine caption and a mask, and nothing else."""

from __future__ import annotations

import numpy as np
import pytest

from annotate.data.masks import encode_rle
from annotate.data.records import RegionRecord, is_trainable

MASK = encode_rle(np.eye(4, dtype=bool))


def _region(**changes) -> RegionRecord:
    fields = dict(region_id="r0", region_index=0, phrase="a dog", bbox=[0, 0, 4, 4], mask=MASK,
                  fine_caption="A brown dog lies on a red rug.", status="ok")
    return RegionRecord(**{**fields, **changes})


@pytest.mark.parametrize(("changes", "trainable"), [
    ({}, True),
    ({"status": "rejected"}, False),  # a caption the validator refused is not a training text
    ({"status": "failed", "error": "timeout"}, False),
    ({"status": "pending"}, False),
    ({"fine_caption": ""}, False),
    ({"fine_caption": None}, False),
    ({"mask": None}, False),
])
def test_trainable_region(changes, trainable):
    region = _region(**changes)
    assert is_trainable(region) is trainable
    assert is_trainable(region.model_dump()) is trainable  # as read back from Parquet: a dict


def test_a_mask_without_counts_is_not_trainable():
    row = _region().model_dump()
    row["mask"] = {"size": [4, 4], "counts": ""}
    assert not is_trainable(row)


def test_a_region_record_is_judged_by_its_fields_without_dumping_it(monkeypatch):
    """The text cache and the trainer ask for every region: a RegionRecord is read field by field, not dumped
    to a dict first."""
    def no_dump(self, *a, **k):
        raise AssertionError("RegionRecord.model_dump was called")

    monkeypatch.setattr(RegionRecord, "model_dump", no_dump)
    assert is_trainable(_region())
    assert not is_trainable(_region(mask=None)) and not is_trainable(_region(status="rejected"))
    assert not is_trainable(_region(mask={"size": [4, 4], "counts": ""}))  # an empty RLE is no mask
