"""Text ↔ token ids, incremental detokenization and stop strings."""

from pathlib import Path

from tokenizers import Tokenizer as BackendTokenizer
from tokenizers.decoders import DecodeStream


class Tokenizer:
    """A fast tokenizer loaded from a directory (tokenizer.json + tokenizer_config.json)."""

    def __init__(self, path: Path) -> None:
        from transformers import AutoTokenizer

        self._hf = AutoTokenizer.from_pretrained(str(path))
        self.backend: BackendTokenizer = self._hf.backend_tokenizer
        self.special_token_ids = frozenset(self._hf.all_special_ids)

    @property
    def eos_token_id(self) -> int | None:
        token_id = self._hf.eos_token_id
        return int(token_id) if token_id is not None else None

    @property
    def bos_token(self) -> str:
        """The BOS token's text ('' when there is none), as chat templates use it."""
        token = self._hf.bos_token
        return token if isinstance(token, str) else ""

    @property
    def eos_token(self) -> str:
        token = self._hf.eos_token
        return token if isinstance(token, str) else ""

    @property
    def vocab_size(self) -> int:
        return len(self._hf)

    @property
    def chat_template(self) -> str | None:
        template = getattr(self._hf, "chat_template", None)
        return template if isinstance(template, str) else None

    def token_id(self, token: str) -> int | None:
        """The id of a token given by its exact text (e.g. "<end_of_turn>"), if it has one."""
        token_id = self._hf.convert_tokens_to_ids(token)
        unknown = self._hf.unk_token_id
        return token_id if isinstance(token_id, int) and token_id != unknown else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids: list[int] = self._hf.encode(text, add_special_tokens=add_special_tokens)
        return ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        text = self._hf.decode(token_ids, skip_special_tokens=skip_special_tokens)
        assert isinstance(text, str)
        return text

    def token_text(self, token_id: int) -> str:
        """The text one token stands for on its own (for logprob listings)."""
        return self.decode([token_id], skip_special_tokens=False)


# Tokens before the first new one that the fallback decodes with it, for context (a leading
# space, a pending byte token).
FALLBACK_CONTEXT = 6


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas.

    A character spread over several byte tokens comes out whole, in the delta of the token
    that completes it, never split across deltas.

    tokenizers' DecodeStream raises when the text of the ids so far is not a prefix of the
    text with one more id, which byte tokens that form no valid UTF-8 followed by another
    token cause (a sampled model can emit any sequence). From then on the request's text
    comes from decoding a short window instead: the ids since the last delta plus a few
    before them, whose own text is cut off the front.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._backend = tokenizer.backend
        self._stream: DecodeStream | None = DecodeStream(skip_special_tokens=True)
        self._ids: list[int] = []  # the last ids (all since the last delta, a few before)
        self._shown = 0  # of _ids, those whose text has been returned (fallback only)

    def add(self, token_id: int) -> str:
        self._ids.append(token_id)
        if self._stream is not None:
            try:
                delta = self._stream.step(self._backend, token_id) or ""
            except Exception:  # tokenizers raises a bare Exception for this
                self._stream = None
                self._shown = len(self._ids) - 1
            else:
                del self._ids[:-FALLBACK_CONTEXT]  # only what a fallback window would read
                return delta
        return self._window_delta()

    def _window_delta(self) -> str:
        start = max(0, self._shown - FALLBACK_CONTEXT)
        before = self._tokenizer.decode(self._ids[start : self._shown])
        text = self._tokenizer.decode(self._ids[start:])
        # An incomplete multi-byte character decodes to U+FFFD: wait for its other bytes.
        if len(text) <= len(before) or text.endswith("\ufffd"):
            return ""
        self._shown = len(self._ids)
        # The ids no later window reads go, so a long reply keeps a bounded list.
        unread = max(0, self._shown - FALLBACK_CONTEXT)
        del self._ids[:unread]
        self._shown -= unread
        return text[len(before) :]


class StopStringMatcher:
    """Accumulates output text, cuts it at the first stop string, and holds back a tail that
    could still grow into one, so a streamed client never sees part of a stop string."""

    def __init__(self, stop: tuple[str, ...], include_stop: bool = False) -> None:
        self.stop = stop
        self.include_stop = include_stop
        self.text = ""
        self._emitted = 0
        self.stopped = False

    def add(self, delta: str) -> str:
        """Append a delta; return the text that is now safe to show."""
        if self.stopped:
            return ""
        longest = max((len(s) for s in self.stop), default=1)
        search_from = max(0, len(self.text) - longest + 1)
        self.text += delta
        cut = self._find_stop(search_from)
        if cut is not None:
            self.text = self.text[:cut]
            self.stopped = True
            return self._release(len(self.text))
        return self._release(len(self.text) - self._partial_match_length())

    def flush(self) -> str:
        """The held-back tail, once generation has ended."""
        return self._release(len(self.text))

    def _find_stop(self, start: int) -> int | None:
        best: int | None = None
        for s in self.stop:
            index = self.text.find(s, start)
            if index >= 0:
                end = index + len(s) if self.include_stop else index
                best = end if best is None else min(best, end)
        return best

    def _partial_match_length(self) -> int:
        """Length of the longest tail of the text that begins some stop string."""
        best = 0
        for s in self.stop:
            for size in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:size]):
                    best = size
                    break
        return best

    def _release(self, upto: int) -> str:
        if upto <= self._emitted:
            return ""
        piece = self.text[self._emitted : upto]
        self._emitted = upto
        return piece
