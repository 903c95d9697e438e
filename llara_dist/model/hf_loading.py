"""Load a local Hugging Face checkpoint onto a device, reading it tensor by tensor.

`from_pretrained` (transformers 5.23) memory-maps each safetensors file and builds every parameter
from the map. On the CPU that is the cheapest there is: the parameters *are* the file's pages in the
page cache (one copy, read lazily, shared by every process that maps the file), so `build_model`
keeps it there. Onto an accelerator every tensor is read through the map for its copy to the
device, and the pages stay mapped until loading ends: up to the whole file in the worker's RSS.
Here each tensor is read with ``pread(2)`` (safetensors' ``pread`` backend, the one transformers
itself uses on Apple MPS) straight into a host tensor of its own and handed to transformers'
ordinary loading through ``state_dict=``, which copies it to the device and drops it: the host holds
only the tensors in flight (transformers reads up to four at a time). On the CPU the tensor becomes
the parameter (one private copy). Everything else (key renames, tied embeddings, dtype conversion,
non-persistent buffers such as the rotary ``inv_freq``, the generation config) is transformers' own
code, so the model equals ``from_pretrained``'s bit for bit (tests/model/test_hf_loading.py).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from llara_dist.errors import CheckpointError

# transformers' file names (transformers.utils.SAFE_WEIGHTS_NAME / SAFE_WEIGHTS_INDEX_NAME)
SAFE_WEIGHTS = "model.safetensors"
SAFE_WEIGHTS_INDEX = "model.safetensors.index.json"


def safetensors_files(path: Path) -> tuple[Path, list[Path]] | None:
    """The file that names the weights (the single file or the shard index) and the files holding
    them, or None when ``path`` has no safetensors weights (e.g. ``pytorch_model.bin``)."""
    single, index = path / SAFE_WEIGHTS, path / SAFE_WEIGHTS_INDEX
    if single.is_file():
        return single, [single]
    if not index.is_file():
        return None
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted({str(v) for v in weight_map.values()})
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{index}: not a safetensors shard index ({type(e).__name__}: {e}); expected "
                              "JSON with a 'weight_map' of tensor name -> shard file") from None
    missing = [s for s in shards if not (path / s).is_file()]
    if missing:
        raise CheckpointError(f"{index}: names shard {missing[0]!r}, which is not in {path}")
    return index, [path / s for s in shards]


def load_causal_lm(path: Path, *, dtype: torch.dtype, device: str | torch.device,
                   attn_implementation: str | None = None) -> PreTrainedModel | None:
    """The causal LM of the local checkpoint ``path`` in ``dtype`` on ``device``, read tensor by
    tensor (see the module docstring); None when ``path`` holds no safetensors weights or an
    architecture transformers' causal-LM auto class does not know (the caller then uses
    ``from_pretrained``, which reports those cases itself)."""
    from safetensors import SafetensorError, safe_open
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig, GenerationConfig

    files = safetensors_files(path)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    if files is None or model_class is None:
        return None
    names_file, shards = files
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    try:  # the generation config from_pretrained(path) would read (transformers' GenerationMixin)
        gen = GenerationConfig.from_pretrained(path, local_files_only=True)
    except OSError:  # no generation_config.json: built from config.json
        gen = GenerationConfig.from_pretrained(path, config_file_name="config.json", _from_model_config=True,
                                               local_files_only=True)
    kwargs["generation_config"] = gen

    with contextlib.ExitStack() as stack:
        state_dict: dict = {}  # tensor name -> _OnDemand; transformers reads each with `value[...]`
        where: dict[str, Path] = {}
        for shard in shards:
            try:
                f = stack.enter_context(safe_open(str(shard), framework="pt", device="cpu", backend="pread"))
                names = list(f.keys())
                for name in names:
                    state_dict[name] = _OnDemand(f, name)
            except SafetensorError as e:
                raise CheckpointError(f"{shard}: not a readable safetensors file: {e}") from None
            where.update(dict.fromkeys(names, shard))
        # Mismatched shapes are reported by _check_loaded, naming the shard (transformers' own error
        # names neither the file nor the tensor).
        model, info = model_class.from_pretrained(None, config=config, state_dict=state_dict, dtype=dtype,
                                                  device_map=str(device), ignore_mismatched_sizes=True,
                                                  output_loading_info=True, **kwargs)
    _check_loaded(model, info, names_file, where)
    # from_pretrained(None, ...) records no source; record the one from_pretrained(path) would.
    model.config.name_or_path = str(path)
    model.name_or_path = model.config.name_or_path
    return model


class _OnDemand:
    """One checkpoint tensor, read when transformers materialises it (``value[...]``, as it does
    with the safetensors slices of its own memory-mapped path). ``get_tensor`` preads straight into
    the tensor; a pread-backed slice would read into a buffer and copy it once more (2x the tensor)."""

    def __init__(self, handle: Any, name: str):
        self.handle, self.name = handle, name

    def __getitem__(self, index: Any) -> torch.Tensor:
        tensor = self.handle.get_tensor(self.name)
        return tensor if index is Ellipsis else tensor[index]

    def get_shape(self) -> list[int]:  # the rest of safetensors' slice interface
        return self.handle.get_slice(self.name).get_shape()

    def get_dtype(self) -> str:
        return self.handle.get_slice(self.name).get_dtype()


def _check_loaded(model: PreTrainedModel, info: dict, names_file: Path, where: dict[str, Path]) -> None:
    """A weight the architecture needs but the checkpoint lacks, or holds in another shape, stops
    the load (from_pretrained would initialise it randomly and only warn)."""
    mismatched = sorted(info.get("mismatched_keys") or (), key=str)  # (name, checkpoint shape, expected)
    if mismatched:
        name, got, want = mismatched[0]
        raise CheckpointError(f"{where.get(name, names_file)}: tensor {name!r} has shape {tuple(got)}, "
                              f"the architecture in config.json expects {tuple(want)}")
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        expected = model.state_dict()
        shape = tuple(expected[missing[0]].shape) if missing[0] in expected else "?"
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{names_file}: no tensor {missing[0]!r} (shape {shape}){more}; the checkpoint "
                              "does not match the architecture in config.json")
