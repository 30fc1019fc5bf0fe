"""Splitting a reasoning model's `<think>...</think>` block off its answer.

A reasoning model (`models.*.reasoning: true`, e.g. DeepSeek-R1) always reasons first. Chat templates
differ in who writes the opening tag: R1-distill templates end the generation prompt with
``<think>\\n``, so the output holds ``reasoning</think>answer`` with no opening tag; other models
write ``<think>`` themselves. Either way the answer starts only after ``</think>``: an output that
never closes the block, whether cut by ``max_tokens`` or stopped on an end token, is unfinished
reasoning and never an answer.
"""

from __future__ import annotations

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


def split_reasoning(text: str) -> tuple[str | None, str, str | None]:
    """Split a reasoning model's raw output into ``(reasoning, answer, error)``.

    * ``<think>R</think>A`` or ``R</think>A`` -> ``(R, A, None)``.
    * No ``</think>`` -> ``(R, "", error)``: the reasoning never ended, whatever the tags before it.
    * An answer that itself holds a reasoning tag (a second block) -> ``(R, "", error)``: what the
      model meant as the answer cannot be told apart.

    Reasoning and answer are stripped of surrounding whitespace.
    """
    head, sep, tail = text.partition(THINK_CLOSE)
    reasoning = head.strip()
    if reasoning.startswith(THINK_OPEN):
        reasoning = reasoning[len(THINK_OPEN):].strip()
    if not sep:
        return reasoning, "", f"the output never closed the reasoning block (no {THINK_CLOSE})"
    return check_answer(reasoning, tail.strip())


def check_answer(reasoning: str | None, answer: str) -> tuple[str | None, str, str | None]:
    """An answer (split here or by a server's reasoning parser) is unusable when it is empty, since
    a parser puts an unclosed block wholly into the reasoning, or when it still holds a tag."""
    if THINK_OPEN in answer or THINK_CLOSE in answer:
        return reasoning, "", "the answer after the reasoning block holds another reasoning tag"
    if not answer:
        return reasoning, "", "no answer after the reasoning block"
    return reasoning, answer, None
