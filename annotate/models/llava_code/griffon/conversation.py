"""LLaVA-style conversation templates: `conv_templates[name].copy()`, `append_message`, `get_prompt`."""

from __future__ import annotations

import dataclasses
from enum import Enum, auto


class SeparatorStyle(Enum):
    SINGLE = auto()
    TWO = auto()
    GEMMA = auto()


@dataclasses.dataclass
class Conversation:
    system: str
    roles: tuple[str, str]
    messages: list
    offset: int
    sep_style: SeparatorStyle = SeparatorStyle.SINGLE
    sep: str = "###"
    sep2: str | None = None
    version: str = "Unknown"

    def append_message(self, role: str, message: str | None) -> None:
        self.messages.append([role, message])

    def get_prompt(self) -> str:
        if self.sep_style == SeparatorStyle.GEMMA:
            out = self.system
            for role, message in self.messages:
                out += role + (message + self.sep if message else "")
            return out
        out = self.system + self.sep
        for role, message in self.messages:
            out += role + (": " + message + self.sep if message else ":")
        return out

    def copy(self) -> "Conversation":
        return dataclasses.replace(self, messages=[list(m) for m in self.messages])


# As Griffon's griffon/conversation.py: every message, the model's included, ends with "<end_of_turn>\n",
# and its inference (griffon/eval/run_griffon.py) stops on that separator.
conv_gemma_instruct = Conversation(
    system="", roles=("<start_of_turn>user\n", "<start_of_turn>model\n"), messages=[], offset=0,
    sep_style=SeparatorStyle.GEMMA, sep="<end_of_turn>\n", version="gemma")

conv_templates = {"gemma_instruct": conv_gemma_instruct}
