"""Hugging Face checkpoint folders: config.json + one or many *.safetensors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open

from pinfer.errors import ModelLoadError


class SafetensorsCheckpoint:
    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            self.config = json.loads((self.path / "config.json").read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelLoadError(f"cannot read {self.path / 'config.json'}: {exc}") from exc
        self.files = self._weight_files()

    def validate(self) -> None:
        """Open every file's header now, so a corrupt file fails before any work."""
        for file in self.files:
            self._open(file).keys()

    def _weight_files(self) -> list[Path]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, json.JSONDecodeError, KeyError) as exc:
                raise ModelLoadError(f"cannot read shard index {index}: {exc}") from exc
            files = [self.path / name for name in sorted(set(weight_map.values()))]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise ModelLoadError(f"{index} names shard files that do not exist: {', '.join(missing)}")
            return files
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise ModelLoadError(f"checkpoint folder {self.path} has no *.safetensors files")
        return files

    @staticmethod
    def _open(file: Path):
        try:
            return safe_open(str(file), framework="pt", device="cpu")
        except Exception as exc:  # safetensors raises its own error types for corrupt headers
            raise ModelLoadError(f"cannot read safetensors file {file} (corrupt or truncated?): {exc}") from exc

    def weights(self, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
        for file in self.files:
            handle = self._open(file)
            for name in handle.keys():
                try:
                    tensor = handle.get_tensor(name)
                except Exception as exc:
                    raise ModelLoadError(f"cannot read tensor {name!r} from {file} (truncated file?): {exc}") from exc
                yield name, tensor.to(dtype)

    def load_tokenizer(self):
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(self.path)
        except Exception as exc:
            raise ModelLoadError(f"cannot load the tokenizer from {self.path}: {exc}") from exc
