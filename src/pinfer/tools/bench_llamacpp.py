"""llama.cpp as a benchmark peer (bench_runners.Runner), through llama-cpp-python's
low-level C API (`pip install 'pinfer[bench]'`, which compiles llama.cpp).

- Weights: a GGUF of the precision class pinfer runs (`gguf_for_precision`): bfloat16
  (auto) -> BF16, float32 -> F32, float16 -> F16, int8 -> Q8_0, int4 -> the model's own
  Q4_0/Q4_1 file (pinfer keeps those blocks exactly). Other files are made once by
  pinfer's converters (GGUF -> HF folder -> GGUF) and cached in $PINFER_CACHE/bench-gguf.
- Prompts: pinfer's tokenizer and chat template on the same model, and the ids go to
  llama.cpp as they are, so every engine prefills identical tokens.
- Generation, like llama.cpp's examples/batched: one llama_context per workload shape
  with one KV stream per request (kv_unified off: independent prompts share nothing,
  and a unified cache makes every token attend over all requests' cells; measured on
  rollout, 1 thread: 219 vs 985 ms a step, the same prefill). One
  llama_decode takes all prompts' tokens (seq_id i for request i, logits only at each
  prompt's last token); then every step one llama_decode of one token per request.
- Sampling in numpy on the float32 logits: greedy = argmax; otherwise softmax(logits / T)
  and inverse-CDF with one uniform per request from its own generator (seed + i). The
  logprob is the chosen token's log_softmax of the raw float32 logits (pinfer's "raw"
  logprobs). Both are inside the timed region: the cost a user of the C API pays.
- EOS ignored: the loop never looks at the tokens, so every request gets max_tokens.
- Timing: the batch advances together, so every request gets the batch's first-token
  time (TTFT, from the start of the prefill) and mean step time after it (TPOT).
- Threads: --threads, else every usable CPU (n_threads = n_threads_batch). ggml's
  OpenMP workers spin at each of the hundreds of barriers a token takes, so on a busy
  machine it slows down many-fold (seen here: 12 ms a token on 1 thread, 40-1300 ms on
  2 with other jobs running); `-t 1` or OMP_WAIT_POLICY=passive (18 ms) avoid that.
"""

from __future__ import annotations

import ctypes
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pinfer.tools.bench_runners import RequestTiming, RunResult, _short_model_name
from pinfer.tools.workloads import Workload

try:
    import llama_cpp
except ImportError:  # the module stays importable: gguf_for_precision needs no llama.cpp
    llama_cpp = None

INSTALL_HINT = ("pip install 'pinfer[bench]' (compiles llama.cpp; see pyproject.toml for the CMAKE_ARGS "
                "to use on Xeons with AMX)")
_DTYPE_TYPES = {"bfloat16": "BF16", "bf16": "BF16", "float32": "F32", "fp32": "F32",
                "float16": "F16", "fp16": "F16"}
_Q4_TYPES = ("Q4_0", "Q4_1")
_KV_PAD = 256  # llama.cpp rounds each sequence's KV stream up to this many cells


# --- weights ---------------------------------------------------------------------------


@dataclass(frozen=True)
class WeightFile:
    path: Path
    type: str  # the GGUF type of the decoder's matrices (norms are F32 in every file)
    converted: bool  # made by pinfer's converters (else the model's own file)


def cache_dir() -> Path:
    return Path(os.environ.get("PINFER_CACHE", Path.home() / ".cache" / "pinfer")).expanduser() / "bench-gguf"


def gguf_weight_type(path: Path) -> str:
    """The type of a GGUF file's `blk.*` matrices, "mixed" when they differ (e.g. Q4_K_M)."""
    from pinfer.loading.gguf_loader import _open_reader

    types = {t.tensor_type.name for t in _open_reader(path).tensors
             if t.name.startswith("blk.") and len(t.shape) == 2}
    return types.pop() if len(types) == 1 else "mixed"


def resolve_dtype(model: Path, dtype: str) -> str:
    """"auto" as pinfer resolves it for this checkpoint (bfloat16 for a GGUF)."""
    if dtype != "auto":
        return dtype
    from pinfer.loading.loader import default_dtype, open_checkpoint

    return str(default_dtype(open_checkpoint(model))).removeprefix("torch.")


