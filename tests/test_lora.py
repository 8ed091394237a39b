"""LoRA via peft: only adapters train, retention protects exactly them, the model saves merged or as an adapter."""

import subprocess
import sys

import pytest
import torch
from peft import AutoPeftModelForCausalLM
from transformers import AutoModelForCausalLM, AutoTokenizer

from hft_lightning import HFTModule
from hft_lightning.curriculum import Curriculum
from hft_lightning.errors import ConfigError
from hft_lightning.lora import LoRA
from hft_lightning.retention import EWC
from tests.test_export import assert_same_logits, fit_tiny


@pytest.mark.parametrize("save", ["merged", "adapter"])
def test_only_adapters_train_ewc_protects_them_and_the_model_saves(tmp_path, tiny_pretrained, save):
    ewc = EWC(lam=10.0, fisher_samples=2)
    lora = LoRA(r=4, alpha=8.0, target_modules=["q_proj", "v_proj"], save=save)
    module, data = fit_tiny(tmp_path, tiny_pretrained, [ewc], lora=lora)
    adapters = {n for n, _ in module.named_parameters() if ".lora_A." in n or ".lora_B." in n}
    assert len(adapters) == 4  # A and B of q_proj and v_proj in the one layer
    assert {n for n, p in module.named_parameters() if p.requires_grad} == adapters
    [state] = ewc.consolidated
    assert set(state["fisher"]) == set(state["anchor"]) == adapters
    assert all(t.dtype == torch.float32 for t in (*state["fisher"].values(), *state["anchor"].values()))
    initial = AutoModelForCausalLM.from_pretrained(tiny_pretrained)
    base = module.model.get_base_model()
    torch.testing.assert_close(base.model.embed_tokens.weight, initial.model.embed_tokens.weight, rtol=0, atol=0)
    assert base.model.layers[0].self_attn.q_proj.lora_B.default.weight.abs().max() > 0  # B starts at 0: it trained
    saved = tmp_path / "model"
    if save == "merged":
        loaded = AutoModelForCausalLM.from_pretrained(saved)  # a plain model: no adapter files, no peft layers
        assert not (saved / "adapter_config.json").exists() and "lora" not in str(dict(loaded.named_parameters()))
    else:
        assert (saved / "adapter_config.json").exists() and not (saved / "config.json").exists()
        loaded = AutoPeftModelForCausalLM.from_pretrained(saved)  # the base model named in adapter_config.json
    assert_same_logits(module, data, loaded, AutoTokenizer.from_pretrained(saved))


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"r": 0}, r"model\.lora\.r and model\.lora\.alpha must be > 0, got r=0"),
        ({"alpha": -1.0}, r"model\.lora\.r and model\.lora\.alpha must be > 0"),
        ({"dropout": 1.0}, r"model\.lora\.dropout must be in \[0, 1\)"),
        ({"target_modules": []}, r"model\.lora\.target_modules is empty"),
        ({"save": "gguf"}, r"model\.lora\.save: unknown mode 'gguf'; allowed: merged, adapter"),
    ],
)
def test_bad_lora_settings_name_the_field(settings, message):
    with pytest.raises(ConfigError, match=message):
        LoRA(**settings)


def test_lora_needs_a_pretrained_model_with_the_target_layers(tiny_data, tiny_pretrained):
    with pytest.raises(ConfigError, match=r"model\.lora adapts a pretrained model: set model\.name_or_path"):
        HFTModule(tiny_data.tokenizer, lora=LoRA())
    with pytest.raises(ConfigError, match=r"model\.lora\.target_modules=\['c_attn'\]: .*c_attn"):
        HFTModule(tiny_data.tokenizer, name_or_path=str(tiny_pretrained), lora=LoRA(target_modules=["c_attn"]))


def test_peft_is_optional(tmp_path):
    """The package imports and builds a module without peft; asking for LoRA then names the extra to install."""
    script = """
import sys
sys.modules["peft"] = None  # import peft raises ImportError
from hft_lightning import HFTModule, StagedDataModule
from hft_lightning.cli import main
from hft_lightning.errors import ConfigError
from hft_lightning.curriculum import Curriculum
from hft_lightning.lora import LoRA
from tests.helpers import TINY_MODEL, tiny_datamodule
data = tiny_datamodule(abilities=["builtin:math"])
HFTModule(data.tokenizer, **TINY_MODEL)
try:
    LoRA().wrap(None)
except ConfigError as error:
    print(error)
"""
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "model.lora needs peft, which is not installed: pip install 'hft_lightning[lora]'" in completed.stdout


def test_a_lora_checkpoint_resumes_and_loads_under_weights_only(tmp_path, tiny_pretrained):
    """The LoRA settings saved with the hyperparameters load under torch.load's default ``weights_only=True``."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from tests.helpers import make_trainer, tiny_datamodule
    from tests.test_export import TWO_STAGES

    lora = LoRA(r=4, alpha=8.0, target_modules=["q_proj"], save="adapter")
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1)
    uninterrupted, data = fit_tiny(tmp_path / "a", tiny_pretrained, [checkpoint], lora=lora)
    loaded = HFTModule.load_from_checkpoint(tmp_path / "ckpt" / "epoch=1-step=4.ckpt", tokenizer=data.tokenizer)
    assert loaded.lora == lora
    trained = {n: p for n, p in uninterrupted.named_parameters() if p.requires_grad}
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == set(trained)
    for name, param in loaded.named_parameters():
        torch.testing.assert_close(param, dict(uninterrupted.named_parameters())[name], rtol=0, atol=0, msg=name)
    resumed = HFTModule(data.tokenizer, name_or_path=str(tiny_pretrained), max_new_tokens=4, lora=lora)
    trainer = make_trainer(tmp_path / "b", [Curriculum(TWO_STAGES)])
    trainer.fit(resumed, datamodule=tiny_datamodule(tokenizer_name_or_path=str(tiny_pretrained)),
                ckpt_path=tmp_path / "ckpt" / "epoch=0-step=2.ckpt")  # fmt: skip
    assert trainer.global_step == 4
    for name, param in resumed.named_parameters():
        torch.testing.assert_close(param, dict(uninterrupted.named_parameters())[name], rtol=0, atol=1e-6, msg=name)


def test_a_saved_adapter_names_a_local_base_model_by_its_absolute_path(tmp_path, tiny_pretrained, monkeypatch):
    import json

    from hft_lightning.data.tokenizer import load_tokenizer
    from hft_lightning.export import save_model

    monkeypatch.chdir(tiny_pretrained.parent)
    tokenizer = load_tokenizer(tiny_pretrained.name)
    lora = LoRA(target_modules=["q_proj"], save="adapter")
    module = HFTModule(tokenizer, name_or_path=tiny_pretrained.name, lora=lora)  # relative to the working directory
    save_model(tmp_path / "model", module.model, tokenizer, lora, module.name_or_path)
    config = json.loads((tmp_path / "model" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == module.hparams.name_or_path == str(tiny_pretrained.resolve())
    monkeypatch.chdir(tmp_path)
    AutoPeftModelForCausalLM.from_pretrained(tmp_path / "model")  # from anywhere
