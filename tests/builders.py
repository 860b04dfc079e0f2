"""Builders of test checkpoints shared by several test modules."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def save_sharded_bin(model, folder: Path) -> dict[str, torch.Tensor]:
    """Save MODEL as a two-shard .bin checkpoint (config + pytorch_model.bin.index.json); return its state."""
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    state = {n: t.clone() for n, t in model.state_dict().items()}  # clone: untie lm_head
    names = sorted(state)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        file = f"pytorch_model-0000{i + 1}-of-00002.bin"
        torch.save({n: state[n] for n in part}, folder / file)
        weight_map.update(dict.fromkeys(part, file))
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    return state
