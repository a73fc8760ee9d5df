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
    return character not in KEPT and unicodedata.category(character) in HIDDEN_CATEGORIES


def escape(character: str) -> str:
    code = ord(character)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"
