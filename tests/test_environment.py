import torch

from nanochat_flyte.reporting.environment import environment_report, format_report


def test_report_has_the_promised_fields(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "secret-value-1234")
    report = environment_report()
    for key in ("python", "torch", "cuda", "gpu_name", "gpu_memory_gib", "compute_capability", "bf16_supported",
                "cpu_count", "ram_gib", "wandb_key_available"):
        assert key in report
    assert report["torch"] == torch.__version__
    assert report["wandb_key_available"] is True
    assert report["cpu_count"] >= 1 and report["ram_gib"] > 0
    assert "secret-value-1234" not in format_report(report)


def test_no_key_reported_as_unavailable(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "absent"))
    assert environment_report()["wandb_key_available"] is False


def test_gpu_fields_follow_the_device(monkeypatch):
    class FakeProps:  # what torch reports for a T4
        name, total_memory, major, minor = "Tesla T4", 15 * 2**30, 7, 5

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: FakeProps)
    report = environment_report()
    assert (report["gpu_name"], report["compute_capability"], report["bf16_supported"]) == ("Tesla T4", "7.5", False)
