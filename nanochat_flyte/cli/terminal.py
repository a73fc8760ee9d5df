"""Model-written text on a terminal: shown, never obeyed.

A byte-level tokenizer can write any character, and a terminal acts on control characters: ESC starts sequences
that recolour, move the cursor, retitle the window or write the clipboard (OSC 52), a carriage return writes over
the line. A terminal that lays out bidirectional text also obeys Unicode's invisible direction marks: a
right-to-left override shows "efas # / fr- mr" as "rm -rf / # safe". The chat and sample commands print a model's
text through shown(), which spells all of those out.
"""

import re

# C0 controls but tab and newline, DEL, C1 controls (U+0080-U+009F: 8-bit forms of ESC's sequences); then the
# invisible ones that reorder or hide text: the bidi marks, overrides and isolates, the zero-width space, the line
# and paragraph separators, the byte-order mark. (Zero-width joiners stay: scripts and emoji need them.)
CONTROL_CHARACTERS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200b\u200e\u200f\u2028-\u202e"
                                "\u2066-\u2069\ufeff]")


def shown(text: str) -> str:
    """text with each character a terminal would act on, or lay out unseen, written as its escape (ESC as \\x1b,
    a right-to-left override as \\u202e)."""
    return CONTROL_CHARACTERS.sub(lambda match: escape(match.group()), text)


def escape(character: str) -> str:
    code = ord(character)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
