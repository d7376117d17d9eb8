"""Reasoning parsers: split a reasoning model's output into `reasoning_content` and `content`."""

from __future__ import annotations

OPEN, CLOSE = "<think>", "</think>"


class DeepseekR1Parser:
    """DeepSeek-R1: reasoning inside `<think>...</think>`, the answer after it. R1's chat template
    ends the prompt with `<think>`, so the output may start inside the reasoning without the tag."""

    def __init__(self, prompt_text_end: str) -> None:
        self.reasoning = prompt_text_end.rstrip().endswith(OPEN)
        self.started = False  # whether any non-space output has been seen
        self.pending = ""  # text that may be the start of a tag

    def feed(self, text: str) -> tuple[str, str]:
        """New output text -> (reasoning delta, content delta)."""
        text = self.pending + text
        self.pending = ""
        reasoning, content = [], []
        while text:
            if not self.started:
                stripped = text.lstrip()
                if not stripped:
                    (reasoning if self.reasoning else content).append(text)
                    return "".join(reasoning), "".join(content)
                if OPEN.startswith(stripped) and len(stripped) < len(OPEN):
                    self.pending = text
                    break
                self.started = True
                if stripped.startswith(OPEN):
                    self.reasoning, text = True, stripped[len(OPEN) :]
                    continue
            if not self.reasoning:
                content.append(text)
                break
            end = text.find(CLOSE)
            if end >= 0:
                reasoning.append(text[:end])
                self.reasoning, text = False, text[end + len(CLOSE) :]
                continue
            keep = _partial_suffix(text, CLOSE)
            reasoning.append(text[: len(text) - keep])
            self.pending = text[len(text) - keep :]
            break
        return "".join(reasoning), "".join(content)

    def flush(self) -> tuple[str, str]:
        """At the end of the output: whatever was held back."""
        text, self.pending = self.pending, ""
        return (text, "") if self.reasoning else ("", text)


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


REASONING_PARSERS = {"deepseek-r1": DeepseekR1Parser}
