"""Report card and Deck HTML, rendered headless from metrics a Tracker wrote."""

import base64
import re
import unicodedata

from nanochat_flyte.config import RunConfig
from nanochat_flyte.reporting.report import (
    LOSS_PLOT,
    THROUGHPUT_PLOT,
    data_deck_html,
    environment_deck_html,
    markdown_grid,
    training_deck_html,
    write_report,
)
from nanochat_flyte.reporting.tracking import Tracker

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CONFIG = RunConfig(run_name="report_unit", wandb_mode="disabled")
ENVIRONMENT = {"python": "3.11.7", "torch": "2.13.0", "gpu_name": "Tesla T4", "bf16_supported": False}
SUMMARY = {"num_params": 36_700_160, "flops_per_token": 2.5e8, "steps_completed": 20, "tokens_seen": 1_310_720,
           "total_time_s": 3725.0, "avg_tok_per_sec": 15_000.0, "avg_mfu": 5.8, "min_validation_bpb": 1.25,
           "final_validation_bpb": 1.3, "wandb_url": None}


def tracked_run(out_dir):
    """A finished 20-step run as the training loop records it, with a sample containing HTML to escape."""
    tracker = Tracker(CONFIG, out_dir, env_report=ENVIRONMENT)
    for step in range(1, 21):
        tracker.log(step, {"train/loss": 8.0 - step / 5, "train/loss_smooth": 8.1 - step / 5,
                           "train/tok_per_sec": 14_000.0 + step, "train/mfu": 5.0 + step / 20})
        if step % 10 == 0:
            tracker.log(step, {"val/bpb": 2.0 - step / 40})
            tracker.log_samples(step, [{"prompt": "The sky is", "completion": f" <b>blue</b> {step}\nagain"}])
    tracker.finish()
    return out_dir


def inlined_pngs(html_text: str) -> list[bytes]:
    return [base64.b64decode(data) for data in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"',
                                                          html_text)]


def test_report_card_has_numbers_plots_and_last_samples(tmp_path):
    report = write_report(tracked_run(tmp_path), CONFIG, ENVIRONMENT, SUMMARY)
    text = report.read_text()
    for plot in (LOSS_PLOT, THROUGHPUT_PLOT):
        assert f"]({plot})" in text
        assert (tmp_path / plot).read_bytes().startswith(PNG_SIGNATURE)
    for expected in ("report_unit", "36,700,160", "2.500e+08", "1,310,720", "1h 02m 05s", "15,000", "5.8",
                     "1.25", "1.3", "Tesla T4", "## Samples at step 20"):
        assert expected in text, expected
    # the completion as written, in a fenced block: its HTML shown, not run, its own line break kept
    assert "**The sky is**\n\n```\n <b>blue</b> 20\nagain\n```\n" in text
    assert "blue</b> 10" not in text  # only the last sampling point
    assert "| val_shard | 1822 |" in text  # settings as written
    assert "| W&B run | none |" in text  # W&B disabled: no run anywhere
    offline = write_report(tmp_path, CONFIG, ENVIRONMENT, {**SUMMARY, "wandb_mode": "offline"}).read_text()
    assert "| W&B run | offline, in the checkpoint's wandb/ (`wandb sync` uploads it) |" in offline


def test_training_deck_is_self_contained_and_escaped(tmp_path):
    deck = training_deck_html(tracked_run(tmp_path), CONFIG, ENVIRONMENT, SUMMARY)
    images = inlined_pngs(deck)
    assert len(images) == 2 and all(image.startswith(PNG_SIGNATURE) for image in images)
    assert "&lt;b&gt;blue&lt;/b&gt; 10" in deck and "&lt;b&gt;blue&lt;/b&gt; 20" in deck  # every sampling point
    assert "<b>blue" not in deck
    assert "matrix_lr" in deck and "Tesla T4" in deck


def test_training_deck_before_any_step_has_no_plots(tmp_path):
    deck = training_deck_html(tmp_path, CONFIG, None, {})
    assert inlined_pngs(deck) == [] and "n/a" in deck


