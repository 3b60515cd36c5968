"""Span data shown as text. Service, span and attribute names, status messages and everything
derived from them come from whoever sends spans: Streamlit renders most strings as Markdown
(images and links fetch and navigate, plus its own directives, icons, emoji and LaTeX), so a
page puts any such string into Markdown only through `md`. Widgets that show plain text
(st.text, st.code, st.dataframe cells, selectbox options, chart labels) take it as it is."""

from __future__ import annotations

import re
import string

# Every ASCII punctuation character may be backslash-escaped in CommonMark, and an escaped one
# is always literal: that covers emphasis, links and images, raw HTML and entities, tables, and
# the directives Streamlit finds in the source (`:red[...]`, `:material/...:`, emoji shortcodes,
# `$...$`), which all start from a punctuation character.
_ESCAPED = str.maketrans({c: "\\" + c for c in string.punctuation})
# What Streamlit and GFM rewrite in the text after parsing, where the escapes are gone: bare
# URLs and e-mail addresses become links, `:material_x:` an icon, `:streamlit:` a logo, and a
# few typographic pairs (-> <- -- >= <= ~=) symbols. An invisible word joiner inside each keeps
# it as typed.
_JOINER = "\u2060"
_REWRITTEN = re.compile(
    r"(?i:(?<=https:)|(?<=http:))(?=//)|(?i:(?<=www))(?=\.)|(?<=@)(?=[-\w])"
    r"|(?<=:)(?=material_|streamlit:)|(?<=-)(?=>)|(?<=<)(?=-)|(?<=-)(?=-)|(?<=[<>~])(?==)"
)
# Line breaks would start new blocks (headings, lists, quotes): one line, as the name reads.
_LINE_BREAKS = str.maketrans({"\r": " ", "\n": " ", "\u2028": " ", "\u2029": " "})


def md(value: object) -> str:
    """`value` as Markdown that Streamlit shows exactly as the text reads (on one line)."""
    text = _REWRITTEN.sub(_JOINER, str(value).translate(_LINE_BREAKS))
    return text.translate(_ESCAPED)
