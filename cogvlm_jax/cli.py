"""``cogvlm-jax convert|generate|chat|plan|bench|serve``: bad input is one clear line on stderr and a non-zero exit."""

from __future__ import annotations

import argparse
import sys

TEMPLATES = ("chat", "vqa", "base")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory (HF safetensors or converted)")
    p.add_argument("--tokenizer", help="tokenizer.model / tokenizer.json or its directory (default: beside the model)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--template", choices=TEMPLATES, help="prompt template (default: the checkpoint's)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int, default=0)


def _sampling(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, seed=args.seed)


def _load(args):
    import cogvlm_jax

    return cogvlm_jax.load(args.model, dtype=args.dtype, tokenizer=args.tokenizer)


def _image(path):
    from cogvlm_jax.preprocess import load_image

    return None if path is None else load_image(path)


def cmd_generate(args) -> int:
    image = _image(args.image)  # fail on a bad image before loading the model
    model = _load(args)
    for piece in model.stream(image, args.prompt, template=args.template, **_sampling(args)):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_chat(args) -> int:
    image = _image(args.image)
    model = _load(args)
    history: list[tuple[str, str]] = []
    print("cogvlm-jax chat: empty line or Ctrl-D to quit, '/image PATH' to change the picture, '/clear' to restart.")
    while True:
        try:
            query = input("you> ").strip()
        except EOFError:
            print()
            return 0
        if not query:
            return 0
        if query.startswith("/image "):
            image, history = _image(query[7:].strip()), []
            continue
        if query == "/clear":
            history = []
            continue
        sys.stdout.write("cogvlm> ")
        answer = []
        for piece in model.stream(image, query, tuple(history), template=args.template, **_sampling(args)):
            answer.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        history.append((query, "".join(answer)))


def cmd_convert(args) -> int:
    from convert.convert_hf import main_convert

    return main_convert(args.src, args.dst, to=args.to) or 0


def cmd_plan(args) -> int:
    from cogvlm_jax.config import load_config
    from cogvlm_jax.plan import format_plan, plan

    try:
        data, fsdp, tensor = (int(x) for x in args.mesh.split(","))
    except ValueError:
        raise ValueError(f"--mesh must be DATA,FSDP,TENSOR (three integers), got {args.mesh!r}") from None
    cfg = load_config(args.config)
    context = args.context or cfg.context_length
    p = plan(cfg, data, fsdp, tensor, args.dtype, args.batch, context)
    print(format_plan(cfg.name or args.config, p, args.dtype, args.batch, context))
    return 0


def cmd_bench(args) -> int:
    from benchmarks.run import main as bench_main

    return bench_main(args.bench_args) or 0


def cmd_serve(args) -> int:
    from cogvlm_jax.server import load_engine_and_config, serve

    engine, config = load_engine_and_config(args)
    return serve(engine, config, host=args.host, port=args.port, log_level=args.log_level,
                 announce=lambda line: print(line, flush=True))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cogvlm-jax", description="CogVLM / CogVLM2 in JAX")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="answer one question about an image, streamed")
    _add_model_args(g)
    g.add_argument("--image", help="image file (omit for a text-only prompt)")
    g.add_argument("--prompt", required=True)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="multi-turn chat about an image")
    _add_model_args(c)
    c.add_argument("--image")
    c.set_defaults(func=cmd_chat)

    cv = sub.add_parser("convert", help="HF safetensors -> our Orbax format, or back with --to hf")
    cv.add_argument("src")
    cv.add_argument("dst")
    cv.add_argument("--to", choices=("ours", "hf"), default="ours")
    cv.set_defaults(func=cmd_convert)

    pl = sub.add_parser("plan", help="per-device memory of parameters and KV cache on a mesh (nothing allocated)")
    pl.add_argument("--config", required=True, help="config.json, checkpoint directory or preset name")
    pl.add_argument("--mesh", default="1,1,1", help="DATA,FSDP,TENSOR")
    pl.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    pl.add_argument("--batch", type=int, default=1)
    pl.add_argument("--context", type=int, help="KV cache length (default: the model's context)")
    pl.set_defaults(func=cmd_plan)

    sv = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching, and a chat page at /")
    sv.add_argument("--model", help="checkpoint directory (default: the shipped default model)")
    sv.add_argument("--tokenizer", help="tokenizer file or directory (default: beside the model)")
    sv.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    sv.add_argument("--model-name", help="the id clients send as 'model' (default: the checkpoint's directory name)")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000, help="0: any free port (printed at start)")
    sv.add_argument("--slots", type=int, default=8, help="requests decoded together")
    sv.add_argument("--max-length", type=int, help="KV cache tokens per slot: prompt bucket + max_tokens "
                                                   "(default: the model's context length)")
    sv.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot before 429")
    sv.add_argument("--decode-chunk", type=int, default=4, help="decode steps per device call")
    sv.add_argument("--default-max-tokens", type=int, default=256, help="when a request sets no max_tokens")
    sv.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every endpoint but /health and /")
    sv.add_argument("--image-root", help="directory file:// image URLs may read from (default: none allowed)")
    sv.add_argument("--max-image-bytes", type=int, default=20 << 20)
    sv.add_argument("--drain-seconds", type=float, default=30.0,
                    help="on SIGTERM, time running requests get to finish")
    sv.add_argument("--log-level", default="warning", choices=("critical", "error", "warning", "info", "debug"))
    sv.set_defaults(func=cmd_serve)

    bn = sub.add_parser("bench", help="benchmarks against the hardware limit (see benchmarks/run.py --help)")
    bn.add_argument("bench_args", nargs=argparse.REMAINDER)
    bn.set_defaults(func=cmd_bench)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError, OSError) as e:  # our errors subclass ValueError and name the problem
        print(f"cogvlm-jax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