def test_data_deck_tolerates_missing_fields():
    manifest = {"tokenizer": {"name": "gpt2", "vocab_size": 50257, "val_bytes_per_token": 4.6},
                "train": [{"shard": 0, "file": "train/shard_00000.bin", "tokens": 1100, "documents": 100,
                           "characters": 4500, "utf8_bytes": 4600, "download_seconds": 1.5,
                           "tokenize_seconds": 2.25},
                          {"shard": 1, "file": "train/shard_00001.bin"}],
                "val": [{"shard": 1822, "file": "val/shard_01822.bin", "tokens": 600, "documents": 50}],
                "train_tokens": 1100}
    deck = data_deck_html(manifest)
    assert deck.count("<tr>") == 1 + 3 + 6  # overview (header + 5 rows) is 6, shards header + 3 shards is 4
    assert "4.6" in deck and "1.5" in deck and "2.25" in deck and "shard_01822" in deck
    assert deck.count("n/a") >= 6  # shard 1 has no statistics; the val shard no bytes or timings


def test_environment_deck_lists_every_field():
    deck = environment_deck_html(ENVIRONMENT)
    assert all(key in deck for key in ENVIRONMENT) and "Tesla T4" in deck


def test_a_cpu_run_has_no_empty_mfu_panel(tmp_path):
    from nanochat_flyte.reporting.report import throughput_figure
    with_mfu = [{"step": 1, "train/tok_per_sec": 10.0, "train/mfu": 3.0}]
    without_mfu = [{"step": 1, "train/tok_per_sec": 10.0}]
    assert len(throughput_figure(with_mfu).axes) == 2
    assert [axes.get_title() for axes in throughput_figure(without_mfu).axes] == ["Throughput"]


def test_a_completion_is_never_read_as_markdown_or_html(tmp_path):
    """Model-written text is hostile: a link, a remote image, HTML or a fence of its own in a completion stay text
    in the fenced block, whose fence outruns the completion's backticks; a table cell keeps its row."""
    hostile = "![x](https://evil.example/p.png) [click](javascript:alert(1)) <img src=x>\n````\n# not a heading"
    tracker = Tracker(CONFIG, tmp_path)
    tracker.log_samples(5, [{"prompt": "Say *it*:", "completion": hostile}])
    tracker.finish()
    text = write_report(tmp_path, CONFIG, None, {"min_validation_loss": 2.5}).read_text()
    assert f"**Say \\*it\\*:**\n\n`````\n{hostile}\n`````\n" in text
    assert markdown_grid(["reason"], [["the probe failed:\nTraceback | line 2"]]).splitlines()[-1] == (
        "| the probe failed: Traceback \\| line 2 |")
    # a carriage return ends a Markdown line too (a Windows line break, or a bare one)
    assert markdown_grid(["a", "b"], [["one\r\ntwo", "three\rfour"]]).split("\n")[-1] == "| one two | three four |"


def test_a_completions_control_and_bidi_characters_are_shown_never_obeyed(tmp_path):
    """`cat report.md` must not write the clipboard (OSC 52), clear the screen or overwrite a line with a forged one,
    and a right-to-left override must not reorder a sample on the card: each is spelled out, on both."""
    hostile = "\x1b]52;c;cm0gLXJmIH4K\x07\rstep 00999 | val bpb 0.1\n\x1b[2K\x9b2Kforged\u202e"
    tracker = Tracker(CONFIG, tmp_path)
    tracker.log_samples(5, [{"prompt": "Say\x1b[8m", "completion": hostile}])
    tracker.finish()
    spelled = "\\x1b]52;c;cm0gLXJmIH4K\\x07\\x0dstep 00999 | val bpb 0.1\n\\x1b[2K\\x9b2Kforged\\u202e"
    report = write_report(tmp_path, CONFIG, None, {"min_validation_loss": 2.5}).read_text()
    deck = training_deck_html(tmp_path, CONFIG, None, {})
    assert f"```\n{spelled}\n```" in report and "**Say\\\\x1b\\[8m**" in report
    assert f"<td>{spelled}</td>" in deck
    for text in (report, deck):
        assert not [c for c in text if c not in "\t\n" and unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp")]


def test_samples_that_start_with_newlines_are_not_blank(tmp_path):
    tracker = Tracker(CONFIG, tmp_path)
    tracker.log_samples(5, [{"prompt": "List:", "completion": "\n\n- one\n- two"}])
    tracker.finish()
    text = write_report(tmp_path, CONFIG, None, {"min_validation_loss": 2.5, "final_validation_bpb": 2.10971}
                        ).read_text()
    assert "**List:**\n\n```\n\n\n- one\n- two\n```" in text
    assert "| min validation loss | 2.5000 |" in text and "| final validation bpb | 2.1097 |" in text  # as logged
