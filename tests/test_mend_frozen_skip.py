"""The frozen benchmark's mask sources to skip (train/frozen.DEFAULT_SKIP) are a copy of the trainer's
default (TrainConfig.skip_mask_sources), made on purpose: a frozen split must not move when the config's
default does. They must still agree today, so that a change to either one is a decision, not a drift."""

from __future__ import annotations

from annotate.config import TrainConfig
from annotate.train.frozen import DEFAULT_SKIP


def test_the_frozen_skip_list_is_the_trainers_default_today():
    default = TrainConfig.model_fields["skip_mask_sources"].get_default(call_default_factory=True)
    assert set(DEFAULT_SKIP) == set(default), (
        "TrainConfig.skip_mask_sources' default and train/frozen.DEFAULT_SKIP differ: changing the frozen one "
        "moves every benchmark split (refreeze and retrain); changing only the config's needs this test updated "
        "to say the two now differ on purpose")