def target_type(model: Path, dtype: str, quantization: str | None) -> str:
    """The GGUF type matching pinfer's (dtype, quantization); quantization decides when set."""
    if quantization == "int8":
        return "Q8_0"
    if quantization == "int4":
        found = gguf_weight_type(model) if model.is_file() else "a Hugging Face folder"
        if found not in _Q4_TYPES:
            raise ValueError(
                f"the llama.cpp peer runs int4 on the model's own Q4_0/Q4_1 GGUF (the blocks pinfer keeps "
                f"exactly), but {model.name} is {found}; pinfer's converter writes only "
                f"F32/F16/BF16/Q8_0, so there is no matching llama.cpp file")
        return found
    if quantization:
        raise ValueError(f"the llama.cpp peer has no file type for quantization {quantization!r} (none, int8, int4)")
    dtype = resolve_dtype(model, dtype)
    if dtype not in _DTYPE_TYPES:
        raise ValueError(f"the llama.cpp peer has no file type for dtype {dtype!r}")
    return _DTYPE_TYPES[dtype]


def gguf_for_precision(model: Path, dtype: str, quantization: str | None, cache: Path | None = None) -> WeightFile:
    """The GGUF llama.cpp runs for this precision: the model's own file when it already is
    that type, else a converted copy in `cache`, made on first use."""
    wanted = target_type(model, dtype, quantization)
    if model.is_file() and gguf_weight_type(model) == wanted:
        return WeightFile(model, wanted, converted=False)
    cache = cache or cache_dir()
    size = model.stat().st_size if model.is_file() else sum(f.stat().st_size for f in model.glob("*.safetensors"))
    out = cache / f"{model.stem}-{size}.{wanted}.gguf"  # the size: a changed source is not served stale
    if not out.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        print(f"  llama.cpp: converting {model.name} to {wanted} -> {out}", file=sys.stderr, flush=True)
        _convert(model, out, wanted)
    return WeightFile(out, wanted, converted=True)


@dataclass(frozen=True)
class PeerModel:
    """What a llama.cpp peer runs for a bench spec's engine settings."""

    name: str  # as the spec gives it
    source: Path
    dtype: str  # in pinfer's terms ("auto" resolved), so rows line up
    quantization: str | None
    kv_cache_dtype: str  # pinfer's int8 KV cache -> llama.cpp's q8_0 one
    weights: WeightFile

    def describe(self) -> dict[str, Any]:
        """The describe() fields both llama.cpp runners share: what they run, at what precision."""
        int8_kv = self.kv_cache_dtype == "int8"
        return {
            "model": _short_model_name(self.name), "model_path": self.name,
            "gguf_file": str(self.weights.path), "gguf_type": self.weights.type,
            "gguf_converted": self.weights.converted, "dtype": self.dtype, "quantization": self.quantization or "none",
            "kv_cache_dtype": self.kv_cache_dtype, "kv_cache_type": "q8_0" if int8_kv else "f16",
            "attention_backend": "ggml (flash-attn on)" if int8_kv else "ggml (flash-attn auto)",
        }


def peer_model(engine: dict[str, Any]) -> PeerModel:
    from pinfer.loading.resolve import resolve_model

    source = resolve_model(str(engine["model"]))
    dtype = str(engine.get("dtype") or "auto").removeprefix("torch.")
    quantization = engine.get("quantization")
    return PeerModel(str(engine["model"]), source, resolve_dtype(source, dtype), quantization,
                     engine.get("kv_cache_dtype", "auto"), gguf_for_precision(source, dtype, quantization))


def _convert(model: Path, out: Path, outtype: str) -> None:
    from pinfer.tools.hf_to_gguf import hf_to_gguf

    if model.is_dir():
        hf_to_gguf(model, out, outtype)
        return
    from pinfer.tools.gguf_to_hf import gguf_to_hf

    with tempfile.TemporaryDirectory(prefix="pinfer-bench-hf-", dir=out.parent) as tmp:
        folder = Path(tmp) / "hf"
        gguf_to_hf(model, folder, "float32")  # dequantized once; the GGUF writer rounds to outtype, as pinfer does
        hf_to_gguf(folder, out, outtype)  # writes a temporary file and renames it: no half file is cached


