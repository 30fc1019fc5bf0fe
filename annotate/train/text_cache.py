"""Frozen-text-encoder features, computed once and memory-mapped, so the LLM never runs in training.

Layout of a cache folder (format 2):
  embeddings.f16  float16 matrix (count, dim), row i for keys[i], each row L2-normalised  (np.memmap)
  keys.json       {"keys": [...], "key": "sha1(text)", "format": 2, "rows": "l2-normalized", "dim": D, ...}
Rows are stored as the adaptor reads them: LLM2CLIP's `TextProj` L2-normalises the LLM2Vec vector
before its adaptor (microsoft/LLM2CLIP `llm2clip/eva_clip/model.py`, `l2_norm=True`), and so does
`PixCLIP.encode_text`. Format-1 caches held the raw pooled mean under the same layout; the stored form
was therefore ambiguous, and they are refused (rebuild with `annotate embed-text`).
The cache is keyed by the text itself (the SHA-1 of its UTF-8 bytes), never by a region id: a
pipeline re-run with new captions looks up the new texts, which are either in the cache or missing
(the region is then skipped), so features of an old caption can never be paired with a new region.
Identical texts are stored and encoded once.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from annotate.data.records import is_trainable, is_trainable_part
from annotate.data.store import OutputStore, read_columns

EMB_FILE = "embeddings.f16"
KEYS_FILE = "keys.json"
KEY_KIND = "sha1(text)"
FORMAT = 2  # 2: rows L2-normalised; 1 (no "format" key): raw pooled features
ROWS = "l2-normalized"
REGION_KINDS = ("fine", "object", "phrase")


def text_key(kind: str, ident: str) -> str:
    """Label of a text in `iter_region_texts` (kind and region id / image key); not a cache key."""
    return f"{kind}:{ident}"


def text_hash(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


class TextCache:
    """Read side: text -> float32 vector, backed by a read-only memmap (opened lazily, per process)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta = json.loads((self.path / KEYS_FILE).read_text())
        if meta.get("key") != KEY_KIND:
            raise ValueError(f"{self.path} is a region-keyed text cache from an older version: rebuild it with `annotate embed-text`")
        if meta.get("format") != FORMAT or meta.get("rows") != ROWS:
            raise ValueError(f"{self.path} is a text cache of format {meta.get('format', 1)} (raw, unnormalised features); "
                             f"this version stores L2-normalised rows (format {FORMAT}): rebuild it with `annotate embed-text`")
        self.keys: list[str] = meta["keys"]
        self.dim: int = meta["dim"]
        self.meta = {k: v for k, v in meta.items() if k != "keys"}
        self.row = {k: i for i, k in enumerate(self.keys)}
        self._mm: np.memmap | None = None

    @property
    def matrix(self) -> np.memmap:
        if self._mm is None:
            self._mm = np.memmap(self.path / EMB_FILE, dtype=np.float16, mode="r", shape=(len(self.keys), self.dim))
        return self._mm

    def __contains__(self, text: str) -> bool:
        return text_hash(text) in self.row

    def __len__(self) -> int:
        return len(self.keys)

    def get(self, text: str) -> np.ndarray:
        return np.asarray(self.matrix[self.row[text_hash(text)]], dtype=np.float32)

    def __getstate__(self) -> dict:  # DataLoader workers re-open the memmap themselves
        return {**self.__dict__, "_mm": None}


