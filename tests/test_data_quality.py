"""Quality measures of descriptions (data/quality.py): format flags, nouns without support, near duplicates."""

from __future__ import annotations

import random

import pytest

from annotate.data.quality import format_flags, head_noun, near_duplicate_clusters, singular, unsupported_noun_share

CLEAN = ("The object is a red ceramic mug with a chipped handle, standing on a wooden table to the left "
         "of a silver laptop.")


@pytest.mark.parametrize("text, flag", [
    ("A red mug.", "too_short"),
    (" ".join(["word"] * 40) + " " + CLEAN, "too_long"),
    ("a red mug and a red mug and a red mug on a table", "repetition"),
    ("mug " * 6 + "on a very old wooden table by the window", "repetition"),
    ("<think>hmm</think> " + CLEAN, "markup"),
    ("**The object** is a red ceramic mug with a chipped handle on a table.", "markup"),
    ("Fine-grained: " + CLEAN, "markup"),
    ('{"description": "a red mug on a wooden table next to a silver laptop"}', "markup"),
    ('The object is a "red mug on a wooden table next to a silver laptop.', "markup"),
])
def test_each_flag_fires_on_its_fault(text, flag):
    assert flag in format_flags(text, min_words=8, max_words=40)


def test_a_clean_description_has_no_flag():
    assert format_flags(CLEAN, min_words=8, max_words=40) == []


def test_head_nouns_are_singular():
    assert [singular(w) for w in ("mugs", "glass", "bus", "boxes", "berries", "leaves", "children", "cats")] == [
        "mug", "glass", "bus", "box", "berry", "leaf", "child", "cat"]
    assert head_noun("the two wooden Chairs") == "chair" and head_noun("42") == ""


def test_unsupported_noun_share_worked_example():
    nouns, share = unsupported_noun_share(["a red mug", "the wooden table", "two spoons"],
                                          ["a mug", "red ceramic mug on a table"])
    assert nouns == 3 and share == pytest.approx(1 / 3)  # spoon is supported by neither text
    assert unsupported_noun_share([], ["a mug"]) == (0, None)


def test_near_duplicates_cluster_by_smallest_id_whatever_the_order():
    near = CLEAN.replace("silver", "grey")
    other = "A brown dog runs across a green field chasing a yellow ball in the afternoon sun."
    items = [("r2", CLEAN), ("r1", near), ("r3", other)]
    assert near_duplicate_clusters(items) == {"r1": "r1", "r2": "r1", "r3": "r3"}
    shuffled = items[:]
    random.Random(1).shuffle(shuffled)
    assert near_duplicate_clusters(shuffled) == near_duplicate_clusters(items)
    assert near_duplicate_clusters([]) == {}


def test_near_duplicates_at_scale_find_every_planted_pair():
    rng = random.Random(0)
    vocab = "red blue mug table chair dog cat green small large wooden metal on near the a bowl lamp".split()
    base = [" ".join(rng.choice(vocab) for _ in range(24)) for _ in range(300)]
    items = [(f"a{i:04d}", t) for i, t in enumerate(base)]
    items += [(f"b{i:04d}", t.replace(t.split()[0], "zebra", 1)) for i, t in enumerate(base)]  # one word changed
    clusters = near_duplicate_clusters(items, threshold=0.7)
    assert all(clusters[f"b{i:04d}"] == clusters[f"a{i:04d}"] == f"a{i:04d}" for i in range(300))
    assert len(set(clusters.values())) == 300
