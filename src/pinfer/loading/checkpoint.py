"""What every checkpoint format gives the engine: a Hugging Face style config,
weights under Hugging Face tensor names, and a tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Protocol

import torch


class Checkpoint(Protocol):
    path: Path
    # config.json-style dict: architectures, hidden_size, num_hidden_layers, ...
    config: dict

    def weights(self, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (hf_name, tensor) pairs, e.g. ("model.layers.0.self_attn.q_proj.weight", W)."""
        ...

    def load_tokenizer(self):  # -> transformers.PreTrainedTokenizerBase
        ...
