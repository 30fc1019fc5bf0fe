"""`tokenizer_image_token`: the prompt's `<image>` markers become IMAGE_TOKEN_INDEX placeholders."""

from __future__ import annotations

from griffon.constants import IMAGE_TOKEN_INDEX


def tokenizer_image_token(prompt, tokenizer, image_token_index=IMAGE_TOKEN_INDEX, return_tensors=None):
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]
    input_ids: list[int] = []
    offset = 0
    if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        input_ids.append(chunks[0][0])
    for i, chunk in enumerate(chunks):
        if i:
            input_ids.append(image_token_index)
        input_ids.extend(chunk[offset:])
    if return_tensors == "pt":
        import torch

        return torch.tensor(input_ids, dtype=torch.long)
    if return_tensors is not None:
        raise ValueError(f"Unsupported tensor type: {return_tensors}")
    return input_ids
