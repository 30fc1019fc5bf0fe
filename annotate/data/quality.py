"""Quality measures of a description, in code (no model): format flags, nouns that the region's
other texts do not support, and near-duplicate clusters. The data plane's part of the quality record
(stages/quality.py assembles it)."""

from __future__ import annotations

import hashlib
import re
from collections import Counter, defaultdict

import numpy as np

_WORDS = re.compile(r"[A-Za-z]+")
_MARKUP = (
    re.compile(r"</?[A-Za-z][^>]*>"),  # HTML/XML tags, <think> remnants
    re.compile(r"\*\*|__|`|^\s*#{1,6}\s|^\s*[-*\u2022]\s", re.M),  # markdown: bold, code, headings, bullets
    re.compile(r"[{}\[\]]"),  # JSON or list brackets
    re.compile(r"^\s*(fine-grained|description|object-level|context-level|summary|answer)\s*:", re.I),  # a label
)
# Plurals that are not `word + s`; words ending in s that are not plurals.
_IRREGULAR = {"men": "man", "women": "woman", "children": "child", "people": "person", "feet": "foot",
              "teeth": "tooth", "mice": "mouse", "geese": "goose", "leaves": "leaf", "knives": "knife",
              "shelves": "shelf", "wolves": "wolf", "loaves": "loaf", "halves": "half"}
_KEEP_S = ("ss", "us", "is", "ics", "ous")


def format_flags(text: str, min_words: int, max_words: int) -> list[str]:
    """Flags of a description's form: too_short / too_long (in words), repetition (a word 3-gram three
    times or more, or one word over a third of a text of 12+ words), markup (tags, markdown, brackets,
    a leftover label such as "Fine-grained:", an odd number of double quotes)."""
    words = text.split()
    flags = set()
    if len(words) < min_words:
        flags.add("too_short")
    if len(words) > max_words:
        flags.add("too_long")
    lowered = [w.lower().strip(".,;:!?\"'") for w in words]
    trigrams = Counter(zip(lowered, lowered[1:], lowered[2:]))
    if (trigrams and max(trigrams.values()) >= 3) or (
            len(lowered) >= 12 and max(Counter(lowered).values()) > len(lowered) / 3):
        flags.add("repetition")
    if any(p.search(text) for p in _MARKUP) or text.count('"') % 2:
        flags.add("markup")
    return sorted(flags)


def singular(word: str) -> str:
    """A crude singular of an English noun (enough to match "mugs" with "mug")."""
    word = word.lower()
    if word in _IRREGULAR:
        return _IRREGULAR[word]
    if len(word) <= 3 or word.endswith(_KEEP_S):
        return word
    if word.endswith("ies"):
        return word[:-3] + "y"
    if word.endswith(("ches", "shes", "xes", "zes", "sses")):
        return word[:-2]
    return word[:-1] if word.endswith("s") else word


def head_noun(phrase: str) -> str:
    """The last word of a noun phrase, singular and lower-case ("" when it has none)."""
    words = _WORDS.findall(phrase)
    return singular(words[-1]) if words else ""


def unsupported_noun_share(phrases: list[str], support_texts: list[str]) -> tuple[int, float | None]:
    """(head nouns of the phrases, share of them found in none of the support texts); None with no nouns."""
    nouns = [n for n in (head_noun(p) for p in phrases) if n]
    if not nouns:
        return 0, None
    support = {singular(w) for text in support_texts for w in _WORDS.findall(text)}
    return len(nouns), sum(n not in support for n in nouns) / len(nouns)


def _shingles(text: str) -> set[str]:
    words = [w.lower() for w in _WORDS.findall(text)]
    return {" ".join(words[i:i + 3]) for i in range(len(words) - 2)} if len(words) >= 3 else {" ".join(words)}


def _stable_hash(shingle: str) -> int:
    return int.from_bytes(hashlib.blake2b(shingle.encode(), digest_size=8).digest(), "little")


def _jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def near_duplicate_clusters(items: list[tuple[str, str]], threshold: float = 0.7, num_perm: int = 64,
                            seed: int = 0) -> dict[str, str]:
    """region_id -> cluster id for (region_id, text) items: clusters are connected components of pairs
    whose word 3-gram Jaccard similarity is at least `threshold`; the cluster id is the smallest
    region_id of its component, so the result does not depend on the order of `items`.

    Candidate pairs come from MinHash with LSH banding, and each is confirmed with the exact Jaccard.
    Written here rather than taken from `datasketch` (not in the lock file): it is forty lines of
    numpy, and the exact confirmation and the order-independent ids would be ours anyway."""
    if not items:
        return {}
    ids = [rid for rid, _ in items]
    sets = [_shingles(text) for _, text in items]
    rng = np.random.default_rng(seed)
    prime = np.uint64((1 << 61) - 1)
    a = rng.integers(1, 1 << 61, num_perm, dtype=np.uint64)
    b = rng.integers(0, 1 << 61, num_perm, dtype=np.uint64)
    # Rows per band: the most (fewest false candidates) that still find a pair at the threshold with
    # probability 0.99 or more.
    rows = next((r for r in range(8, 0, -1) if 1 - (1 - threshold ** r) ** (num_perm // r) >= 0.99), 1)
    bands = num_perm // rows
    parent = list(range(len(items)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    buckets: dict[tuple, list[int]] = defaultdict(list)
    for index, shingles in enumerate(sets):
        hashes = np.array([_stable_hash(s) for s in shingles], dtype=np.uint64) % prime
        with np.errstate(over="ignore"):  # the universal hash wraps around on purpose
            signature = ((np.outer(hashes, a) + b) % prime).min(axis=0)
        for band in range(bands):
            buckets[(band, signature[band * rows:(band + 1) * rows].tobytes())].append(index)
    for members in buckets.values():
        # Each member is compared with one member of each component already met in the bucket, not
        # with every member: a bucket of many copies of one template costs linear time, not quadratic.
        representatives: list[int] = []
        for index in members:
            for rep in representatives:
                if find(rep) == find(index) or _jaccard(sets[rep], sets[index]) >= threshold:
                    parent[find(index)] = find(rep)
                    break
            else:
                representatives.append(index)
    groups: dict[int, list[str]] = defaultdict(list)
    for index, rid in enumerate(ids):
        groups[find(index)].append(rid)
    return {rid: min(members) for members in groups.values() for rid in members}
