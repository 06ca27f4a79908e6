"""pinfer's own CPU kernels (cpu_ops.cpp; cpu_ops_avx2.cpp), as torch.ops.pinfer.*: RMSNorm fused
with the residual add, in-place RoPE, SwiGLU, the KV store, paged decode (bf16, float32 and int8
pools) and (bf16) prefill attention, the sampler's plain-temperature path, GEMMs on weights
packed for vpdpbusd (int8 w8a8) and vdpbf16ps (bf16), which is also the operand layout of AMX's
tile instructions (used from 8-16 rows where the CPU has them; PINFER_AMX=0 turns them off), and
a decode step's whole decoder stack in one call (model/fused_decode.py). On CPUs with AVX2 and
FMA but no AVX-512 (AMD Zen 1-3, Intel client cores since Alder Lake) cpu_ops_avx2.cpp builds a
subset: the bf16 GEMM (there neither oneDNN nor aten has a fast bf16 matmul), the int8 GEMM
(exact sums on vpmaddubsw), decode and (short prompts') prefill attention, the norms, RoPE,
SwiGLU, the sampler and the decode stack for bf16 and int8 linears on bf16 pools; on AVX-512
CPUs without AVX512-BF16 it builds the bf16 GEMM. cpu_ops_entry.h holds what both files share.

Why: a profile of SmolLM2 decode on 2 cores put a third of a batch-64 step outside the
matmuls (SDPA plus the page gather, then the sampler's passes over [batch, vocab]), and at
batch 1 a third of the time in the ~30 small aten ops per layer around the matmuls; int8 lost
to bf16 on the ops quantizing its activations. Then the matmuls themselves: oneDNN streamed
bf16 weights at ~17 GB/s at batch 1 where a plain read makes ~29, and _int_mm reached ~60% of
the int8 dot-product rate at batch 64; and with the small ops fused, the Python around them
was a third of a batch-1 token. The kernels replace those (numbers in the README).

Built with torch's C++ extension loader (g++ and ninja, -march=native) the first time an
engine starts on a CPU, ~10-30 s, and cached per machine under $PINFER_CACHE/kernels
(~/.cache/pinfer); later starts load the cached library. No compiler, no AVX2,
PINFER_CPU_KERNELS=0 or a failed build: a warning (for the failure) and the PyTorch path,
which computes the same thing.

The model code asks usable(x) and has(op) before calling a kernel: usable(x) is true only
inside `active()`, which the model runner enters around its forward except in deterministic
mode (whose batch-invariant aten ops are the reference the trainer matches bit for bit), for
float32 and bfloat16 CPU tensors.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import logging
import os
import platform
import shutil
import warnings
from pathlib import Path
from typing import Iterator

import torch

logger = logging.getLogger(__name__)

SOURCES = [Path(__file__).with_name("cpu_ops.cpp"), Path(__file__).with_name("cpu_ops_avx2.cpp")]
HEADER = Path(__file__).with_name("cpu_ops_entry.h")  # both sources include it
# -fopenmp: at::parallel_for is OpenMP, serial without it; -ffp-contract=off: no FMA where aten rounds twice
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off"]
_DTYPES = (torch.float32, torch.bfloat16)

_state: dict[str, object] = {"tried": False, "loaded": False, "reason": "not built yet"}
_active: contextvars.ContextVar[bool] = contextvars.ContextVar("pinfer_cpu_kernels_active", default=False)


def cache_dir() -> Path:
    root = Path(os.environ.get("PINFER_CACHE", Path.home() / ".cache" / "pinfer")).expanduser()
    return root / "kernels"


def _build_key() -> str:
    """The build is valid for this source, these flags, this torch and this CPU (-march=native)."""
    cpu = ""
    with contextlib.suppress(OSError):
        cpu = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    text = "\n".join([*(path.read_text() for path in [*SOURCES, HEADER]), " ".join(_FLAGS), torch.__version__,
                      platform.machine(), cpu])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def load() -> bool:
    """Build (first time on this machine) or load the kernels; True if usable. Which ops the
    build has depends on the CPU: has(op). Never raises."""
    if _state["tried"]:
        return bool(_state["loaded"])
    _state["tried"] = True
    if os.environ.get("PINFER_CPU_KERNELS", "1") == "0":
        _state["reason"] = "disabled by PINFER_CPU_KERNELS=0"
        return False
    if platform.machine() not in ("x86_64", "AMD64"):
        _state["reason"] = f"no kernels for {platform.machine()} (x86-64 only)"
        return False
    try:
        _build_or_load()
    except Exception as error:  # no compiler, headers, ...: the PyTorch path still works
        _state["reason"] = f"build failed: {type(error).__name__}: {str(error).strip().splitlines()[-1:]}"
        warnings.warn(f"pinfer CPU kernels unavailable, using the PyTorch path ({_state['reason']})", stacklevel=2)
        return False
    if not torch.ops.pinfer.available():  # no AVX-512: cpu_ops_avx2.cpp's kernels, if the CPU has AVX2 and FMA
        if not hasattr(torch.ops.pinfer, "paged_decode_attention"):
            _state["reason"] = "this CPU has neither AVX-512 nor AVX2 with FMA"
            return False
        _state["loaded"], _state["avx2"] = True, True
        _state["reason"] = "loaded (AVX2: a subset, has(op) tells which)"
        return True
    # AMX tiles for the GEMMs where the CPU has them (and Linux grants them); PINFER_AMX=0: AVX-512 only
    _state["amx"] = torch.ops.pinfer.use_amx(os.environ.get("PINFER_AMX", "1") != "0")
    _state["loaded"], _state["reason"] = True, "loaded"
    return True


def avx2_only() -> bool:
    """Whether the loaded build is cpu_ops_avx2.cpp's subset (a CPU with AVX2 but no AVX-512)."""
    return bool(_state.get("avx2", False))


