"""GLM chat formatting, incremental detokenization and the thinking / answer split (tokenizers only).

The prompt layout is the GLM checkpoints' chat template for one user turn::

    [gMASK]<sop>[<|system|>\\n{system}]<|user|>\\n{<|begin_of_image|><|image|>×n<|end_of_image|> per image}[video]{text}<|assistant|>\\n

A video renders as the GLM-4V processor expands the template's ``<|begin_of_video|><|video|><|end_of_video|>``:
``<|begin_of_video|>`` then, per temporal patch (two frames), ``<|begin_of_image|><|image|>×n<|end_of_image|>`` and
its timestamp in whole seconds as text (``str(int(t))``), then ``<|end_of_video|>``.

Special tokens are inserted by id (from the manifest); every piece of user text is encoded with
``encode_special_tokens = True``, so a user writing ``<|image|>`` gets the characters, never the token.
Adjacent text pieces are encoded together, as the template renders them into one string between specials.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from .errors import InputError
from .manifest import ManifestError

__all__ = ["ChatFormat", "IncrementalDecoder", "split_thinking", "REQUIRED_SPECIALS"]

REQUIRED_SPECIALS = ("[gMASK]", "<sop>", "<|user|>", "<|assistant|>")
IMAGE_SPECIALS = ("<|begin_of_image|>", "<|image|>", "<|end_of_image|>")
VIDEO_SPECIALS = ("<|begin_of_video|>", "<|end_of_video|>")


class ChatFormat:
    """Builds GLM prompt ids and decodes generated ids with one ``tokenizers.Tokenizer``.

    tokenizer: a ``tokenizers.Tokenizer`` (used as given for decoding; a private copy encodes user text with
    special-token parsing off). special_tokens: {token string: id}, e.g. the manifest's.
    """

    def __init__(self, tokenizer, special_tokens: Mapping[str, int]):
        from tokenizers import Tokenizer

        self.tokenizer = tokenizer
        # A private copy, so that switching special-token parsing off never leaks into the caller's tokenizer.
        self._plain = Tokenizer.from_str(tokenizer.to_str())
        self._plain.encode_special_tokens = True
        self.special_tokens = {str(k): int(v) for k, v in special_tokens.items()}
        missing = [t for t in REQUIRED_SPECIALS if t not in self.special_tokens]
        if missing:
            raise ManifestError(f"the manifest's special_tokens lack {missing}, which the GLM chat format needs; "
                                "re-export the folder")

    @classmethod
    def from_file(cls, path, special_tokens: Mapping[str, int]) -> ChatFormat:
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(path)), special_tokens)

    # ------------------------------------------------------------------ encoding
    def encode_text(self, text: str) -> list[int]:
        """Plain text -> ids; special-token strings in ``text`` are tokenized as ordinary characters."""
        _check_text("prompt text", text)
        if not text:
            return []
        return list(self._plain.encode(text, add_special_tokens=False).ids)

    def _special(self, token: str) -> int:
        try:
            return self.special_tokens[token]
        except KeyError:
            raise ManifestError(f"the manifest's special_tokens lack {token!r}; re-export the folder") from None

    def prompt_ids(self, text: str, image_token_counts: Sequence[int] = (), system: str | None = None,
                   video: tuple[int, Sequence[float]] | None = None) -> list[int]:
        """The ids of one user turn with ``len(image_token_counts)`` images (each ``n`` placeholder tokens) and
        optionally a video before ``text``, ending with ``<|assistant|>\\n`` (the model's turn).

        video: (placeholder tokens per temporal patch, one timestamp in seconds per temporal patch), as
        ``glmtrt.runtime.preprocess.preprocess_video`` gives them (grid h * w / merge**2, its timestamps)."""
        _check_text("prompt", text)
        if system is not None:
            _check_text("system prompt", system)
        parts: list[str | int] = [self._special("[gMASK]"), self._special("<sop>")]
        if system is not None:
            parts += [self._special("<|system|>"), "\n" + system]
        parts += [self._special("<|user|>"), "\n"]
        if image_token_counts:
            begin, image, end = (self._special(t) for t in IMAGE_SPECIALS)
            for n in image_token_counts:
                if int(n) < 1:
                    raise InputError(f"an image needs at least one placeholder token, got {n}")
                parts += [begin] + [image] * int(n) + [end]
        if video is not None:
            n, stamps = video
            if int(n) < 1 or not len(stamps):
                raise InputError(f"a video needs at least one frame of at least one placeholder token, got {len(stamps)} "
                                 f"frames of {n}")
            begin, image, end = (self._special(t) for t in IMAGE_SPECIALS)
            parts.append(self._special(VIDEO_SPECIALS[0]))
            for stamp in stamps:
                parts += [begin] + [image] * int(n) + [end, str(int(stamp))]
            parts.append(self._special(VIDEO_SPECIALS[1]))
        parts += [text, self._special("<|assistant|>"), "\n"]
        ids: list[int] = []
        pending = ""
        for part in parts:
            if isinstance(part, str):
                pending += part
                continue
            ids += self.encode_text(pending)
            pending = ""
            ids.append(part)
        return ids + self.encode_text(pending)

    # ------------------------------------------------------------------ decoding
    def decode(self, ids: Sequence[int]) -> str:
        """Ids -> text, special tokens kept (``<think>`` etc. carry meaning; EOS ids are cut off by the caller)."""
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


def _check_text(what: str, text) -> None:
    """User text must be a str of valid Unicode (no lone surrogates, which is what invalid UTF-8 bytes become when
    decoded with ``surrogateescape``, e.g. in ``sys.argv``); raises InputError saying what to pass instead."""
    if isinstance(text, (bytes, bytearray)):
        raise InputError(f"the {what} must be a str, got {type(text).__name__}; decode it first, e.g. "
                         "data.decode('utf-8')")
    if not isinstance(text, str):
        raise InputError(f"the {what} must be a str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(f"the {what} is not valid UTF-8 text (an undecodable byte or lone surrogate at character "
                         f"{e.start}); pass UTF-8 text") from None


class IncrementalDecoder:
    """Text deltas of a growing id list that are always whole characters.

    Each :meth:`push` decodes the whole list and returns only the new suffix; a trailing U+FFFD (an incomplete
    UTF-8 sequence from byte-level tokens) is held back until later tokens complete it, and so is any text
    that is not (yet) an extension of what was already emitted. :meth:`flush` emits the rest at the end, so
    the deltas always concatenate to ``decode(ids)``.
    """

    def __init__(self, decode):
        self._decode = decode
        self._ids: list[int] = []
        self.emitted = ""

    def push(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        text = self._decode(self._ids)
        stable = text.rstrip("\ufffd")
        if len(stable) <= len(self.emitted) or not stable.startswith(self.emitted):
            return ""
        delta = stable[len(self.emitted):]
        self.emitted = stable
        return delta

    def flush(self, final_text: str | None = None) -> str:
        text = self._decode(self._ids) if final_text is None else final_text
        if not text.startswith(self.emitted):
            return ""  # cannot retract emitted text; never happens with prefix-stable decoders
        delta = text[len(self.emitted):]
        self.emitted = text
        return delta


_THINK = re.compile(r"<think>(.*?)(?:</think>|$)", re.DOTALL)


def split_thinking(text: str) -> tuple[str | None, str]:
    """Split a reply into (thinking, answer).

    thinking: the text inside ``<think>…</think>`` (stripped; an unterminated ``<think>`` runs to the end),
    or None when the reply has no ``<think>``. answer: everything else, with ``<answer>``/``</answer>`` tags
    removed, stripped.
    """
    match = _THINK.search(text)
    if match is None:
        thinking, rest = None, text
    else:
        thinking = match.group(1).strip()
        rest = text[:match.start()] + text[match.end():]
    answer = rest.replace("<answer>", "").replace("</answer>", "")
    return thinking, answer.strip()
