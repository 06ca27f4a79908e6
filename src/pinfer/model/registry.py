"""Which model class serves which `config.architectures` entry."""

from __future__ import annotations

from torch import nn

from pinfer.config import ModelConfig
from pinfer.errors import UnsupportedArchitectureError
from pinfer.model.gemma3 import GELU_ACTIVATIONS, Gemma3ForCausalLM
from pinfer.model.llama import LlamaForCausalLM

MODEL_CLASSES: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
    # Sparse MoE MLPs in the Llama-family layer (model/moe.py)
    "Qwen3MoeForCausalLM": LlamaForCausalLM,
    "Qwen2MoeForCausalLM": LlamaForCausalLM,
    "MixtralForCausalLM": LlamaForCausalLM,
    # Phi-3 / Phi-4-mini: checkpoints already fuse qkv and gate/up; partial rotary
    "Phi3ForCausalLM": LlamaForCausalLM,
    "Gemma3ForCausalLM": Gemma3ForCausalLM,
}

# Activations each model class implements (architectures not listed: SwiGLU only).
ACTIVATIONS: dict[str, tuple[str, ...]] = {
    "Gemma3ForCausalLM": tuple(GELU_ACTIVATIONS),
}

# Architectures refused with a specific reason rather than the generic message.
REFUSED: dict[str, str] = {
    "Gemma3ForConditionalGeneration": (
        "Gemma 3 multimodal checkpoints (Gemma3ForConditionalGeneration) are not supported: pinfer has no "
        "vision tower and does not extract the text part; use a text-only Gemma3ForCausalLM checkpoint "
        "(e.g. gemma-3-1b / gemma-3-270m) or a gemma3 GGUF file"
    ),
}


def check_architecture(hf_config: dict) -> None:
    """Fail early, before reading shape fields, for a checkpoint we have no model code for."""
    architectures = hf_config.get("architectures") or []
    if not architectures:
        raise UnsupportedArchitectureError("config.json has no 'architectures' entry; cannot pick the model code")
    if architectures[0] in REFUSED:
        raise UnsupportedArchitectureError(REFUSED[architectures[0]])
    if architectures[0] not in MODEL_CLASSES:
        raise UnsupportedArchitectureError(
            f"unsupported architecture {architectures[0]!r}; supported: {', '.join(MODEL_CLASSES)}"
        )


def model_class_for(config: ModelConfig) -> type[nn.Module]:
    check_architecture({"architectures": [config.architecture]})
    supported = ACTIVATIONS.get(config.architecture, ("silu",))
    if config.hidden_act not in supported:
        if supported == ("silu",):
            detail = "only 'silu' (SwiGLU) is implemented"
        else:
            detail = f"supported: {', '.join(supported)}"
        raise UnsupportedArchitectureError(
            f"unsupported activation {config.hidden_act!r} for {config.architecture}; {detail}"
        )
    return MODEL_CLASSES[config.architecture]
