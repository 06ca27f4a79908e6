"""The `pinfer` command: generate, chat, serve, bench, inspect, convert."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Sequence as Seq

from pinfer.config import KV_CACHE_DTYPES, EngineConfig
from pinfer.errors import PinferError
from pinfer.loading.resolve import DEFAULT_MODEL, MODEL_ALIASES
from pinfer.sampling_params import SamplingParams


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine")
    group.add_argument("--model", "-m", default=DEFAULT_MODEL,
                       help=f"alias ({', '.join(MODEL_ALIASES)}), Hugging Face checkpoint folder, or .gguf file "
                            f"(default: {DEFAULT_MODEL})")
    group.add_argument("--dtype", default="auto", help="auto, float32 or bfloat16 (default: auto)")
    group.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    group.add_argument("--kv-cache-memory", default="1GiB", help="KV pool size, e.g. 1GiB, 512MiB (default: 1GiB)")
    group.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default: 16)")
    group.add_argument("--max-num-seqs", type=int, default=256, help="max sequences per step (default: 256)")
    group.add_argument("--max-num-batched-tokens", type=int, default=2048,
                       help="token budget per step; longer prompts are prefilled in chunks (default: 2048)")
    group.add_argument("--max-model-len", type=int, default=None, help="context length cap (default: the model's)")
    group.add_argument("--attention-backend", default=None,
                       choices=["paged", "blocked", "reference", "batch_invariant"],
                       help="default: paged, or batch_invariant with --deterministic")
    group.add_argument("--deterministic", action="store_true",
                       help="batch-invariant mode: a request's tokens and logprobs do not depend on the rest "
                            "of the batch (slower)")
    group.add_argument("--no-prefix-caching", action="store_true", help="disable prefix caching")
    group.add_argument("--quantization", "-q", default=None, choices=["int8", "int4"],
                       help="weight-only quantization of the linears at load (default: none)")
    group.add_argument("--kv-cache-dtype", default="auto", choices=list(KV_CACHE_DTYPES),
                       help="KV cache storage: auto (the model's dtype) or int8 (half the bytes of bf16, "
                            "values rounded to 8 bits; default: auto)")
    group.add_argument("--trace", default=None, metavar="FILE",
                       help="write a Chrome Trace JSON of every engine step (open it in Perfetto)")
    group.add_argument("--trace-layers", action="store_true", help="with --trace: a span per decoder layer too")
    group.add_argument("--compile", action="store_true",
                       help="torch.compile the sampler's plain-temperature path (RL rollouts): faster sampling "
                            "after a one-off compile")
    group.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                       help="split each layer over this many worker processes (torch.distributed; default: 1)")
    group.add_argument("--data-parallel-size", "-dp", type=int, default=1,
                       help="run this many engine replicas as Ray actors (default: 1)")


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=args.model, dtype=args.dtype, device=args.device, kv_cache_memory=args.kv_cache_memory,
        block_size=args.block_size, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
        attention_backend=args.attention_backend, enable_prefix_caching=not args.no_prefix_caching,
        deterministic=args.deterministic, quantization=args.quantization, trace_file=args.trace,
        trace_layers=args.trace_layers, tensor_parallel_size=args.tensor_parallel_size,
        data_parallel_size=args.data_parallel_size, compile=args.compile, kv_cache_dtype=args.kv_cache_dtype,
    )


def add_sampling_args(parser: argparse.ArgumentParser, max_tokens: int) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument("--max-tokens", type=int, default=max_tokens)
    group.add_argument("--min-tokens", type=int, default=0)
    group.add_argument("--temperature", "-t", type=float, default=0.0, help="0 = greedy (default)")
    group.add_argument("--top-k", type=int, default=-1)
    group.add_argument("--top-p", type=float, default=1.0)
    group.add_argument("--min-p", type=float, default=0.0)
    group.add_argument("--seed", type=int, default=None)
    group.add_argument("-n", type=int, default=1, help="samples per prompt")
    group.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    group.add_argument("--ignore-eos", action="store_true")
    group.add_argument("--logprobs", type=int, default=None, help="return k top alternatives per token")


def sampling_params_from_args(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        n=args.n, max_tokens=args.max_tokens, min_tokens=args.min_tokens, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, min_p=args.min_p, seed=args.seed, stop=args.stop,
        ignore_eos=args.ignore_eos, logprobs=args.logprobs,
    )


def cmd_generate(args: argparse.Namespace) -> int:
    from pinfer.entrypoints.llm import LLM

    prompts = list(args.prompt or [])
    if args.prompt_file:
        with open(args.prompt_file) as f:
            prompts.extend(line.rstrip("\n") for line in f if line.strip())
    if not prompts:
        raise PinferError("no prompt given: use --prompt TEXT (repeatable) or --prompt-file FILE")
    params = sampling_params_from_args(args)
    start = time.perf_counter()
    llm = LLM(**vars(engine_config_from_args(args)))
    load_s = time.perf_counter() - start
    if args.chat:
        requests = [llm.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
    else:
        requests = prompts
    start = time.perf_counter()
    outputs = llm.generate(requests, params, use_tqdm=len(prompts) > 1 and not args.json)
    gen_s = time.perf_counter() - start
    num_tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    if args.json:
        records = [{"prompt": p, "completions": [
            {"text": c.text, "token_ids": c.token_ids, "finish_reason": c.finish_reason,
             "token_logprobs": c.token_logprobs} for c in o.outputs]} for p, o in zip(prompts, outputs)]
        json.dump({"outputs": records, "load_seconds": load_s, "generate_seconds": gen_s,
                   "generated_tokens": num_tokens}, sys.stdout, indent=2)
        print()
        return 0
    for prompt, output in zip(prompts, outputs):
        for completion in output.outputs:
            header = f"[{output.request_id}.{completion.index}]" if len(outputs) > 1 or args.n > 1 else ""
            print(f"{header}{completion.text}" if header else completion.text)
    print(f"\n-- {num_tokens} tokens in {gen_s:.2f}s ({num_tokens / max(gen_s, 1e-9):.1f} tok/s), "
          f"model loaded in {load_s:.2f}s", file=sys.stderr)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    """Interactive chat that streams tokens as they are generated."""
    from pinfer.engine.llm_engine import LLMEngine

    engine = LLMEngine(engine_config_from_args(args))
    params = sampling_params_from_args(args)
    messages: list[dict[str, str]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    interactive = sys.stdin.isatty()
    if interactive:
        print("pinfer chat — empty line or Ctrl-D to quit, /reset to clear the conversation", file=sys.stderr)
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        if not line.strip():
            break
        if line.strip() == "/reset":
            messages = messages[:1] if args.system else []
            continue
        messages.append({"role": "user", "content": line})
        request_id = engine.add_request(engine.apply_chat_template(messages), params)
        shown = 0
        reply = ""
        try:
            while engine.has_unfinished_requests():
                for output in engine.step():
                    if output.request_id != request_id:
                        continue
                    reply = output.outputs[0].text
                    sys.stdout.write(reply[shown:])
                    sys.stdout.flush()
                    shown = len(reply)
        except KeyboardInterrupt:
            engine.abort_request(request_id)
        print()
        messages.append({"role": "assistant", "content": reply})
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pinfer", description="pinfer: LLM inference engine")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate completions for prompts")
    gen.add_argument("--prompt", "-p", action="append", help="prompt text (repeatable)")
    gen.add_argument("--prompt-file", help="file with one prompt per line")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt as a user message in the chat template")
    gen.add_argument("--json", action="store_true", help="print machine-readable JSON")
    add_engine_args(gen)
    add_sampling_args(gen, max_tokens=128)
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="interactive chat, streaming tokens")
    chat.add_argument("--system", default=None, help="system prompt")
    add_engine_args(chat)
    add_sampling_args(chat, max_tokens=512)
    chat.set_defaults(func=cmd_chat)

    # Each tool registers its own subcommand; heavy imports happen only when it runs.
    from pinfer.serving.cli import add_serve_parser
    from pinfer.tools.bench import add_bench_parser
    from pinfer.tools.bench_scaling import add_scaling_parser
    from pinfer.tools.convert import add_convert_parser
    from pinfer.tools.inspect import add_inspect_parser

    add_serve_parser(sub)
    add_bench_parser(sub)
    add_scaling_parser(sub)
    add_inspect_parser(sub)
    add_convert_parser(sub)
    return parser


def main(argv: Seq[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except PinferError as exc:
        print(f"pinfer: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
