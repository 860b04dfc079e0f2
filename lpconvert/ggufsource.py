"""A .gguf file as a model source: its tensors under Hugging Face names, each dequantised when it is read.

The gguf package's reader maps the file into memory and finds every tensor; nothing is read until a stage asks for
a tensor. The names, the per-architecture fix-ups (llama.cpp stores Llama's q and k rows permuted for its rotary
layout; Gemma's norms as 1 + weight) and the config are transformers' own GGUF code (its TensorProcessors and
get_gguf_hf_weights_map, run on a meta-device model), so a tensor read here is the one
`from_pretrained(gguf_file=...)` loads, in float32. A 70B GGUF then streams like a safetensors folder: one layer's
tensors dequantised at a time, never the whole model.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from .checkpoint import TensorInfo, TensorStore


class GGUFStore(TensorStore):
    """The tensors of one GGUF file, dequantised to float32 one at a time."""

    def __init__(self, path: Path):
        from accelerate import init_empty_weights
        from gguf import GGUFReader
        from transformers import CONFIG_MAPPING, AutoModelForCausalLM
        from transformers.modeling_gguf_pytorch_utils import (
            TENSOR_PROCESSORS,
            TensorProcessor,
            get_gguf_hf_weights_map,
            load_gguf_checkpoint,
            read_field,
        )

        self.path = Path(path)
        self.parsed = load_gguf_checkpoint(str(self.path), return_tensors=False)  # metadata only
        self.reader = GGUFReader(str(self.path))
        architecture = read_field(self.reader, "general.architecture")[0]
        self.processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=self.parsed["config"])
        # The config as AutoConfig.from_pretrained(gguf_file=...) builds it, from the metadata parsed once here.
        fields = dict(self.parsed["config"])
        self.config = CONFIG_MAPPING[fields["model_type"]].from_dict(fields)
        with init_empty_weights():
            meta = AutoModelForCausalLM.from_config(self.config)
        self.config.architectures = [type(meta).__name__]
        self.mapping = get_gguf_hf_weights_map(meta, self.processor)
        shapes = {name: tuple(t.shape) for name, t in meta.state_dict().items()}
        self._tensors = {self.mapping[t.name]: t for t in self.reader.tensors if t.name in self.mapping}
        self._infos = {name: TensorInfo(shapes[name], torch.float32) for name in self._tensors}

    def infos(self) -> Mapping[str, TensorInfo]:
        return self._infos

    def read(self, name: str) -> torch.Tensor:
        from gguf import dequantize

        tensor = self._tensors[name]
        result = self.processor.process(weights=dequantize(tensor.data, tensor.tensor_type), name=tensor.name,
                                        tensor_key_mapping=self.mapping, parsed_parameters=self.parsed)
        return torch.from_numpy(np.array(result.weights, dtype=np.float32)).reshape(self._infos[name].shape)
