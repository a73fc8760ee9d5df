"""Model-written text for people to read: shown, never obeyed.

A byte-level tokenizer can write any character, and a terminal acts on control characters: ESC starts sequences
that recolour, move the cursor, retitle the window or write the clipboard (OSC 52), a carriage return writes over
the line. A terminal, or a page, that lays out bidirectional text also obeys Unicode's invisible direction marks: a
right-to-left override shows "efas # / fr- mr" as "rm -rf / # safe". Every place that shows a model's text to a
person (the chat and sample commands, the report card, the training card, the W&B samples table) passes it through
shown(), which spells all of those out: on a terminal in reverse video, so that an escape is never taken for the
same characters written by the model. A top-level module: every stage may import it, and it imports nothing of ours.
"""

import unicodedata

# What a terminal acts on or lays out unseen, by Unicode category: the controls (Cc: C0 but tab and newline, DEL, C1,
# the 8-bit forms of ESC's sequences), the format characters (Cf: the bidi marks, overrides and isolates, zero-width
# spaces, the byte-order mark, the soft hyphen, the tag characters that carry invisible text), and the line and
# paragraph separators (Zl, Zp). The zero-width joiners stay: scripts and emoji need them.
HIDDEN_CATEGORIES = ("Cc", "Cf", "Zl", "Zp")
# Unicode's other default-ignorable characters, which a terminal shows as nothing too and which can carry a text as
# the tag characters do, one character a byte: the combining grapheme joiner, the Hangul fillers, two Khmer vowels,
# the Mongolian variation selectors, the variation selectors (all but VS15 and VS16, which choose an emoji's text or
# picture form) and the unassigned ones. U+E0000-E0FFF holds the tag characters and the 240 supplementary selectors.
HIDDEN_RANGES = ((0x034F, 0x034F), (0x115F, 0x1160), (0x17B4, 0x17B5), (0x180B, 0x180F), (0x2065, 0x2065),
                 (0x3164, 0x3164), (0xFE00, 0xFE0D), (0xFFA0, 0xFFA0), (0xFFF0, 0xFFF8), (0xE0000, 0xE0FFF))
KEPT = frozenset("\t\n\u200c\u200d")
REVERSE_VIDEO, NORMAL_VIDEO = "\x1b[7m", "\x1b[27m"  # SGR 7 and 27


def shown(text: str, marked: bool = False) -> str:
    """text with each character a terminal would act on, or lay out unseen, written as its escape (ESC as \\x1b,
    a right-to-left override as \\u202e, a tag character as \\U000e0041). marked (for a terminal, not a pipe):
    each escape in reverse video, so that a reader tells it from the same characters written by the model (whose
    own ESC is always spelled out, so it cannot mark anything)."""
    before, after = (REVERSE_VIDEO, NORMAL_VIDEO) if marked else ("", "")
    return "".join(f"{before}{escape(character)}{after}" if hidden(character) else character for character in text)


def hidden(character: str) -> bool:
    if character in KEPT:
        return False
    code = ord(character)
    return unicodedata.category(character) in HIDDEN_CATEGORIES or any(low <= code <= high
                                                                        for low, high in HIDDEN_RANGES)


def escape(character: str) -> str:
    code = ord(character)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"
