"""LLM2Vec text encoder (LLM2CLIP's text side): a Llama-family decoder read with bidirectional attention.

LLM2CLIP encodes captions with LLM2Vec-Llama-3-8B: the decoder's causal mask is dropped (every token
attends to every non-padding token), the LoRA adapters trained for it (MNTP, then supervised
contrastive) are merged into the weights, and the embedding is the mean of the last hidden states over
the text's tokens, after an optional instruction prefix that is attended to but not pooled.

Why not the `llm2vec` package: its bidirectional models subclass the internals of transformers 4.4x
(`LlamaBiModel` re-implements the mask update) and do not run on the transformers 5 this project
pins. transformers 5 accepts a ready 4D attention mask and uses it as is, so a padding-only additive
mask plus `is_causal = False` on the attention modules gives the same bidirectional attention without
touching the model code. LoRA merging uses `peft` (`merge_and_unload`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

# LLM2Vec's prompt for Llama-3 Instruct checkpoints (its `prepare_for_tokenization`).
LLAMA3_TEMPLATE = "<|start_header_id|>user<|end_header_id|>\n\n{text}<|eot_id|>"


def make_bidirectional(model: torch.nn.Module) -> torch.nn.Module:
    """Flag every attention module non-causal (SDPA/flash kernels read `is_causal`)."""
    for module in model.modules():
        if hasattr(module, "is_causal"):
            module.is_causal = False
    return model


def padding_mask_4d(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, L) 1/0 -> additive (B, 1, L, L): every query sees every real key, no causal triangle."""
    keep = attention_mask[:, None, None, :].bool().expand(-1, 1, attention_mask.shape[1], -1)
    return torch.zeros(keep.shape, dtype=dtype, device=attention_mask.device).masked_fill(~keep, torch.finfo(dtype).min)


def merge_lora(model: torch.nn.Module, adapters: Sequence[str]) -> torch.nn.Module:
    """Merge LoRA adapter dirs (peft layout: adapter_config.json + weights) into the model, in order
    (LLM2Vec: the MNTP adapter first, then the supervised one on top of the merged model)."""
    if not adapters:
        return model
    from peft import PeftModel

    for path in adapters:
        model = PeftModel.from_pretrained(model, path).merge_and_unload()
    return model


class LLM2VecEncoder:
    """Frozen sentence encoder: texts -> (N, hidden) float32 mean-pooled bidirectional features."""

    def __init__(self, model, tokenizer, instruction: str = "", template: str = "{text}", max_length: int = 512,
                 device: str | None = None):
        self.device = device or next(model.parameters()).device.type
        self.model = make_bidirectional(model).to(self.device).eval()
        self.tokenizer, self.max_length = tokenizer, max_length
        self.head, _, self.tail = template.partition("{text}")
        self.instruction = instruction.strip()

    @classmethod
    def from_pretrained(cls, path: str, lora: Sequence[str] = (), device: str | None = None, **kwargs) -> "LLM2VecEncoder":
        from transformers import AutoModel, AutoTokenizer

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        model = merge_lora(AutoModel.from_pretrained(path, dtype=dtype), lora)
        return cls(model, AutoTokenizer.from_pretrained(path), device=device, **kwargs)

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """input_ids, attention_mask and embed_mask (1 on the text's own tokens, 0 on the instruction
        prefix and padding), right-padded."""
        prefix = self.head + (self.instruction + " " if self.instruction else "")
        pre = self.tokenizer(prefix, add_special_tokens=True)["input_ids"]  # BOS (if any) + prefix
        budget = max(self.max_length - len(pre), 1)
        rows = [(pre, self.tokenizer(t.strip() + self.tail, add_special_tokens=False)["input_ids"][:budget]) for t in texts]
        width = max(len(a) + len(b) for a, b in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attn, embed = torch.zeros_like(ids), torch.zeros_like(ids)
        for i, (a, b) in enumerate(rows):
            ids[i, : len(a) + len(b)] = torch.tensor(a + b)
            attn[i, : len(a) + len(b)] = 1
            embed[i, len(a) : len(a) + len(b)] = 1
        return {"input_ids": ids, "attention_mask": attn, "embed_mask": embed}

    @torch.inference_mode()
    def hidden_states(self, texts: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        batch = {k: v.to(self.device) for k, v in self.tokenize(texts).items()}
        dtype = next(self.model.parameters()).dtype
        mask = padding_mask_4d(batch["attention_mask"], dtype)
        out = self.model(input_ids=batch["input_ids"], attention_mask=mask)
        return out.last_hidden_state.float(), batch

    def __call__(self, texts: list[str]) -> np.ndarray:
        hidden, batch = self.hidden_states(texts)
        w = batch["embed_mask"].float()[..., None]
        return ((hidden * w).sum(1) / w.sum(1).clamp(min=1)).cpu().numpy()