def uses_amx() -> bool:
    """Whether the GEMMs run on AMX tiles (from 8-16 rows; Sapphire Rapids and later)."""
    return bool(_state.get("amx", False))


def _build_or_load() -> None:
    directory = cache_dir() / _build_key()
    library = directory / "pinfer_cpu_kernels.so"
    if library.exists():
        torch.ops.load_library(str(library))
        return
    from torch.utils.cpp_extension import load as load_extension

    _put_ninja_on_path()
    # Each process builds in its own folder and moves the result into place in one rename,
    # so a process starting meanwhile (a test worker, a TP rank) never loads a half-written file.
    build = directory / f"build-{os.getpid()}"
    build.mkdir(parents=True, exist_ok=True)
    logger.warning("compiling pinfer's CPU kernels (once per machine, ~10-30 s) into %s", directory)
    try:
        load_extension("pinfer_cpu_kernels", [str(source) for source in SOURCES], extra_cflags=_FLAGS,
                       extra_ldflags=["-fopenmp"], build_directory=str(build), is_python_module=False, verbose=False)
        os.replace(build / library.name, library)
    finally:
        shutil.rmtree(build, ignore_errors=True)


def _put_ninja_on_path() -> None:
    """torch's extension builder runs `ninja` from PATH; the `ninja` dependency installs it next
    to this interpreter, which is not on PATH when the venv is used without activating it."""
    if shutil.which("ninja"):
        return
    with contextlib.suppress(ImportError):
        import ninja

        os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, os.environ.get("PATH", "")])


def status() -> str:
    """Why the kernels are or are not in use: "loaded" (with the subset, on AVX2), or the reason not."""
    return str(_state["reason"])


@contextlib.contextmanager
def active(enabled: bool = True) -> Iterator[None]:
    """Let the model code use the kernels inside this block (if they loaded)."""
    token = _active.set(enabled and bool(_state["loaded"]))
    try:
        yield
    finally:
        _active.reset(token)


def pack_for_gemm(weight: torch.Tensor) -> torch.Tensor:
    """A weight [N, K] in the layout of cpu_ops.cpp's GEMMs, [N/16, K/P, 16, P]: P = 4 int8 or
    2 bf16 values of a column per 32-bit lane (the vpdpbusd / vdpbf16ps operand). A view: the
    callers copy it where they keep it. Needs N % 16 == 0 and K % P == 0."""
    n, k = weight.shape
    per_lane = 4 // weight.element_size()
    return weight.view(n // 16, 16, k // per_lane, per_lane).permute(0, 2, 1, 3)


def unpack_from_gemm(packed: torch.Tensor) -> torch.Tensor:
    """pack_for_gemm's inverse: [N/16, K/P, 16, P] -> [N, K] (exact)."""
    blocks, groups, _, per_lane = packed.shape
    return packed.permute(0, 2, 1, 3).reshape(blocks * 16, groups * per_lane)


def pack_int4(qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """int4 groups of 32 (w = scale * q + zero, q 0..15: [N, K], scale and zero [N, K / 32]) in
    cpu_ops.cpp's int4_gemm layout, uint8 [N/16, K/32, 5, 64]: per 16 columns and group, four
    64-byte vectors of nibbles, lane j holding column j's k's 8v..8v+7 (8v..8v+3 in the low
    nibbles, 8v+4..8v+7 in the high ones), then the group's 16 scales and 16 zeros in bf16.
    Needs N % 16 == 0."""
    n, k = qweight.shape
    groups = k // 32
    q = qweight.to(torch.uint8).view(n // 16, 16, groups, 4, 8).permute(0, 2, 3, 1, 4)  # [N/16, G, v, lane, 8]
    nibbles = (q[..., :4] | (q[..., 4:] << 4)).reshape(n // 16, groups, 4, 64)

    def lanes(values: torch.Tensor) -> torch.Tensor:  # [N, G] -> bf16 bytes [N/16, G, 32]
        per_lane = values.to(torch.bfloat16).view(n // 16, 16, groups).permute(0, 2, 1).contiguous()
        return per_lane.view(torch.uint8)

    scales = torch.cat([lanes(scale), lanes(zero)], dim=2).unsqueeze(2)  # [N/16, G, 1, 64]
    return torch.cat([nibbles, scales], dim=2).contiguous()


def has(op: str) -> bool:
    """Whether the build has this op. With AVX-512: int8_gemm and int4_gemm need VNNI,
    paged_prefill_attention BF16, decode_layers both, the rest F/BW (bf16_gemm without BF16 is
    cpu_ops_avx2.cpp's). With AVX2 and FMA only: bf16_gemm, int8_gemm, quantize_rows,
    dequantize_rows, paged_decode_attention, paged_prefill_attention_batch, rms_norm, add_rms_norm,
    rotary_, silu_mul, store_kv, row_keys, gumbel_sample, argmax, decode_layers (bf16 and int8
    linears, bf16 pools)."""
    key = f"has {op}"
    if key not in _state:
        _state[key] = load() and hasattr(torch.ops.pinfer, op)
    return bool(_state[key])


def usable(x: torch.Tensor) -> bool:
    return _active.get() and x.device.type == "cpu" and x.dtype in _DTYPES
