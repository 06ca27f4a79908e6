"""`pinfer convert` both ways on the real SmolLM2 weights:

- GGUF -> HF: transformers loads the folder, its logprobs match pinfer's engine on the
  original GGUF and its tokenizer encodes the same;
- HF -> GGUF (F16, BF16, Q8_0): pinfer on the written file matches pinfer on the HF folder
  within the output type's rounding, and transformers' own GGUF reader (independent of
  ours) reads the F16 file to the same model: the file is in llama.cpp's layout;
- GGUF -> HF -> GGUF (F32) gives the original logprobs back;
- bad arguments fail with a clear message before any work.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import torch

from pinfer import LLM, SamplingParams
from pinfer.entrypoints.cli import main
from pinfer.loading.gguf_loader import GGUFCheckpoint
from smollm2_prompts import USER_MESSAGES, chat_prompt_ids

# Max abs logprob difference of the prompt tokens vs the float32 reference folder. F16/BF16 round
# every matrix (relative error 2^-11 / 2^-8), Q8_0 to 8 bits per 32-block; norms stay F32.
# Measured (printed with -s): F16 1.88e-2 and BF16 8.64e-2, both equal (to 1e-6) to what
# transformers gives on the folder with its matrices rounded to float16 / bfloat16: the files
# add no error beyond the type's rounding. Q8_0 3.5e-1 (8-bit absmax blocks: ~4x bf16's step).
# Bounds leave ~1.6x room.
TOLERANCE = {"F16": 0.03, "BF16": 0.15, "Q8_0": 0.6}
EXACT = 1e-4  # same float32 weights through two implementations
TEXTS = ["The capital of France is", "  1, 2, 3, 44, 555,\n\tdef f(x):  return x**2  # émigré 🚀 I'll"]


def convert(*args: str) -> float:
    start = time.perf_counter()
    assert main(["convert", *map(str, args)]) == 0
    return time.perf_counter() - start


def engine(path) -> LLM:
    return LLM(str(path), dtype="float32", kv_cache_memory="32MiB")


def engine_logprobs(llm: LLM, prompts: list[list[int]]) -> list[torch.Tensor]:
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    result = []
    for ids, output in zip(prompts, outputs):
        entries = output.prompt_logprobs[1:]
        result.append(torch.tensor([entry[token].logprob for token, entry in zip(ids[1:], entries)]))
    return result


def transformers_logprobs(model, prompts: list[list[int]]) -> list[torch.Tensor]:
    result = []
    with torch.no_grad():
        for ids in prompts:
            logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
            result.append(logprobs[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0])
    return result


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


@pytest.fixture(scope="module")
def prompts(hf_tokenizer) -> list[list[int]]:
    return [chat_prompt_ids(hf_tokenizer, text) for text in USER_MESSAGES[1:3]]


@pytest.fixture(scope="module")
def original_logprobs(smollm2_llm, prompts) -> list[torch.Tensor]:
    return engine_logprobs(smollm2_llm, prompts)


@pytest.fixture(scope="module")
def reference_logprobs(smollm2_hf_dir, prompts) -> list[torch.Tensor]:
    """pinfer on the float32 HF folder transformers made: what every GGUF output is compared with."""
    return engine_logprobs(engine(smollm2_hf_dir), prompts)


@pytest.fixture(scope="module")
def hf_from_gguf(smollm2_gguf, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf-to-hf") / "smollm2"
    print(f"\nGGUF -> HF float32: {convert(smollm2_gguf, out):.1f}s")
    return out


@pytest.fixture(scope="module")
def gguf_from_hf(smollm2_hf_dir, tmp_path_factory, prompts):
    """outtype -> (GGUF file written from the reference HF folder, pinfer's logprobs on it),
    converted and run on first use."""
    folder = tmp_path_factory.mktemp("hf-to-gguf")
    done = {}

    def get(outtype: str) -> tuple[Path, list[torch.Tensor]]:
        if outtype not in done:
            path = folder / f"smollm2-{outtype}.gguf"
            seconds = convert(smollm2_hf_dir, path, "--outtype", outtype)
            print(f"\nHF -> GGUF {outtype}: {seconds:.1f}s, {path.stat().st_size / 2**20:.0f} MiB")
            done[outtype] = path, engine_logprobs(engine(path), prompts)
        return done[outtype]

    return get


def test_gguf_to_hf_loads_in_transformers_and_matches_the_engine(
    hf_from_gguf, smollm2_llm, prompts, original_logprobs
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert {p.name for p in hf_from_gguf.iterdir()} >= {
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
    model = AutoModelForCausalLM.from_pretrained(hf_from_gguf, dtype=torch.float32).eval()
    diff = max_diff(transformers_logprobs(model, prompts), original_logprobs)
    print(f"\ntransformers on the converted folder vs pinfer on the GGUF: max abs logprob diff {diff:.2e}")
    assert diff < EXACT
    assert model.generation_config.eos_token_id == 2

    tokenizer, ours = AutoTokenizer.from_pretrained(hf_from_gguf), smollm2_llm.get_tokenizer()
    for text in TEXTS + USER_MESSAGES:
        assert tokenizer.encode(text) == ours.encode(text)
    chat = [{"role": "user", "content": USER_MESSAGES[1]}]
    assert tokenizer.apply_chat_template(chat, tokenize=False) == ours.apply_chat_template(chat, tokenize=False)


@pytest.mark.parametrize("outtype", ["F16", "BF16", "Q8_0"])
def test_hf_to_gguf_matches_the_hf_folder(outtype, gguf_from_hf, prompts, reference_logprobs) -> None:
    _, logprobs = gguf_from_hf(outtype)
    diff = max_diff(logprobs, reference_logprobs)
    print(f"\npinfer on the {outtype} GGUF vs pinfer on the HF folder: max abs logprob diff {diff:.2e}")
    assert 0 < diff < TOLERANCE[outtype]


def test_transformers_reads_the_f16_gguf_like_pinfer(gguf_from_hf, smollm2_hf_dir, hf_tokenizer, prompts) -> None:
    """transformers' GGUF loader has its own name mapping, Q/K un-permutation and tokenizer
    builder: agreeing with it checks the file follows llama.cpp's layout, not just our reader."""
    from transformers import AutoModelForCausalLM

    path, ours = gguf_from_hf("F16")
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    diff = max_diff(transformers_logprobs(model, prompts), ours)
    print(f"\ntransformers vs pinfer on the F16 GGUF: max abs logprob diff {diff:.2e}")
    assert diff < EXACT
    # The vocabulary metadata (tokens, merges, pre-tokenizer name) rebuilds the folder's tokenizer.
    # (transformers' GGUF tokenizer agrees too, but building it takes ~10 s of CPU.)
    tokenizer = GGUFCheckpoint(path).load_tokenizer()
    for text in TEXTS + USER_MESSAGES:
        assert tokenizer.encode(text) == hf_tokenizer.encode(text)
    assert tokenizer.chat_template == hf_tokenizer.chat_template


def test_round_trip_gives_the_original_logprobs(hf_from_gguf, tmp_path, prompts, original_logprobs) -> None:
    path = tmp_path / "round-trip.gguf"
    print(f"\nHF -> GGUF F32: {convert(hf_from_gguf, path, '--outtype', 'F32'):.1f}s")
    diff = max_diff(engine_logprobs(engine(path), prompts), original_logprobs)
    print(f"round trip GGUF -> HF -> GGUF vs the original: max abs logprob diff {diff:.2e}")
    assert diff < 1e-5  # the same float32 weights


# --- bad input -----------------------------------------------------------------------


def fails(capsys, *args) -> str:
    assert main(["convert", *map(str, args)]) == 2
    return capsys.readouterr().err


def test_bad_arguments_fail_before_any_work(smollm2_gguf, smollm2_hf_dir, tmp_path, capsys) -> None:
    assert "no such file or folder" in fails(capsys, tmp_path / "missing.gguf", tmp_path / "out")
    existing = tmp_path / "exists"
    existing.mkdir()
    assert "already exists; pass --force" in fails(capsys, smollm2_gguf, existing)
    assert "unknown --outtype 'Q4_0'" in fails(capsys, smollm2_hf_dir, tmp_path / "x.gguf", "--outtype", "Q4_0")
    assert "must end in .gguf" in fails(capsys, smollm2_hf_dir, tmp_path / "x.safetensors")
    assert "--outtype is for" in fails(capsys, smollm2_gguf, tmp_path / "hf", "--outtype", "F16")
    assert "--dtype is for" in fails(capsys, smollm2_hf_dir, tmp_path / "x.gguf", "--dtype", "float16")
    assert "unknown --dtype 'int8'" in fails(capsys, smollm2_gguf, tmp_path / "hf", "--dtype", "int8")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists"]  # nothing written


def test_unsupported_architecture_is_named(smollm2_hf_dir, tmp_path, capsys) -> None:
    folder = tmp_path / "gemma"
    folder.mkdir()
    config = (smollm2_hf_dir / "config.json").read_text().replace("LlamaForCausalLM", "Gemma3ForCausalLM")
    (folder / "config.json").write_text(config)
    shutil.copy(smollm2_hf_dir / "tokenizer.json", folder)
    err = fails(capsys, folder, tmp_path / "gemma.gguf")
    assert "converting Gemma3ForCausalLM to GGUF is not supported" in err