def write_text_cache(
    entries: Iterable[str | tuple[str, str]],
    encode: Callable[[list[str]], np.ndarray],
    out: str | Path,
    batch_size: int = 64,
    meta: dict | None = None,
) -> TextCache:
    """Encode texts (or (label, text) pairs, as `iter_region_texts` yields) with `encode` (texts ->
    (n, D) array) into a cache folder keyed by text hash, one row per distinct text, L2-normalised in
    float32 before the cast to float16 (an all-zero row stays zero)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    unique = list(dict.fromkeys(e if isinstance(e, str) else e[1] for e in entries))
    mm = None
    dim = 0
    for i in range(0, len(unique), batch_size):
        vecs = np.asarray(encode(unique[i : i + batch_size]), dtype=np.float32)
        vecs = vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
        if mm is None:
            dim = vecs.shape[1]
            mm = np.memmap(out / EMB_FILE, dtype=np.float16, mode="w+", shape=(len(unique), dim))
        mm[i : i + len(vecs)] = vecs
    if mm is None:
        mm = np.memmap(out / EMB_FILE, dtype=np.float16, mode="w+", shape=(1, 1))
    mm.flush()
    del mm
    keys = [text_hash(t) for t in unique]
    (out / KEYS_FILE).write_text(json.dumps({"keys": keys, "key": KEY_KIND, "format": FORMAT, "rows": ROWS, "dim": int(dim),
                                                **(meta or {})}))
    return TextCache(out)


def iter_region_texts(data_dir: str | Path, summaries: bool = False, negatives: bool = False, parts: bool = False,
                      unverified_parts: bool = False) -> Iterator[tuple[str, str]]:
    """Every trainable text of a pipeline output (OUT/data/*.parquet), as (label, text); with
    `summaries` / `negatives`, also the regions' summaries and verified hard negatives (the texts of
    the short-text and hard-negative branches; K per region, so only when a branch needs them); with
    `parts`, the short and long texts of the trainable parts (`is_trainable_part`), labelled by part id."""

    for file in OutputStore(data_dir).dataset_files():
        for row in read_columns(file, ["image_key", "caption", "regions"]):
            usable = [r for r in row["regions"] or [] if is_trainable(r)]
            if usable and row.get("caption"):
                yield text_key("image", row["image_key"]), row["caption"]
            for r in usable:
                for kind, field in zip(REGION_KINDS, ("fine_caption", "object_caption", "phrase")):
                    if r.get(field):
                        yield text_key(kind, r["region_id"]), r[field]
                if summaries and r.get("summary"):
                    yield text_key("summary", r["region_id"]), r["summary"]
                for i, negative in enumerate((r.get("negatives") or []) if negatives else []):
                    yield text_key(f"negative{i}", r["region_id"]), negative["text"]
                for part in (r.get("parts") or []) if parts else []:
                    if is_trainable_part(part, unverified_parts):
                        for kind in ("short", "long"):
                            if part.get(f"{kind}_caption"):
                                yield text_key(f"part_{kind}", part["part_id"]), part[f"{kind}_caption"]


class HFTextEncoder:
    """Any local Hugging Face encoder/decoder dir as a frozen sentence encoder (LLM2Vec-style pooling)."""

    def __init__(self, path: str, pooling: str = "mean", max_length: int = 512, device: str | None = None):
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.torch = torch
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if self.tokenizer.pad_token is None:  # decoder-only LLMs ship without one
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "right"  # "last" pooling indexes the last real token
        dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        self.model = AutoModel.from_pretrained(path, dtype=dtype).to(self.device).eval()
        self.pooling, self.max_length = pooling, max_length

    def __call__(self, texts: list[str]) -> np.ndarray:
        torch = self.torch
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        batch = batch.to(self.device)
        with torch.inference_mode():
            hidden = self.model(**batch).last_hidden_state.float()
        attn = batch["attention_mask"].float()
        if self.pooling == "mean":
            pooled = (hidden * attn[..., None]).sum(1) / attn.sum(1, keepdim=True).clamp(min=1)
        elif self.pooling == "cls":
            pooled = hidden[:, 0]
        else:  # "last": the last non-padding token (right padding)
            pooled = hidden[torch.arange(len(texts)), attn.sum(1).long() - 1]
        return pooled.cpu().numpy()


def make_text_encoder(cfg):
    """The frozen text encoder of a `TrainConfig`: LLM2Vec (bidirectional Llama, LoRA merged, mean
    pooling over the text after `text_instruction`) or any local Hugging Face model."""
    if not cfg.text_encoder:
        raise ValueError("train.text_encoder is not set: give a local Hugging Face model dir")
    if cfg.text_encoder_type == "llm2vec":
        from annotate.train.llm2vec import LLM2VecEncoder

        return LLM2VecEncoder.from_pretrained(cfg.text_encoder, cfg.text_lora, instruction=cfg.text_instruction,
                                              template=cfg.text_template, max_length=cfg.text_max_length)
    return HFTextEncoder(cfg.text_encoder, cfg.text_pooling, cfg.text_max_length)


def embed_text(data_dir: str | Path, output: str | Path, cfg, batch_size: int = 32) -> TextCache:
    """`annotate embed-text`: encode all captions of a pipeline output with `cfg.text_encoder`."""
    if not cfg.text_encoder:
        raise ValueError("train.text_encoder is not set: give a local Hugging Face model dir")
    encoder = make_text_encoder(cfg)
    meta = {"encoder": str(cfg.text_encoder), "type": cfg.text_encoder_type, "pooling": cfg.text_pooling,
            "lora": list(cfg.text_lora), "instruction": cfg.text_instruction}
    texts = iter_region_texts(data_dir, summaries=cfg.use_short, negatives=cfg.use_hard_negatives,
                              parts=cfg.use_parts, unverified_parts=cfg.parts_include_unverified)
    return write_text_cache(texts, encoder, output, batch_size, meta)
