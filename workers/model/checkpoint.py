"""Reads tensors from a Hugging Face safetensors checkpoint, single file or sharded.

Only the tensors asked for are read: an expert rank opens just its own experts. This module knows
the file layout and tensor names, not what the tensors mean.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """The checkpoint is missing a file or tensor, or a tensor is unreadable or has the wrong shape."""


def expert_tensor_name(layer: int, expert: int, which: str) -> str:
    """`which` is w1 (gate), w3 (up) or w2 (down), as Mixtral names them."""
    return f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{which}.weight"


class CheckpointReader:
    """Maps tensor names to files and loads the requested tensors, checking their shapes."""

    def __init__(self, model_dir: str | Path) -> None:
        self.model_dir = Path(model_dir)
        self.file_of_tensor = self._index()

    def _index(self) -> dict[str, Path]:
        index_path = self.model_dir / INDEX_FILE
        single_path = self.model_dir / SINGLE_FILE
        if index_path.exists():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise CheckpointError(f"cannot read shard index {index_path}: {exc}") from exc
            return {name: self.model_dir / file for name, file in weight_map.items()}
        if single_path.exists():
            return {name: single_path for name in _tensor_names(single_path)}
        raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in {self.model_dir}")

    def load(
        self,
        expected_shapes: dict[str, tuple[int, ...]],
        *,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> dict[str, torch.Tensor]:
        """Load exactly the named tensors, each checked against its expected shape."""
        missing = [name for name in expected_shapes if name not in self.file_of_tensor]
        if missing:
            raise CheckpointError(
                f"checkpoint {self.model_dir} is missing tensor {missing[0]}"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            )
        by_file: dict[Path, list[str]] = {}
        for name in expected_shapes:
            by_file.setdefault(self.file_of_tensor[name], []).append(name)
        tensors: dict[str, torch.Tensor] = {}
        for path, names in by_file.items():
            tensors.update(_read_file(path, names))
        for name, shape in expected_shapes.items():
            if tuple(tensors[name].shape) != tuple(shape):
                raise CheckpointError(
                    f"tensor {name} in {self.file_of_tensor[name].name} has shape "
                    f"{tuple(tensors[name].shape)}, expected {tuple(shape)}"
                )
            tensors[name] = tensors[name].to(device=device, dtype=dtype)
        return tensors


def _tensor_names(path: Path) -> Iterable[str]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            return list(handle.keys())
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(f"cannot read checkpoint file {path}: {exc}") from exc


def _read_file(path: Path, names: list[str]) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise CheckpointError(f"checkpoint file {path} (holding {names[0]}) does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            present = set(handle.keys())
            for name in names:
                if name not in present:
                    raise CheckpointError(f"tensor {name} is not in {path.name} as the index claims")
            return {name: handle.get_tensor(name) for name in names}
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(f"cannot read checkpoint file {path}: {exc}") from exc
