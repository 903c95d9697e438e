"""The tensor-by-tensor (pread) checkpoint loader gives exactly what `from_pretrained` gives.

Checkpoints are tiny but saved like real ones (`save_pretrained`, bf16): a Llama-2-style one with a
separate LM head, a Qwen2-style one with tied embeddings, the Llama one in shards, and the Llama one
saved in fp32 and loaded as bf16.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from llara_dist.errors import CheckpointError
from llara_dist.model.hf_loading import load_causal_lm
from tests.conformance.families import make_checkpoint

TITLES = [f"Movie {i} the great adventure" for i in range(40)]
TENSOR = "model.layers.1.mlp.up_proj.weight"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("hf-loading")
    out = {family: make_checkpoint(family, TITLES, root / family) for family in ("llama2", "qwen2")}
    llama = AutoModelForCausalLM.from_pretrained(out["llama2"], dtype=torch.bfloat16)
    llama.save_pretrained(root / "sharded", max_shard_size="100KB")
    llama.to(torch.float32).save_pretrained(root / "fp32")
    (root / "sharded" / "generation_config.json").unlink()  # from_pretrained then derives it from config.json
    out.update(sharded=root / "sharded", fp32=root / "fp32")
    assert len(list(out["sharded"].glob("*.safetensors"))) > 2
    return out


@pytest.mark.parametrize("case", ["llama2", "qwen2", "sharded", "fp32"])
def test_loader_equals_from_pretrained(checkpoints, case):
    from transformers import AutoModelForCausalLM

    path = checkpoints[case]
    want = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map="cpu", local_files_only=True)
    got = load_causal_lm(path, dtype=torch.bfloat16, device="cpu")

    assert type(got) is type(want) and not got.training
    w, g = want.state_dict(), got.state_dict()
    assert list(g) == list(w)
    for name in w:
        assert g[name].dtype == torch.bfloat16 and torch.equal(g[name], w[name]), name
    # Non-persistent buffers (rotary inv_freq) are computed, not read: they must hold real values.
    wb, gb = dict(want.named_buffers()), dict(got.named_buffers())
    assert list(gb) == list(wb) and gb
    for name in wb:
        assert torch.equal(gb[name], wb[name]) and gb[name].abs().sum() > 0, name
    tied = got.get_output_embeddings().weight is got.get_input_embeddings().weight
    assert tied == (case == "qwen2") == (want.get_output_embeddings().weight is want.get_input_embeddings().weight)
    assert got.config.to_dict() == want.config.to_dict()
    assert got.generation_config.to_dict() == want.generation_config.to_dict()
    ids = torch.tensor([[1, 5, 9, 30, 2, 7]])
    with torch.no_grad():
        assert torch.equal(got(input_ids=ids).logits, want(input_ids=ids).logits)


@pytest.mark.parametrize("fault", ["missing", "shape"])
def test_missing_or_misshaped_tensor_names_file_and_tensor(checkpoints, tmp_path, fault):
    from safetensors.torch import load_file, save_file

    src = checkpoints["llama2"]
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    tensors = load_file(src / "model.safetensors")
    if fault == "missing":
        del tensors[TENSOR]
    else:
        tensors[TENSOR] = tensors[TENSOR][:-1].clone()
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as err:
        load_causal_lm(bad, dtype=torch.bfloat16, device="cpu")
    msg = str(err.value)
    assert str(bad / "model.safetensors") in msg and repr(TENSOR) in msg
    assert ("(128, 64)" in msg) and (fault == "missing" or "(127, 64)" in msg)


def test_build_model_onto_a_device_uses_the_loader(checkpoints, monkeypatch):
    # meta stands in for an accelerator: the base is read tensor by tensor (the real loader, only
    # watched) and placed there, and build_model still adds the LLaRA rows, LoRA and the projector.
    from llara_dist.config import load_config
    from llara_dist.model import llara
    from tests.conftest import TINY_CONFIG

    calls = []
    monkeypatch.setattr(llara, "load_causal_lm", lambda *a, **k: calls.append(k["device"]) or load_causal_lm(*a, **k))
    cfg = load_config(TINY_CONFIG, [f"model.name_or_path={checkpoints['qwen2']}", "model.dtype=bfloat16"])
    model = llara.build_model(cfg, llara.load_tokenizer(cfg.model, TITLES), rec_dim=8, device="meta")
    assert calls == ["meta"]
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert model.lm.get_base_model().config.name_or_path == str(checkpoints["qwen2"])
