"""Splitting a reasoning model's `<think>...</think>` block off its answer."""

from __future__ import annotations

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


def split_reasoning(text: str) -> tuple[str | None, str, str | None]:
    """Split `text` into ``(reasoning, answer, error)``.

    * ``<think>R</think>A`` -> ``(R, A, None)``; so is ``R</think>A`` (the opening tag was part of
      the prompt, as chat templates of several reasoning models do).
    * An opening ``<think>`` never closed -> ``(R, "", error)``: the output was cut inside the
      reasoning, and the reasoning is never passed off as an answer.
    * No tags at all -> ``(None, text, None)``: the model answered without reasoning. (When the
      opening tag was in the prompt and the output was cut by ``max_tokens`` before any tag, the
      engine sees ``finish_reason == "length"`` and reports ``reasoning_cut`` itself.)

    Reasoning and answer are stripped of surrounding whitespace.
    """
    head, sep, tail = text.partition(THINK_CLOSE)
    if sep:
        reasoning = head.strip()
        if reasoning.startswith(THINK_OPEN):
            reasoning = reasoning[len(THINK_OPEN):].strip()
        return reasoning, tail.strip(), None
    if THINK_OPEN in text:
        _, _, reasoning = text.partition(THINK_OPEN)
        return reasoning.strip(), "", f"output ended inside the reasoning block (no {THINK_CLOSE})"
    return None, text.strip(), None
