"""dialogue_gym.models: atomic model directories, the random-weight copy of the embedded architecture."""

from __future__ import annotations

import torch

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
