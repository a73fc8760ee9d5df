"""Model-written text printed by the chat and sample commands and the training log: a terminal shows its control
characters, never obeys them."""

from types import SimpleNamespace

from test_engine import TOKENIZER, chain, scripted_engine, tokens_of

from nanochat_flyte.cli.chat import answer
from nanochat_flyte.hostile_text import shown
from nanochat_flyte.inference.engine import SamplingParams
from nanochat_flyte.training.loop import Trainer


def test_control_characters_are_spelled_out_and_text_is_kept():
    assert shown("\x1b]52;c;aGk=\x07 red \x1b[31m\r\x9b2J") == "\\x1b]52;c;aGk=\\x07 red \\x1b[31m\\x0d\\x9b2J"
    assert shown("tab\tand\nnewline, ünïcödé, 中文") == "tab\tand\nnewline, ünïcödé, 中文"


def test_invisible_marks_that_reorder_or_hide_text_are_spelled_out_and_joiners_kept():
    """A right-to-left override would show "efas # / fr- mr" as "rm -rf / # safe" on a bidi terminal."""
    assert shown("\u202eefas # / fr- mr\u202c") == "\\u202eefas # / fr- mr\\u202c"
    assert shown("a\u200bb\u2028c\u2067d\u2069\ufeff") == "a\\u200bb\\u2028c\\u2067d\\u2069\\ufeff"
    assert shown("\U0001F468\u200d\U0001F469 \u0645\u200c\u06cc") == "\U0001F468\u200d\U0001F469 \u0645\u200c\u06cc"


def test_text_hidden_in_invisible_characters_is_spelled_out():
    """Tag characters (U+E0000-E007F) carry a whole text that a terminal shows as nothing; a soft hyphen and a word
    joiner are invisible too."""
    tagged = "ok" + "".join(chr(0xE0000 + ord(letter)) for letter in "rm")
    assert shown(tagged) == "ok\\U000e0072\\U000e006d"
    assert shown("a\xadb\u2060c\u2064d") == "a\\xadb\\u2060c\\u2064d"
    # variation selectors carry a byte each after any character (VS1-16, VS17-256); an emoji's own VS16 stays
    smuggled = "ok\ufe00\U000e0100\U000e01ef\u034f\u3164\u180b"
    assert shown(smuggled) == "ok\\ufe00\\U000e0100\\U000e01ef\\u034f\\u3164\\u180b"
    assert shown("\u2764\ufe0f \u2764\ufe0e") == "\u2764\ufe0f \u2764\ufe0e"


def test_a_chat_reply_that_writes_an_escape_sequence_reaches_the_terminal_spelled_out(capsys):
    hello, escape = tokens_of(" Hello")[0], TOKENIZER.encode_single_token(b"\x1b")
    colour = tokens_of("[31m")
    engine = scripted_engine(chain(hello, escape, *colour), phase="base")  # continues the message as plain text
    reply = answer(engine, [{"role": "user", "content": " Hello"}], SamplingParams(max_tokens=1 + len(colour)))
    assert reply == "\x1b[31m"  # the text itself is kept as the model wrote it
    assert capsys.readouterr().out == "\\x1b[31m\n"


def test_on_a_terminal_an_escape_is_marked_apart_from_the_same_characters_written_by_the_model():
    """Without marks, ESC and the four characters "\\x1b" would look the same."""
    assert shown("\x1b", marked=True) == "\x1b[7m\\x1b\x1b[27m"
    assert shown("\\x1b", marked=True) == "\\x1b"  # the model's own text, as it wrote it
    assert shown("\x1b[7m", marked=True) == "\x1b[7m\\x1b\x1b[27m[7m"  # the model cannot mark its own text


def test_a_training_sample_reaches_the_log_with_its_invisible_characters_spelled_out(capsys):
    """repr alone spells out the controls and the tag characters, but leaves a Hangul filler (U+3164) unseen."""
    samples = [{"prompt": "Hi", "completion": " ok\u3164\U000e0041\x1b[31m"}]
    phase = SimpleNamespace(samples=lambda model, precision: samples)
    stand_in = SimpleNamespace(model=None, precision=None, phase=phase,
                               tracker=SimpleNamespace(log_samples=lambda step, samples: None))
    Trainer.sample(stand_in, 3)
    assert capsys.readouterr().out == "step 00003 | sample: 'Hi' -> ' ok\\u3164\\U000e0041\\x1b[31m'\n"
