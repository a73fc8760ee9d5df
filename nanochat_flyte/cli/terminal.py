"""Model-written text on a terminal: shown, never obeyed.

A byte-level tokenizer can write any character, and a terminal acts on control characters: ESC starts sequences
that recolour, move the cursor, retitle the window or write the clipboard (OSC 52), a carriage return writes over
the line. The chat and sample commands print a model's text through shown(), which spells those out.
"""

import re

# C0 controls but tab and newline, DEL, C1 controls (U+0080-U+009F: 8-bit forms of ESC's sequences)
CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def shown(text: str) -> str:
    """text with each control character a terminal would act on written as its escape (ESC as \\x1b)."""
    return CONTROL_CHARACTERS.sub(lambda match: f"\\x{ord(match.group()):02x}", text)
