"""Review text cleaning: pure `str -> str` functions, no Ray, no torch.

The cleaned text is what the model learns to imitate, so cleaning removes what is markup rather than
prose (HTML entities such as `&#34;` that McAuley's files carry, `<br />` tags) and normalises what would
otherwise waste vocabulary slots (compatibility forms via NFKC, runs of whitespace). Cleaning never puts a
newline inside a review: "\\n" is reserved as the end-of-review marker in the training stream.
"""

from __future__ import annotations

import html
import re
import unicodedata

# The end-of-review marker in every training and evaluation stream: cleaning never leaves one inside a
# review, so the model learns where reviews end (and the first char of each is predicted from it).
EOR = "\n"
# <br>, <br/>, <br />, <p>, </p>, <div ...>: block-ish tags become a space so words don't fuse.
_TAG_RE = re.compile(r"</?[A-Za-z][A-Za-z0-9]*(?:\s[^<>]*)?/?>")
_WS_RE = re.compile(r"\s+")
# Characters NFKC leaves alone but that are invisible or control: drop them (zero-width, BOM, C0/C1).
_INVISIBLE_RE = re.compile("[\u0000-\u0008\u000b\u000c\u000e-\u001f\u007f-\u009f\u200b-\u200d\u2060\ufeff]")
# Typographic punctuation -> ASCII, used only by ascii folding (NFKD does not map these).
_ASCII_PUNCT = str.maketrans(
    {
        "\u2018": "'",
        "\u2019": "'",
        "\u201a": "'",
        "\u201b": "'",
        "\u201c": '"',
        "\u201d": '"',
        "\u201e": '"',
        "\u201f": '"',
        "\u2013": "-",
        "\u2014": "-",
        "\u2015": "-",
        "\u2212": "-",
        "\u2026": "...",
        "\u00a0": " ",
    }
)


def strip_html(text: str) -> str:
    """Unescape HTML entities (twice: some files double-escape, `&amp;#34;`) and replace tags by a space."""
    for _ in range(2):
        if "&" not in text:
            break
        text = html.unescape(text)
    if "<" in text:
        text = _TAG_RE.sub(" ", text)
    return text


def normalize_unicode(text: str) -> str:
    """NFKC (full-width letters, ligatures, non-breaking spaces -> plain forms), then drop invisibles."""
    text = unicodedata.normalize("NFKC", text)
    return _INVISIBLE_RE.sub("", text)


def collapse_whitespace(text: str) -> str:
    """Every run of whitespace (newlines and tabs included) becomes one space; ends are stripped."""
    return _WS_RE.sub(" ", text).strip()


def fold_ascii(text: str) -> str:
    """Keep ASCII only, as the original project did: accents are dropped (é -> e), the rest removed."""
    text = text.translate(_ASCII_PUNCT)
    if text.isascii():
        return text
    decomposed = unicodedata.normalize("NFKD", text)
    return decomposed.encode("ascii", "ignore").decode("ascii")


def clean_text(text: str, lowercase: bool = False, ascii_only: bool = False) -> str:
    """The full cleaning chain for one review body (or title). Idempotent: markup that only appears
    after a pass (triple-escaped entities, a full-width `＆amp;` that NFKC turns into `&amp;`) is
    cleaned by repeating the chain, which only happens when a pass leaves `&` or `<` behind."""
    for _ in range(4):
        cleaned = _clean_once(text, lowercase, ascii_only)
        if cleaned == text or ("&" not in cleaned and "<" not in cleaned):
            return cleaned
        text = cleaned
    return text


def _clean_once(text: str, lowercase: bool, ascii_only: bool) -> str:
    text = strip_html(text)
    text = normalize_unicode(text)
    if ascii_only:
        text = fold_ascii(text)
    if lowercase:
        text = text.lower()
    return collapse_whitespace(text)


def join_title(title: str | None, body: str) -> str:
    """Title and body as one review text: "Title. Body" (no period added when the title ends in one)."""
    if not title:
        return body
    title = title.rstrip()
    sep = " " if title[-1:] in ".!?:" else ". "
    return f"{title}{sep}{body}"


def reject_reason(text: str, min_chars: int) -> str | None:
    """Why a cleaned review is dropped, or None to keep it. Reasons are manifest keys."""
    if not text:
        return "empty_after_clean"
    if len(text) < min_chars:
        return "too_short"
    return None
