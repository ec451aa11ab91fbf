"""Synthetic rendered text lines for training and evaluating the small GLM-OCR model (numpy + pillow only).

Every line is a short string (3-16 characters) of mixed letters, digits and punctuation, drawn in one of a
fixed list of fonts at 32-40 px, dark ink (grey or tinted) on light paper (grey or tinted), light Gaussian noise, an occasional
slight blur and a rotation of at most 2 degrees. The canvas is 42-69 px high, so the GLM image processor
(``smart_resize`` with factor 28) maps every line to 56 px: two rows of merged image tokens.

Randomness comes only from the ``numpy.random.Generator`` passed in, so a line is a pure function of the
generator state. Training and held-out lines draw from disjoint seed streams (see :func:`line_rng`).

Fonts: the DejaVu families when their files are installed (Debian ``fonts-dejavu-core`` / ``-extra``), and
Pillow's built-in scalable font (Aileron Regular, ``ImageFont.load_default(size=...)``). A font whose file is
absent falls back to the built-in one, so fresh machines render every line (in fewer fonts).
``GLMTRT_OCR_FONTS=builtin`` forces the fallback everywhere (to check a model the way a font-less CI sees it).
"""

from __future__ import annotations

import functools
import os
import string
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

__all__ = [
    "FONTS", "CHARACTERS", "TRAIN_STREAM", "HELDOUT_STREAM", "CALIBRATION_STREAM", "HELDOUT_SEED", "MIN_CHARS", "MAX_CHARS",
    "font_report", "line_rng", "random_text", "render_line", "make_line", "heldout_lines",
]

MIN_CHARS, MAX_CHARS = 3, 16
PUNCTUATION = string.punctuation  # all 32 ASCII marks
CHARACTERS = string.ascii_letters + string.digits + PUNCTUATION + " "

# (display name, file name searched under the system font folders). None = Pillow's built-in font.
# The list (and its order) is part of the data definition: the generator draws an index into it.
FONTS: tuple[tuple[str, str | None], ...] = (
    ("Pillow built-in (Aileron Regular)", None),
    ("DejaVu Sans", "DejaVuSans.ttf"),
    ("DejaVu Serif", "DejaVuSerif.ttf"),
    ("DejaVu Sans Mono", "DejaVuSansMono.ttf"),
    ("Pillow built-in (Aileron Regular)", None),  # listed twice: the font every machine has gets 2/5 of lines
)
FONT_DIRS = ("/usr/share/fonts", "/usr/local/share/fonts", "~/.local/share/fonts", "~/.fonts")
MIN_SIZE, MAX_SIZE = 32, 40  # font size in px
MIN_HEIGHT, MAX_HEIGHT = 42, 69  # canvas height: smart_resize maps 42..69 px to 56 (two rows of merged tokens)

# First word of the SeedSequence entropy: the streams never meet. 3 is the trainer's validation stream.
TRAIN_STREAM, HELDOUT_STREAM, CALIBRATION_STREAM = 1, 2, 4
HELDOUT_SEED = 20240917


@functools.lru_cache(maxsize=None)
def _font_files() -> dict[str, str]:
    found: dict[str, str] = {}
    for folder in FONT_DIRS:
        root = Path(folder).expanduser()
        if root.is_dir():
            for path in sorted(root.rglob("*.ttf")):
                found.setdefault(path.name, str(path))
    return found


def _font_path(index: int) -> str | None:
    """The file of FONTS[index] on this machine, or None for the built-in font (also the fallback)."""
    if os.environ.get("GLMTRT_OCR_FONTS", "") == "builtin":
        return None
    name = FONTS[index][1]
    return _font_files().get(name) if name else None


@functools.lru_cache(maxsize=None)
def _load_font(path: str | None, size: int) -> ImageFont.FreeTypeFont:
    if path is None:
        return ImageFont.load_default(size=size)
    # Basic layout (no ligatures, no HarfBuzz): the same glyph run with or without libraqm installed.
    return ImageFont.truetype(path, size, layout_engine=ImageFont.Layout.BASIC)


def font_report() -> list[str]:
    """One line per entry of FONTS: its name and the file used here (or the built-in fallback)."""
    out = []
    for i, (name, file) in enumerate(FONTS):
        path = _font_path(i)
        used = path or ("Pillow built-in" + (f" (fallback: {file} not found)" if file else ""))
        out.append(f"{i}: {name:34s} -> {used}")
    return out


def line_rng(stream: int, seed: int, index: int) -> np.random.Generator:
    """The generator of line ``index`` of a stream (TRAIN_STREAM or HELDOUT_STREAM) under ``seed``."""
    return np.random.default_rng(np.random.SeedSequence([stream, seed, index]))


