"""pinfer: a readable, fast LLM inference engine built on PyTorch."""

from pinfer.outputs import CompletionOutput, Logprob, RequestOutput
from pinfer.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Import the engine lazily: `import pinfer` stays light (no torch model code) for tools that only need params.
    if name == "LLM":
        from pinfer.entrypoints.llm import LLM

        return LLM
    raise AttributeError(f"module 'pinfer' has no attribute {name!r}")
