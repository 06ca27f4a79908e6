"""`pinfer convert SRC OUT`: GGUF <-> Hugging Face safetensors. The direction follows SRC:

    pinfer convert model.gguf hf-folder [--dtype float32|bfloat16|float16]    # gguf_to_hf.py
    pinfer convert hf-folder model.gguf [--outtype F16|BF16|Q8_0|F32]         # hf_to_gguf.py

Every argument is checked before any weight is read; the output appears only when complete.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pinfer.errors import PinferError

GGUF_OUTTYPES = ("F16", "BF16", "Q8_0", "F32")
HF_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class ConvertPlan:
    src: Path
    out: Path
    to_gguf: bool  # HF folder -> GGUF file; else GGUF file -> HF folder
    outtype: str  # GGUF tensor type (to_gguf)
    dtype: str  # safetensors dtype (not to_gguf)


def plan_conversion(src: str, out: str, outtype: str | None = None, dtype: str | None = None,
                    force: bool = False) -> ConvertPlan:
    """Validate the arguments (cheap: headers and config only) or raise PinferError."""
    from pinfer.loading.resolve import resolve_model

    src_path = resolve_model(src)  # alias, .gguf file or folder with config.json; clear error otherwise
    out_path = Path(out).expanduser()
    if out_path.exists() and not force:
        raise PinferError(f"output {out_path} already exists; pass --force to replace it")
    if out_path.resolve() == src_path.resolve():
        raise PinferError("the output must not be the source")
    if not out_path.parent.is_dir():
        raise PinferError(f"the output's folder {out_path.parent} does not exist")
    to_gguf = src_path.is_dir()
    if to_gguf:
        if dtype is not None:
            raise PinferError("--dtype is for GGUF -> Hugging Face; for a GGUF output use --outtype")
        outtype = (outtype or "F16").upper()
        if outtype not in GGUF_OUTTYPES:
            raise PinferError(f"unknown --outtype {outtype!r}; choose from {', '.join(GGUF_OUTTYPES)}")
        if out_path.suffix != ".gguf":
            raise PinferError(f"converting a Hugging Face folder writes a GGUF file: OUT must end in .gguf, got {out}")
        from pinfer.tools.gguf_vocab import check_byte_level_bpe
        from pinfer.tools.hf_to_gguf import check_convertible

        try:
            hf_config = json.loads((src_path / "config.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise PinferError(f"cannot read {src_path / 'config.json'}: {e}") from e
        check_convertible(hf_config)
        check_byte_level_bpe(src_path)
        return ConvertPlan(src_path, out_path, True, outtype, "")
    if outtype is not None:
        raise PinferError("--outtype is for Hugging Face -> GGUF; for a Hugging Face output use --dtype")
    dtype = dtype or "float32"
    if dtype not in HF_DTYPES:
        raise PinferError(f"unknown --dtype {dtype!r}; choose from {', '.join(HF_DTYPES)}")
    if out_path.suffix == ".gguf":
        raise PinferError(f"SRC is a GGUF file, so OUT is a Hugging Face folder; {out} ends in .gguf")
    from pinfer.loading.loader import open_checkpoint

    open_checkpoint(src_path)  # parses the header: a corrupt file or unknown architecture fails here
    return ConvertPlan(src_path, out_path, False, "", dtype)


def convert(plan: ConvertPlan) -> None:
    if plan.to_gguf:
        from pinfer.tools.hf_to_gguf import hf_to_gguf

        hf_to_gguf(plan.src, plan.out, plan.outtype)
    else:
        from pinfer.tools.gguf_to_hf import gguf_to_hf

        gguf_to_hf(plan.src, plan.out, plan.dtype)


def cmd_convert(args: argparse.Namespace) -> int:
    plan = plan_conversion(args.src, args.out, args.outtype, args.dtype, args.force)
    start = time.perf_counter()
    convert(plan)
    kind = f"GGUF {plan.outtype}" if plan.to_gguf else f"Hugging Face folder ({plan.dtype})"
    print(f"wrote {plan.out} ({kind}) in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    return 0


def add_convert_parser(subparsers) -> None:
    """Register `convert` on the `pinfer` command's subparsers."""
    parser = subparsers.add_parser(
        "convert", help="convert GGUF -> Hugging Face safetensors folder, or a folder -> GGUF",
        description="The direction follows SRC: a .gguf file becomes a Hugging Face folder, "
                    "a Hugging Face folder becomes a .gguf file (llama.cpp's layout).",
    )
    parser.add_argument("src", help="a .gguf file, a Hugging Face checkpoint folder, or an alias")
    parser.add_argument("out", help="the folder (from GGUF) or .gguf file (from a folder) to write")
    parser.add_argument("--outtype", default=None,
                        help=f"GGUF tensor type: {', '.join(GGUF_OUTTYPES)} (default: F16; norms stay F32)")
    parser.add_argument("--dtype", default=None,
                        help=f"safetensors dtype from GGUF: {', '.join(HF_DTYPES)} (default: float32)")
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists")
    parser.set_defaults(func=cmd_convert)
