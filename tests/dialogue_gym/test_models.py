"""dialogue_gym.models: atomic model directories, the random-weight copy of the embedded architecture."""

from __future__ import annotations

import pytest
import torch

from dialogue_gym import models
from dialogue_gym.models import load_model, save_model_dir


def test_save_model_dir_writes_a_loadable_copy_and_keeps_an_existing_one(tmp_path):
    model, tokenizer = load_model("tiny", shared=False, dtype="float32", device="cpu")
    target = save_model_dir(model, tokenizer, tmp_path / "copy")
    assert (target / "config.json").is_file() and not list(tmp_path.glob(".copy-*"))
    again, _ = load_model(str(target), shared=False, dtype="float32", device="cpu")
    name = next(iter(model.state_dict()))
    assert torch.equal(again.state_dict()[name], model.state_dict()[name])
    # a second writer that finds the directory there keeps the first copy and leaves no temporary behind
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    save_model_dir(model, tokenizer, target)
    kept, _ = load_model(str(target), shared=False, dtype="float32", device="cpu")
    assert torch.equal(kept.state_dict()[name], again.state_dict()[name])
    assert not list(tmp_path.glob(".copy-*"))


def test_save_model_dir_keeps_a_copy_renamed_in_between_its_check_and_its_rename(tmp_path, monkeypatch):
    """Two processes (pytest-xdist workers, leaderboard jobs) writing the same cache directory: the one whose rename
    comes second finds the directory non-empty, keeps the other's copy and removes its own temporary."""
    model, tokenizer = load_model("tiny", shared=False, dtype="float32", device="cpu")
    first = save_model_dir(model, tokenizer, tmp_path / "first")
    name = next(iter(model.state_dict()))
    original = model.state_dict()[name].clone()
    target = tmp_path / "copy"
    real_replace = models.os.replace

    def other_process_first(src, dst):
        real_replace(str(first), str(dst))  # the other writer's rename lands after this one's exists() check
        return real_replace(src, dst)  # a non-empty directory: OSError

    monkeypatch.setattr(models.os, "replace", other_process_first)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    assert save_model_dir(model, tokenizer, target) == target
    kept, _ = load_model(str(target), shared=False, dtype="float32", device="cpu")
    assert torch.equal(kept.state_dict()[name], original)  # the other writer's copy, not this one's
    assert not list(tmp_path.glob(".copy-*"))


def test_save_model_dir_raises_a_rename_error_when_no_copy_is_there(tmp_path, monkeypatch):
    model, tokenizer = load_model("tiny", shared=False, dtype="float32", device="cpu")

    def refused(src, dst):
        raise PermissionError(13, "Permission denied", str(dst))

    monkeypatch.setattr(models.os, "replace", refused)
    with pytest.raises(PermissionError):
        save_model_dir(model, tokenizer, tmp_path / "copy")
    assert not list(tmp_path.glob(".copy-*")) and not (tmp_path / "copy").exists()


def test_cpu_bf16_support_is_read_from_the_cpu_flags(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor : 0\nflags : fpu sse avx2 avx512f avx512_bf16 amx_tile\n")
    assert models.cpu_has_bf16_matmul(info) is True
    info.write_text("processor : 0\nflags : fpu sse avx2 avx512f\n")
    assert models.cpu_has_bf16_matmul(info) is False
    assert models.cpu_has_bf16_matmul(tmp_path / "missing") is None


def test_bf16_weights_on_a_cpu_without_bf16_matmul_warn_with_the_fix(monkeypatch, caplog):
    monkeypatch.setattr(models, "cpu_has_bf16_matmul", lambda: False)
    with caplog.at_level("WARNING", logger="dialogue_gym.models"):
        model, _ = models.load_model("tiny", dtype="bfloat16", shared=False, device="cpu")
    assert next(model.parameters()).dtype == torch.bfloat16  # loaded as asked, not swapped
    assert "policy.dtype=float32" in caplog.text
    caplog.clear()
    monkeypatch.setattr(models, "cpu_has_bf16_matmul", lambda: True)
    with caplog.at_level("WARNING", logger="dialogue_gym.models"):
        models.load_model("tiny", dtype="bfloat16", shared=False, device="cpu")
    assert caplog.text == ""


@pytest.mark.parametrize("flag, expected", [(True, torch.bfloat16), (False, torch.float32), (None, torch.float32)])
def test_fast_dtype_is_bfloat16_only_on_a_cpu_that_multiplies_it_natively(monkeypatch, flag, expected):
    monkeypatch.setattr(models, "cpu_has_bf16_matmul", lambda: flag)  # None: /proc/cpuinfo unreadable
    assert models.resolve_dtype("fast", "cpu") == expected
    assert models.resolve_dtype(" FAST ", "cpu") == expected
    assert models.resolve_dtype("auto", "cpu") == torch.float32  # auto does not look at the flags


def test_fast_dtype_logs_what_it_chose_and_why(monkeypatch, caplog):
    monkeypatch.setattr(models, "cpu_has_bf16_matmul", lambda: False)
    with caplog.at_level("INFO", logger="dialogue_gym.models"):
        model, _ = models.load_model("tiny", dtype="fast", shared=False, device="cpu")
    assert next(model.parameters()).dtype == torch.float32
    assert "dtype fast is float32 on cpu (no amx_bf16 or avx512_bf16 flag" in caplog.text
    assert "WARNING" not in caplog.text
    caplog.clear()
    monkeypatch.setattr(models, "cpu_has_bf16_matmul", lambda: True)
    with caplog.at_level("INFO", logger="dialogue_gym.models"):
        model, _ = models.load_model("tiny", dtype="fast", shared=False, device="cpu")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert "dtype fast is bfloat16 on cpu (native bfloat16 matmuls)" in caplog.text


def test_an_unknown_dtype_lists_fast_among_the_allowed():
    with pytest.raises(models.DeviceError, match=r"dtype is 'fastest'; allowed: auto .*, fast \(bfloat16 where"):
        models.resolve_dtype("fastest", "cpu")
