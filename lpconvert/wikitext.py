"""Wikipedia markup to prose: the reader of a MediaWiki XML dump and `clean_wikitext`.

The built-in ``wiki`` text (lpconvert.texts) is a shortened Wikipedia dump shipped inside gensim.
`wiki_articles` streams its main-namespace, non-redirect pages; `clean_wikitext` strips each one's
markup (templates, tables, links, references, tags, the list-only tail sections) down to plain
prose: good enough for calibration, not a parser.
"""

from __future__ import annotations

import bz2
import html
import re
import xml.etree.ElementTree as ET
from pathlib import Path


def wiki_articles(path: Path):
    """Yield the raw wikitext of each main-namespace, non-redirect page of a MediaWiki dump."""
    with bz2.open(path, "rb") as f:
        for _, elem in ET.iterparse(f):
            if elem.tag.rsplit("}", 1)[-1] != "page":
                continue
            fields = {child.tag.rsplit("}", 1)[-1]: child for child in elem.iter()}
            text = fields["text"].text if "text" in fields else None
            is_article = fields.get("ns") is not None and fields["ns"].text == "0"
            is_redirect = "redirect" in fields or (text or "").lstrip().upper().startswith("#REDIRECT")
            if text and is_article and not is_redirect:
                yield text
            elem.clear()  # keep memory flat while streaming the dump


# --- wiki markup ----------------------------------------------------------------------------

# Sections after which an article is only lists of links and citations.
_TAIL_SECTIONS = re.compile(
    r"^==+\s*(see also|references|notes|footnotes|further reading|external links|bibliography|sources)"
    r"\s*==+\s*$",
    re.I | re.M,
)
_COMMENT = re.compile(r"<!--.*?(-->|$)", re.S)
# Tags whose content is not prose (citations, formulas, galleries, code...).
_DROP_ELEMENTS = re.compile(
    r"<(ref|math|gallery|timeline|imagemap|score|chem|hiero|source|syntaxhighlight|code|references)"
    r"\b[^>]*?(/>|>.*?</\1\s*>)",
    re.S | re.I,
)
_TAG = re.compile(r"</?[A-Za-z][^<>]*>")
_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")  # innermost first; repeated until none left
_TABLE = re.compile(r"\{\|(?:(?!\{\|).)*?\|\}", re.S)  # innermost first as well
_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")
# File/Image/Category links, and interlanguage links like [[de:Anarchismus]] (lower-case code).
_DROP_LINK = re.compile(r"^\s*((?i:file|image|category|media)|[a-z]{2,3}(-[a-z]+)?)\s*:")
_EXTERNAL = re.compile(r"\[(?:https?:|ftp:)?//[^\s\]]*\s*([^\]]*)\]")
_HEADING = re.compile(r"^(=+)\s*(.*?)\s*\1\s*$", re.M)


def _repeat_sub(pattern: re.Pattern, repl, text: str) -> str:
    """Apply `pattern` until nothing changes: strips nested constructs from the inside out."""
    while True:
        text, n = pattern.subn(repl, text)
        if n == 0:
            return text


def _link_text(match: re.Match) -> str:
    target = match.group(1)
    if _DROP_LINK.match(target) and not target.lstrip().startswith(":"):
        return ""  # files, images, categories and interlanguage links
    return target.rsplit("|", 1)[-1].strip() if "|" in target else target.lstrip(":").strip()


def clean_wikitext(text: str) -> str:
    """Reduce one article's wikitext to plain prose (good enough for calibration, not a parser)."""
    tail = _TAIL_SECTIONS.search(text)
    text = text[: tail.start()] if tail else text
    text = _COMMENT.sub("", text)
    text = _DROP_ELEMENTS.sub("", text)
    text = _repeat_sub(_TEMPLATE, "", text)
    text = re.sub(r"\{\{[^\n]*|\}\}", "", text)  # unbalanced leftovers: drop to the end of the line
    text = _repeat_sub(_TABLE, "", text)
    text = _repeat_sub(_LINK, _link_text, text)  # captions' inner links go before their File: link
    text = _EXTERNAL.sub(r"\1", text)
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"__[A-Z]+__", "", text)  # __NOTOC__ and friends
    text = _HEADING.sub(r"\2", text)
    text = html.unescape(_TAG.sub("", text))  # unescape last so &lt;..&gt; never becomes a tag
    return _tidy_lines(text)


def _tidy_lines(text: str) -> str:
    lines = []
    for line in text.splitlines():
        line = re.sub(r"[ \t\u00a0]+", " ", line).strip()
        line = re.sub(r"\(\s*[,;]?\s*\)", "", line)  # "( )" left where a template was removed
        line = re.sub(r" +([,.;:])", r"\1", line).strip()
        if line.startswith(("*", "#", ":", ";")):
            line = line.lstrip("*#:; ")
            if len(line.split()) < 4:  # bullets reduced to nothing but a word or two
                continue
        if line.startswith(("|", "!", "{", "}", "[", "]")) or line == "-":
            continue  # table rows and leftovers of unbalanced templates or links
        lines.append(line)  # an empty line keeps its paragraph break
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