# --- the runner --------------------------------------------------------------------------


def _require_llama_cpp():
    if llama_cpp is None:
        raise ImportError(f"the llama.cpp peer needs llama-cpp-python: {INSTALL_HINT}")
    return llama_cpp


_LOG_WARN, _LOG_ERROR, _LOG_CONT = 3, 4, 5  # ggml_log_level
_log_state = {"level": 0}


def _forward_log(level: int, text: bytes, user_data) -> None:
    """llama.cpp's log: warnings and errors to stderr, the per-load info chatter dropped."""
    if level != _LOG_CONT:
        _log_state["level"] = level
    if _log_state["level"] in (_LOG_WARN, _LOG_ERROR):
        sys.stderr.write(text.decode(errors="replace"))


_log_callback = None  # the ctypes callback must outlive every llama.cpp call


def _install_log() -> None:
    global _log_callback
    if _log_callback is None:
        _log_callback = llama_cpp.llama_log_callback(_forward_log)
        llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()


@dataclass
class _Session:
    """A llama_context (KV cache) and one llama_batch, sized for one workload shape."""

    ctx: Any
    batch: Any
    n_seq: int
    n_ctx_seq: int  # KV cells per request
    n_batch: int  # the most tokens one llama_decode takes


@dataclass
class Generation:
    prompt_ids: list[list[int]]
    tokens: np.ndarray  # [requests, max_tokens]
    logprobs: np.ndarray | None  # the same shape, when the workload asks for logprobs
    result: RunResult


