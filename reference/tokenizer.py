"""Small character-level tokenizer.json files for tiny checkpoints (tests, demo, the trained OCR model).

Real GLM checkpoints ship their own tokenizer.json; tiny ones need one whose special tokens carry the
GLM names at the ids the config uses, so the runtime's chat formatting is exercised for real.
"""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

# GLM special tokens at the ids the tiny GLM-4V-family presets use (image/video ids from their config.json).
TINY_GLM4V_SPECIALS: dict[str, int] = {
    "<|pad|>": 0, "<|endoftext|>": 1, "<|user|>": 2, "[gMASK]": 3, "<sop>": 4, "<|system|>": 5,
    "<|assistant|>": 6, "<|observation|>": 7, "<think>": 8, "</think>": 9, "<eop>": 10,
    "<answer>": 11, "</answer>": 12,
    "<|image|>": 250, "<|video|>": 251, "<|begin_of_image|>": 252, "<|end_of_image|>": 253,
    "<|begin_of_video|>": 254, "<|end_of_video|>": 255,
}
# The tiny GLM-Image preset's: the chat / grid specials above its visual vocabulary (ids < 272), the image start
# (= generation BOS) and end (= EOS) at the config's 256 / 257, the source-image placeholder at 310, pad at 300.
TINY_GLM_IMAGE_SPECIALS: dict[str, int] = {
    "<|begin_of_image|>": 256, "<|end_of_image|>": 257, "<|pad|>": 300, "<|endoftext|>": 301, "[gMASK]": 302,
    "<sop>": 303, "<eop>": 304, "<|user|>": 305, "<|assistant|>": 306, "<|system|>": 307, "<|image|>": 310,
}
DEFAULT_CHARACTERS = string.ascii_letters + string.digits + string.punctuation + " \n"


def build_char_tokenizer(specials: dict[str, int], characters: str = DEFAULT_CHARACTERS, first_char_id: int = 16,
                         unk: str = "<|pad|>") -> Tokenizer:
    """A tokenizer with one token per character (ids from ``first_char_id``) and the given special tokens.

    Unknown characters map to ``unk``. Decoding concatenates tokens (no spaces inserted).
    """
    vocab = dict(specials)
    next_id = first_char_id
    for ch in dict.fromkeys(characters):
        while next_id in vocab.values():
            next_id += 1
        vocab[ch] = next_id
        next_id += 1
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token=unk, max_input_chars_per_word=10**6,
                                           continuing_subword_prefix=""))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character alone
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens(sorted(specials, key=specials.get))
    return tokenizer
