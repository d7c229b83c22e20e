"""llava/conversation.py's `llava_v1` template (SeparatorStyle.TWO): system, then "ROLE: message" turns joined by
a space, each assistant turn closed by </s>; an open assistant turn ends the prompt with "ASSISTANT:"."""
import copy
from dataclasses import dataclass, field


@dataclass
class Conversation:
    system: str
    roles: tuple
    messages: list = field(default_factory=list)
    sep: str = " "
    sep2: str = "</s>"

    def append_message(self, role, message):
        self.messages.append([role, message])

    def get_prompt(self) -> str:
        out, seps = self.system + self.sep, (self.sep, self.sep2)
        for i, (role, message) in enumerate(self.messages):
            out += f"{role}: {message}{seps[i % 2]}" if message else f"{role}:"
        return out

    def copy(self):
        return copy.deepcopy(self)


conv_templates = {"llava_v1": Conversation(
    system="A chat between a curious human and an artificial intelligence assistant. "
           "The assistant gives helpful, detailed, and polite answers to the human's questions.",
    roles=("USER", "ASSISTANT"))}
