"""Converting the neutral message format into what each backend takes.

Neutral content parts: ``{"type": "text", "text": str}`` and ``{"type": "image", "image": PIL.Image}``.
Message content may also be a plain string. Anything else raises `InvalidMessageError`, which the
engines report as an ``invalid_input`` result for that request only.
"""

from __future__ import annotations

import base64
import io
from typing import Any

from PIL import Image


class InvalidMessageError(ValueError):
    """A request's messages are not in the neutral format."""


def _parts(message: dict[str, Any]) -> list[dict[str, Any]] | str:
    if not isinstance(message, dict) or "role" not in message:
        raise InvalidMessageError("each message must be a dict with a 'role'")
    content = message.get("content", "")
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidMessageError(f"message content must be a string or a list, not {type(content).__name__}")
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise InvalidMessageError("a text part needs a string 'text'")
        elif kind == "image":
            if not isinstance(part.get("image"), Image.Image):
                raise InvalidMessageError("an image part needs a PIL.Image under 'image'")
        else:
            raise InvalidMessageError(f"unsupported content part type {kind!r} (use 'text' or 'image')")
    return content


def _convert(messages: list[dict[str, Any]], image_part) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise InvalidMessageError("messages must be a non-empty list")
    out = []
    for message in messages:
        content = _parts(message)
        if not isinstance(content, str):
            content = [image_part(p["image"]) if p["type"] == "image" else dict(p) for p in content]
        out.append({**message, "content": content})
    return out


def _rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")


def to_vllm_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """vLLM `LLM.chat`: images as ``image_pil`` parts (handed to the processor as they are)."""
    return _convert(messages, lambda img: {"type": "image_pil", "image_pil": _rgb(img)})


def image_to_data_url(image: Image.Image, quality: int = 90) -> str:
    buf = io.BytesIO()
    _rgb(image).save(buf, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def to_openai_messages(messages: list[dict[str, Any]], jpeg_quality: int = 90) -> list[dict[str, Any]]:
    """OpenAI-compatible HTTP: images as JPEG ``data:`` URLs in ``image_url`` parts."""
    return _convert(
        messages,
        lambda img: {"type": "image_url", "image_url": {"url": image_to_data_url(img, jpeg_quality)}},
    )


def to_hf_messages(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[Image.Image]]:
    """transformers chat templates: ``{"type": "image"}`` placeholders plus the images, in order."""
    images: list[Image.Image] = []

    def take(img: Image.Image) -> dict[str, Any]:
        images.append(_rgb(img))
        return {"type": "image"}

    return _convert(messages, take), images
