"""The fine-tuned model saved at the end of fit: plain transformers loads it and computes what the module computed."""

import os
import stat

import lightning as L
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hft_lightning import Curriculum, HFTModule, Stage
from hft_lightning.data.sft import encode_example
from hft_lightning.export import save_model
from tests.helpers import TINY_MODEL, make_trainer, tiny_datamodule

TWO_STAGES = [Stage("math", 2, {"math": 1.0}), Stage("code", 2, {"code": 1.0})]


def fit_tiny(root, name_or_path=None, callbacks=(), **model_overrides):
    """Fits the embedded tiny model (or the checkpoint at ``name_or_path``) for two stages of two steps."""
    L.seed_everything(0)
    data = tiny_datamodule(tokenizer_name_or_path=name_or_path and str(name_or_path))
    overrides = {"max_new_tokens": 4} if name_or_path else TINY_MODEL
    module = HFTModule(data.tokenizer, name_or_path=name_or_path and str(name_or_path), **overrides, **model_overrides)
    trainer = make_trainer(root, [Curriculum(TWO_STAGES), *callbacks])
    trainer.fit(module, datamodule=data)
    return module, data


def assert_same_logits(module, data, loaded_model, loaded_tokenizer):
    """The loaded tokenizer encodes like the run's, and the loaded model gives the trained module's logits."""
    examples = [data.abilities[0].val[i] for i in range(3)]
    for example in examples:
        assert torch.equal(
            encode_example(loaded_tokenizer, example)["input_ids"], encode_example(data.tokenizer, example)["input_ids"]
        )
    batch = data.collate([("math", i) for i in range(3)])
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    module.eval()
    with torch.no_grad():
        expected, actual = module.model(**inputs).logits, loaded_model.eval()(**inputs).logits
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    assert expected.abs().max() > 0


@pytest.mark.parametrize("pretrained", [False, True], ids=["embedded", "pretrained"])
def test_fit_saves_a_model_plain_transformers_loads_with_the_same_logits(tmp_path, tiny_pretrained, pretrained):
    module, data = fit_tiny(tmp_path, tiny_pretrained if pretrained else None)
    saved = tmp_path / "model"
    assert (tmp_path / "report" / "metrics.json").exists() and (saved / "config.json").exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left
    initial = AutoModelForCausalLM.from_pretrained(tiny_pretrained) if pretrained else None
    loaded = AutoModelForCausalLM.from_pretrained(saved)
    assert_same_logits(module, data, loaded, AutoTokenizer.from_pretrained(saved))
    if initial is not None:  # and it is the trained model, not the checkpoint it started from
        assert not torch.equal(initial.lm_head.weight, loaded.lm_head.weight)


def test_an_interrupted_save_leaves_the_previous_model_whole(tmp_path, tiny_data, monkeypatch):
    module = HFTModule(tiny_data.tokenizer, **TINY_MODEL)
    save_model(tmp_path / "model", module.model, tiny_data.tokenizer)
    before = {p.name: p.read_bytes() for p in (tmp_path / "model").iterdir()}
    with torch.no_grad():
        module.model.lm_head.weight.add_(1.0)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(type(tiny_data.tokenizer), "save_pretrained", crash)
    with pytest.raises(KeyboardInterrupt):
        save_model(tmp_path / "model", module.model, tiny_data.tokenizer)
    assert {p.name: p.read_bytes() for p in (tmp_path / "model").iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    monkeypatch.undo()
    save_model(tmp_path / "model", module.model, tiny_data.tokenizer)  # and a complete save replaces it
    assert (tmp_path / "model" / "model.safetensors").read_bytes() != before["model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_the_saved_folder_has_the_umask_permissions_and_leftovers_of_killed_saves_go(tmp_path, tiny_data):
    module = HFTModule(tiny_data.tokenizer, **TINY_MODEL)
    killed = [tmp_path / ".model.staging-3f2a9c", tmp_path / ".model.old-b71e04"]  # what kill -9 mid-save leaves
    for leftover in killed:
        (leftover / "model").mkdir(parents=True)
    unrelated = [tmp_path / ".model-backup", tmp_path / ".model.staging"]
    for folder in unrelated:
        folder.mkdir()
    umask = os.umask(0o022)
    try:
        save_model(tmp_path / "model", module.model, tiny_data.tokenizer)
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "model").stat().st_mode) == 0o755  # readable by others, as any new folder
    assert not any(p.exists() for p in killed) and all(p.exists() for p in unrelated)
