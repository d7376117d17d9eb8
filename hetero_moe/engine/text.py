"""Token ids to text while generating: incremental detokenization and stop strings.

Both do a bounded amount of work per token, however long the text grows: the detokenizer decodes only
the last few tokens, and the stop matcher (Aho-Corasick) looks at each new character once, whatever
the number and length of the stop strings.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

CONTEXT_TOKENS = 6  # prompt tokens decoded in front, so tokenizers that strip a leading space do not
MAX_HELD_TOKENS = 8  # tokens held back waiting for a UTF-8 sequence to complete (4 bytes at most), at most


class Detokenizer:
    """Decodes generated tokens into text deltas, holding back incomplete UTF-8 sequences. It keeps only
    the tokens of the last delta (the context the next one is decoded after) and those held back."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_ids: list[int], skip_special: bool = True) -> None:
        self.tokenizer, self.skip_special = tokenizer, skip_special
        self.ids = list(prompt_ids[-CONTEXT_TOKENS:])
        self.read = len(self.ids)  # ids[:read] decode to text already returned; ids[read:] are held back

    def add(self, token_id: int) -> str:
        """The new text `token_id` completes; "" while it ends inside a multi-byte character (for at most
        `MAX_HELD_TOKENS` tokens: a sequence that never forms valid UTF-8 is let through as it decodes)."""
        self.ids.append(token_id)
        before = self._decode(self.ids[: self.read])
        after = self._decode(self.ids)
        complete = len(after) > len(before) and not after.endswith("\ufffd")
        if not complete and len(self.ids) - self.read < MAX_HELD_TOKENS:
            return ""
        del self.ids[: self.read]
        self.read = len(self.ids)
        return after[len(before) :]

    def flush(self) -> str:
        """The text of the tokens held back (an incomplete character decodes as U+FFFD): the last delta."""
        before = self._decode(self.ids[: self.read])
        after = self._decode(self.ids)
        del self.ids[: self.read]
        self.read = len(self.ids)
        return after[len(before) :]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special, clean_up_tokenization_spaces=False)


class StopMatcher:
    """Finds the first stop string in text fed piece by piece, and holds back only the text that may
    still become the start of one. Aho-Corasick: each character fed costs O(1) amortised, independent
    of the number and length of the stop strings; at a position where several stop strings end, the
    longest wins. What is held back is at most the longest stop string."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self._next: list[dict[str, int]] = [{}]  # the trie: state -> character -> state
        self._depth = [0]  # length of the prefix a state stands for
        self._ends = [0]  # length of the longest stop string ending at this state, 0 for none
        self.matched: str | None = None  # the stop string found
        for stop in stops:
            state = 0
            for ch in stop:
                if ch not in self._next[state]:
                    self._next.append({})
                    self._depth.append(self._depth[state] + 1)
                    self._ends.append(0)
                    self._next[state][ch] = len(self._next) - 1
                state = self._next[state][ch]
            self._ends[state] = len(stop)
        self._fail = [0] * len(self._next)  # the longest proper suffix that is also a state
        frontier = list(self._next[0].values())
        while frontier:  # breadth first, so a state's suffix link is known before its children's
            children = []
            for state in frontier:
                for ch, child in self._next[state].items():
                    link = self._fail[state]
                    while link and ch not in self._next[link]:
                        link = self._fail[link]
                    target = self._next[link].get(ch, 0)
                    self._fail[child] = target if target != child else 0
                    self._ends[child] = self._ends[child] or self._ends[self._fail[child]]
                    children.append(child)
            frontier = children
        self._state = 0
        self._held = ""  # text fed but not released: the last `_depth[_state]` characters

    def feed(self, text: str) -> tuple[str, bool]:
        """New text -> (the text now safe to release, whether a stop string ended in it). On a stop,
        the released text ends where the stop string begins, and the matcher is done."""
        if not self.stops:
            return text, False
        state, nxt, fail, ends = self._state, self._next, self._fail, self._ends
        for i, ch in enumerate(text):
            while state and ch not in nxt[state]:
                state = fail[state]
            state = nxt[state].get(ch, 0)
            if ends[state]:
                seen = self._held + text[: i + 1]
                self.matched = seen[len(seen) - ends[state] :]
                self._state, self._held = 0, ""
                return seen[: len(seen) - ends[state]], True
        self._state = state
        seen = self._held + text
        keep = self._depth[state]
        self._held = seen[len(seen) - keep :] if keep else ""
        return seen[: len(seen) - keep], False

    @property
    def held(self) -> int:
        """Characters fed but not yet released (at most the longest stop string)."""
        return len(self._held)

    def flush(self) -> str:
        """The text held back; at the end of generation it can no longer become a stop string."""
        held, self._held, self._state = self._held, "", 0
        return held
