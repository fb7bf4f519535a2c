"""Cleaning: pure functions, no Ray."""

import pytest

from raylstm.text import clean_text, collapse_whitespace, fold_ascii, join_title, reject_reason, strip_html


@pytest.mark.parametrize(
    "raw, want",
    [
        ("I love it &#34;a lot&#34;", 'I love it "a lot"'),
        ("line one<br />line two", "line one line two"),
        ("a<br/>b<BR>c", "a b c"),
        ("double &amp;#34;escaped&amp;#34;", 'double "escaped"'),
        ("Tom &amp; Jerry", "Tom & Jerry"),
        ("<p>para</p><div class='x'>div</div>", "para div"),
        ("5 < 6 and 7 > 3", "5 < 6 and 7 > 3"),  # comparison signs are not tags
    ],
)
def test_html(raw, want):
    assert clean_text(raw) == want


def test_whitespace_and_newlines_collapse():
    assert clean_text("  a\n\nb\t c \r\n d  ") == "a b c d"
    assert "\n" not in clean_text("one\ntwo\u2028three\u0085four")


def test_nfkc_and_invisibles():
    assert clean_text("ｆｕｌｌ width ﬁne\u00a0space") == "full width fine space"
    assert clean_text("zero\u200bwidth\ufeff") == "zerowidth"


def test_lowercase_and_ascii_folding():
    assert clean_text("Café “Déjà” Vu—great…", lowercase=True, ascii_only=True) == 'cafe "deja" vu-great...'
    assert fold_ascii("naïve 日本 ok") == "naive  ok"
    assert clean_text("naïve 日本 ok", ascii_only=True) == "naive ok"


@pytest.mark.parametrize(
    "raw",
    [
        "A &#34;good&#34;<br />  product\n\nreally &amp; truly ﬁne",
        "&amp;amp;amp;#34;deep&amp;amp;amp;#34;",
        "\uff06amp;lt;b&gt;x",
    ],
)
def test_idempotent(raw):
    once = clean_text(raw, lowercase=True)
    assert clean_text(once, lowercase=True) == once


def test_join_title():
    assert join_title("Great strings", "Loved them.") == "Great strings. Loved them."
    assert join_title("Wow!", "Loved them.") == "Wow! Loved them."
    assert join_title(None, "Body") == "Body"


def test_reject_reason():
    assert reject_reason("", 40) == "empty_after_clean"
    assert reject_reason("short", 40) == "too_short"
    assert reject_reason("x" * 40, 40) is None
    assert strip_html("&lt;b&gt;") == " "  # unescaped to a tag, then removed
    assert collapse_whitespace(" a  b ") == "a b"


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=300, deadline=None)
@given(st.text(), st.booleans(), st.booleans())
def test_clean_is_idempotent_and_never_leaves_a_newline(raw, lower, ascii_only):
    once = clean_text(raw, lowercase=lower, ascii_only=ascii_only)
    assert "\n" not in once and once == once.strip()
    assert clean_text(once, lowercase=lower, ascii_only=ascii_only) == once
    if ascii_only:
        assert once.isascii()


# --- clean_column: the vectorised path must equal clean_text row for row --------------------------------
_PIECES = [
    "plain words",
    " ",
    "  ",
    "\t",
    "\n",
    "\r\n",
    "\x0b",
    "\x0c",
    "\x1c",
    "\x1f",
    "\x00",
    "\x07",
    "\x7f",
    "&amp;",
    "&#34;",
    "&amp;#34;",
    "&amp;amp;lt;",
    "AT&T",
    "&",
    "&lt;br /&gt;",
    "<br />",
    "<br/>",
    "<BR>",
    "<p class='x\ny'>",
    "</div>",
    "<",
    ">",
    "<<b>>",
    "a < b",
    "<3",
    "café",
    "\u00a0",
    "\u200b",
    "\ufeff",
    "ｆｕｌｌ",
    "＆amp;",
    "\u2019",
    "\u2026",
    "ﬁ",
    "Ünïcödé",
    "E\u0301",
    "😀",
    ".",
    "Great!",
]


@pytest.mark.parametrize(
    "lowercase, ascii_only", [(False, False), (True, False), (False, True), (True, True)]
)
def test_clean_column_equals_clean_text(lowercase, ascii_only):
    import pyarrow as pa
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from raylstm.text import clean_column

    texts = st.lists(st.sampled_from(_PIECES) | st.text(max_size=6), max_size=12).map("".join)

    @settings(max_examples=80, deadline=None)
    @given(st.lists(texts, min_size=1, max_size=40))
    def check(batch):
        want = [clean_text(t, lowercase, ascii_only) for t in batch]
        assert clean_column(pa.array(batch, pa.string()), lowercase, ascii_only).to_pylist() == want
        # a slice (a non-zero offset into the buffers) and large_string take the same path
        sliced = pa.array(["&x<", *batch], pa.large_string()).slice(1)
        assert clean_column(sliced, lowercase, ascii_only).to_pylist() == want

    check()
