"""Which method reads a saved folder (``folder_method``, JSON only): the method that wrote it, and for a peft
adapter of a type lmwright does not train (LoHa) the shared peft loader, so load and export still work."""

from __future__ import annotations

import torch

from lmwright.methods import MethodConfig, apply_method, folder_method, load_trained, save_trained


def _base(tokenizer, tmp_path):
    from lmwright.models import ModelConfig, build_model

    model = build_model(ModelConfig(name="llama-tiny", dtype="float32"), task="causal-lm", tokenizer=tokenizer, seed=0)
    model.save_pretrained(str(tmp_path / "base"))
    tokenizer.save_pretrained(str(tmp_path / "base"))
    return model.eval()


def test_the_writing_method_reads_its_folder(tokenizer, tmp_path):
    base = _base(tokenizer, tmp_path)
    for name in ("dora", "prompt"):
        cfg = MethodConfig(name=name, r=4, num_virtual_tokens=4)
        save_trained(apply_method(base, cfg, "causal-lm"), cfg, tmp_path / name, base_path=tmp_path / "base")
        m = folder_method(tmp_path / name)
        assert m is not None and m.name == name and m.reads(tmp_path / name) == 2
        base = _base(tokenizer, tmp_path)  # apply consumed it
    assert folder_method(tmp_path / "base") is None  # a plain model folder


def test_a_foreign_peft_adapter_loads_and_exports(tokenizer, tmp_path):
    from peft import LoHaConfig, get_peft_model

    from lmwright.export.source import inspect_source

    model = get_peft_model(_base(tokenizer, tmp_path), LoHaConfig(r=2, target_modules=["q_proj", "v_proj"],
                                                                  init_weights=False))
    model.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    model.save_pretrained(str(tmp_path / "loha"))
    m = folder_method(tmp_path / "loha")
    assert m is not None and m.reads(tmp_path / "loha") == 1
    ids = torch.randint(5, len(tokenizer), (1, 8), generator=torch.Generator().manual_seed(0))
    loaded, _ = load_trained(tmp_path / "loha", task="causal-lm")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits)
    _, meta, _ = inspect_source(tmp_path / "loha")  # export accepts it (merge through peft's merge_and_unload)
    assert meta["adapter"] == "unrecognised adapter"
