"""Which model class serves which `config.architectures` entry."""

from __future__ import annotations

from torch import nn

from pinfer.config import ModelConfig
from pinfer.errors import UnsupportedArchitectureError
from pinfer.model.llama import LlamaForCausalLM

MODEL_CLASSES: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
}


def check_architecture(hf_config: dict) -> None:
    """Fail early, before reading shape fields, for a checkpoint we have no model code for."""
    architectures = hf_config.get("architectures") or []
    if not architectures:
        raise UnsupportedArchitectureError("config.json has no 'architectures' entry; cannot pick the model code")
    if architectures[0] not in MODEL_CLASSES:
        raise UnsupportedArchitectureError(
            f"unsupported architecture {architectures[0]!r}; supported: {', '.join(MODEL_CLASSES)}"
        )


def model_class_for(config: ModelConfig) -> type[nn.Module]:
    check_architecture({"architectures": [config.architecture]})
    if config.hidden_act != "silu":
        raise UnsupportedArchitectureError(
            f"unsupported activation {config.hidden_act!r} for {config.architecture}; only 'silu' (SwiGLU) is implemented"
        )
    return MODEL_CLASSES[config.architecture]