def random_text(rng: np.random.Generator, min_chars: int = MIN_CHARS, max_chars: int = MAX_CHARS) -> str:
    """3-16 characters (by default): letter groups (any case mix), numbers and punctuation, single spaces
    between some."""
    n = int(rng.integers(min_chars, max_chars + 1))
    out = ""
    while len(out) < n:
        kind = rng.choice(3, p=[0.55, 0.25, 0.20])
        if kind == 0:
            word = "".join(rng.choice(list(string.ascii_lowercase), int(rng.integers(1, 9))))
            style = rng.choice(4, p=[0.45, 0.25, 0.15, 0.15])
            if style == 1:
                word = word.capitalize()
            elif style == 2:
                word = word.upper()
            elif style == 3:
                word = "".join(c.upper() if rng.random() < 0.5 else c for c in word)
        elif kind == 1:
            word = "".join(rng.choice(list(string.digits), int(rng.integers(1, 7))))
            if len(word) > 2 and rng.random() < 0.3:
                cut = int(rng.integers(1, len(word)))
                word = word[:cut] + str(rng.choice(list(".,:/-"))) + word[cut:]
        else:
            word = "".join(rng.choice(list(PUNCTUATION), int(rng.integers(1, 3))))
        out += word
        if rng.random() < 0.5:
            out += " "
    text = " ".join(out[:n].split())  # no leading, trailing or double spaces
    while len(text) < min_chars:
        text += str(rng.choice(list(string.ascii_letters + string.digits)))
    return text


def render_line(rng: np.random.Generator, text: str) -> Image.Image:
    """Draw ``text`` on an RGB canvas with a random font, size, colours, margins, rotation, blur and noise."""
    return render_line_with_centers(rng, text)[0]


def render_line_with_centers(rng: np.random.Generator, text: str) -> tuple[Image.Image, list[float]]:
    """:func:`render_line`, plus the horizontal centre of each character as a fraction of the image width
    (before the small rotation; used for the training-only per-token auxiliary loss)."""
    font_index = int(rng.integers(len(FONTS)))
    size = int(rng.integers(MIN_SIZE, MAX_SIZE + 1))
    font = _load_font(_font_path(font_index), size)
    # dark ink on light paper, grey or tinted
    bg = rng.integers(200, 256, 3) if rng.random() < 0.5 else np.full(3, rng.integers(210, 256))
    fg = rng.integers(0, 70, 3) if rng.random() < 0.4 else np.full(3, rng.integers(0, 60))
    bg, fg = tuple(int(v) for v in bg), tuple(int(v) for v in fg)
    ascent, descent = font.getmetrics()
    left, _, right, _ = font.getbbox(text)
    pad_top, pad_bottom = int(rng.integers(2, 9)), int(rng.integers(2, 9))
    margin_l, margin_r = int(rng.integers(3, 21)), int(rng.integers(3, 21))
    short = MIN_HEIGHT - (ascent + descent + pad_top + pad_bottom)
    if short > 0:  # small fonts: more paper above and below
        extra_top = int(rng.integers(0, short + 1))
        pad_top, pad_bottom = pad_top + extra_top, pad_bottom + short - extra_top
    height = min(ascent + descent + pad_top + pad_bottom, MAX_HEIGHT)
    width = max(right - left + margin_l + margin_r, MIN_HEIGHT)
    image = Image.new("RGB", (width, height), bg)
    ImageDraw.Draw(image).text((margin_l - left, pad_top), text, font=font, fill=fg)
    angle = float(rng.uniform(-2.0, 2.0))
    image = image.rotate(angle, resample=Image.Resampling.BICUBIC, expand=False, fillcolor=bg)
    if rng.random() < 0.2:
        image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 0.6))))
    sigma = float(rng.uniform(0.0, 5.0))
    noise = rng.normal(0.0, sigma, (height, width, 1))
    pixels = np.clip(np.asarray(image, dtype=np.float32) + noise, 0, 255).round().astype(np.uint8)
    x0 = margin_l - left
    centers = [(x0 + font.getlength(text[:i]) + font.getlength(ch) / 2) / width for i, ch in enumerate(text)]
    return Image.fromarray(pixels, mode="RGB"), centers


def make_line(rng: np.random.Generator, min_chars: int = MIN_CHARS, max_chars: int = MAX_CHARS) -> tuple[Image.Image, str]:
    """One synthetic line: (RGB PIL image, its text). Deterministic given the generator state (and lengths)."""
    text = random_text(rng, min_chars, max_chars)
    return render_line(rng, text), text


def make_line_with_centers(rng: np.random.Generator, min_chars: int = MIN_CHARS,
                           max_chars: int = MAX_CHARS) -> tuple[Image.Image, str, list[float]]:
    """:func:`make_line` (the same line for the same generator state) plus the character centres."""
    text = random_text(rng, min_chars, max_chars)
    image, centers = render_line_with_centers(rng, text)
    return image, text, centers


def heldout_lines(n: int = 200, seed: int = HELDOUT_SEED) -> list[tuple[Image.Image, str]]:
    """The fixed held-out set: line i comes from ``line_rng(HELDOUT_STREAM, seed, i)`` (a prefix is stable)."""
    return [make_line(line_rng(HELDOUT_STREAM, seed, i)) for i in range(n)]