class LlamaCppRunner:
    name = "llama.cpp"

    def __init__(self, spec: dict[str, Any]):
        _require_llama_cpp()
        from pinfer.loading.loader import open_checkpoint

        self.peer = peer = peer_model(spec["engine"])
        self.model_name, self.weights = peer.name, peer.weights
        # pinfer's int8 KV cache against llama.cpp's q8_0 one (a quantized V cache needs flash attention)
        self.kv_cache_dtype = peer.kv_cache_dtype
        print(f"  llama.cpp: running {self.weights.path} ({self.weights.type})", file=sys.stderr, flush=True)
        self.threads = spec.get("threads") or _usable_cpus()
        # pinfer's tokenizer and chat template on the model it was asked for: the same prompt ids as pinfer's.
        self.tokenizer = open_checkpoint(peer.source).load_tokenizer()
        _install_log()
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = 0
        self.model = llama_cpp.llama_model_load_from_file(str(self.weights.path).encode(), params)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {self.weights.path}")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self._session: _Session | None = None
        self._prompt_ids: dict[tuple, list[list[int]]] = {}

    def describe(self) -> dict[str, Any]:
        arch = ctypes.create_string_buffer(64)
        llama_cpp.llama_model_meta_val_str(self.model, b"general.architecture", arch, len(arch))
        return {
            "engine": self.name, **self.peer.describe(), "architecture": arch.value.decode(errors="replace"),
            "kv_cache": "one stream per request (kv_unified off)",
            "threads": self.threads, "device": "cpu", "max_num_seqs": None, "deterministic": False,
            **llama_cpp_build(),
        }

    def run(self, workload: Workload) -> RunResult:
        return self.generate(workload).result

    def generate(self, workload: Workload) -> Generation:
        """Run the workload; its tokens and logprobs too (run() keeps only the timings)."""
        if not workload.ignore_eos:
            raise ValueError("the llama.cpp peer runs EOS-ignored workloads only")
        prompts = self._templated(workload)
        n, steps = len(prompts), workload.max_tokens
        lengths = np.array([len(p) for p in prompts], dtype=np.int32)
        session = self._session_for(n, int(lengths.max()) + steps, int(lengths.sum()))
        _clear_kv(session.ctx)  # every run prefills from scratch
        rngs = [np.random.default_rng(workload.seed + i) for i in range(n)]
        tokens = np.empty((n, steps), dtype=np.int32)
        logprobs = np.empty((n, steps), dtype=np.float32) if workload.logprobs else None
        seq = np.arange(n, dtype=np.int32)

        start = time.perf_counter()
        flat = np.concatenate([np.asarray(p, dtype=np.int32) for p in prompts])
        positions = np.concatenate([np.arange(k, dtype=np.int32) for k in lengths])
        owners = np.repeat(seq, lengths)
        last = np.zeros(len(flat), dtype=np.int8)
        last[np.cumsum(lengths) - 1] = 1
        self._decode(session, flat, positions, owners, last)
        first = None
        for step in range(steps):
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits(session.ctx), shape=(n, self.n_vocab))
            chosen, chosen_logprobs = sample(logits, workload.temperature, rngs, workload.logprobs)
            tokens[:, step] = chosen
            if logprobs is not None:
                logprobs[:, step] = chosen_logprobs
            if first is None:
                first = time.perf_counter()
            if step + 1 < steps:
                self._decode(session, chosen, lengths + step, seq, np.ones(n, dtype=np.int8))
        end = time.perf_counter()

        generated = tokens.shape[1]
        if generated != workload.max_tokens:
            raise RuntimeError(f"llama.cpp peer generated {generated} tokens, not {workload.max_tokens}")
        if logprobs is not None and not np.isfinite(logprobs).all():
            raise RuntimeError("llama.cpp peer: a logprob is not finite")
        tpot = (end - first) / (generated - 1) if generated > 1 else None
        timings = [RequestTiming(int(k), generated, first - start, tpot) for k in lengths]
        return Generation(prompts, tokens, logprobs, RunResult(end - start, timings))

    def llama_tokenize(self, text: str) -> list[int]:
        """llama.cpp's own tokenizer on `text` (special tokens parsed, no BOS added): to check
        that the ids pinfer's tokenizer feeds it are the ones llama.cpp would make."""
        data = text.encode()
        out = (llama_cpp.llama_token * (len(data) + 8))()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), out, len(out), False, True)
        if n < 0:
            raise RuntimeError(f"llama_tokenize needs {-n} tokens")
        return list(out[:n])

    def close(self) -> None:
        self._free_session()
        if getattr(self, "model", None):
            llama_cpp.llama_model_free(self.model)
            self.model = None

    def __del__(self):
        if llama_cpp is not None:
            self.close()

    # --- internals -------------------------------------------------------------------

    def _templated(self, workload: Workload) -> list[list[int]]:
        key = tuple(tuple(tuple(m.items()) for m in c) for c in workload.conversations)
        if key not in self._prompt_ids:
            self._prompt_ids[key] = [self.chat_ids(list(c)) for c in workload.conversations]
        return self._prompt_ids[key]

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        return chat_ids(self.tokenizer, messages)

    def _session_for(self, n_seq: int, seq_tokens: int, prompt_tokens: int) -> _Session:
        """The current context when it fits this workload, else a new one (the old one freed).
        Created outside the timed region; the warm-up run normally creates it."""
        n_ctx_seq = -(-seq_tokens // _KV_PAD) * _KV_PAD
        n_batch = max(prompt_tokens, n_seq)
        s = self._session
        if s is not None and s.n_seq == n_seq and s.n_ctx_seq >= n_ctx_seq and s.n_batch >= n_batch:
            return s
        self._free_session()
        params = llama_cpp.llama_context_default_params()
        fields = {name for name, _ in params._fields_}  # older versions lack the newer ones
        settings = {
            "n_ctx": n_seq * n_ctx_seq,
            "n_batch": n_batch,  # all prompts in one llama_decode; llama.cpp splits it into n_ubatch pieces
            "n_seq_max": n_seq,
            "n_outputs_max": n_seq,  # logits rows: one per request (the default is n_batch rows: GBs at 256 prompts)
            "kv_unified": False,
            "n_threads": self.threads, "n_threads_batch": self.threads,
        }
        if self.kv_cache_dtype == "int8":
            settings.update(type_k=llama_cpp.GGML_TYPE_Q8_0, type_v=llama_cpp.GGML_TYPE_Q8_0,
                            flash_attn_type=llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED)
            if not {"type_k", "type_v", "flash_attn_type"} <= fields:
                raise RuntimeError("this llama-cpp-python cannot set a q8_0 KV cache (no type_k/type_v/flash_attn_type)")
        for name, value in settings.items():
            if name in fields:
                setattr(params, name, value)
        ctx = llama_cpp.llama_init_from_model(self.model, params)
        if not ctx:
            raise RuntimeError(f"llama.cpp could not create a context for {n_seq} sequences x {n_ctx_seq} tokens")
        batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self._session = _Session(ctx, batch, n_seq, n_ctx_seq, n_batch)
        return self._session

    def _free_session(self) -> None:
        if getattr(self, "_session", None) is not None:
            llama_cpp.llama_batch_free(self._session.batch)
            llama_cpp.llama_free(self._session.ctx)
            self._session = None

    def _decode(self, session: _Session, tokens: np.ndarray, positions: np.ndarray, seq_ids: np.ndarray,
                outputs: np.ndarray) -> None:
        """One llama_decode of these tokens (token k of sequence seq_ids[k] at positions[k])."""
        batch, n = session.batch, len(tokens)
        for field, values in (("token", tokens), ("pos", positions), ("n_seq_id", np.ones(n, dtype=np.int32)),
                              ("logits", outputs)):
            np.ctypeslib.as_array(getattr(batch, field), shape=(session.n_batch,))[:n] = values
        seq_ptrs = batch.seq_id  # llama_batch_init gives each token its own seq_id array (of one here)
        for k, s in enumerate(seq_ids.tolist()):
            seq_ptrs[k][0] = s
        batch.n_tokens = n
        code = llama_cpp.llama_decode(session.ctx, batch)
        if code != 0:
            raise RuntimeError(f"llama_decode failed with code {code} ({n} tokens, {session.n_seq} sequences)")


def chat_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """The prompt ids of a conversation: the tokenizer's chat template, with the generation prompt."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)  # transformers 5 returns a BatchEncoding


def _clear_kv(ctx) -> None:
    if hasattr(llama_cpp, "llama_memory_clear"):
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
    else:  # llama.cpp before its memory API
        llama_cpp.llama_kv_self_clear(ctx)


def sample(logits: np.ndarray, temperature: float, rngs: list[np.random.Generator],
           want_logprobs: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """One token per row of `logits` [n, vocab] (float32), and its raw logprob if asked."""
    top = logits.max(axis=1, keepdims=True)
    shifted = logits - top
    if temperature == 0:
        chosen = logits.argmax(axis=1)
        exp = np.exp(shifted) if want_logprobs else None
    else:
        exp = np.exp(shifted if temperature == 1.0 else shifted / np.float32(temperature))
        cdf = np.cumsum(exp, axis=1)
        draws = np.array([rng.random() for rng in rngs], dtype=np.float32) * cdf[:, -1]
        chosen = np.array([np.searchsorted(row, u, side="right") for row, u in zip(cdf, draws)])
        chosen = np.minimum(chosen, logits.shape[1] - 1)  # u * total rounding up to the last entry
        if temperature != 1.0 and want_logprobs:
            exp = np.exp(shifted)  # logprobs are of the raw logits, not the tempered ones
    if not want_logprobs:
        return chosen, None
    rows = np.arange(len(logits))
    return chosen, shifted[rows, chosen] - np.log(exp.sum(axis=1))


def llama_cpp_build() -> dict[str, Any]:
    """Which llama.cpp this is: llama-cpp-python's own build of its vendored copy."""
    lib = Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"
    ggml = {"ggml_version": "unknown", "ggml_commit": "unknown"}
    try:
        base = ctypes.CDLL(str(lib))
        for name in ggml:
            fn = getattr(base, name)
            fn.restype = ctypes.c_char_p
            ggml[name] = fn().decode()
    except (OSError, AttributeError):
        pass
    return {
        "llama_cpp_python": llama_cpp.__version__,
        "llama_cpp_version": llama_cpp.llama_version().decode() if hasattr(llama_cpp, "llama_version") else "unknown",
        **ggml,
        # The wheel does not record its CMake flags; the variable is the best we have when set.
        "build": f"llama-cpp-python's build of its vendored llama.cpp, CMAKE_ARGS={os.environ.get('CMAKE_ARGS', 'unknown')}",
        "system_info": llama_cpp.llama_print_system_info().decode().strip(),
    }


def _usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
