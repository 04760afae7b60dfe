"""``cogvlm-jax convert|generate|chat``: bad input is one clear line on stderr and a non-zero exit.

``generate`` and ``chat`` run on one device, on a mesh (``--mesh``), or as one of several processes
(``--coordinator/--num-processes/--process-id``, see ``multihost.py``): then process 0 reads the input
and prints, the others follow it.
"""

from __future__ import annotations

import argparse
import os
import sys

from cogvlm_jax import multihost

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
    multihost.add_cli_args(p)


def _sampling(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, seed=args.seed)


def _load(args, mesh):
    import cogvlm_jax

    return cogvlm_jax.load(args.model, dtype=args.dtype, tokenizer=args.tokenizer, mesh=mesh,
                           progress=multihost.is_main_process())


def _image(path):
    """The image at ``path`` (read by process 0 and shared when several processes run), or None."""
    from cogvlm_jax.preprocess import load_image

    if path is None:
        return None
    import jax

    if jax.process_count() == 1:
        return load_image(path)

    def read() -> bytes:
        load_image(path)  # a clear error naming the file if it is not a readable image
        with open(path, "rb") as f:
            return f.read()

    return load_image(multihost.from_main(read))


def _out():
    """Where answers go: stdout on process 0, nowhere on the others.

    With several processes, native libraries print to file descriptor 1 too (gloo: "[Gloo] Rank 0 is
    connected to ..."): descriptor 1 is pointed at stderr and ``sys.stdout`` keeps the real stdout.
    """
    import jax

    if jax.process_count() == 1:
        return sys.stdout
    sys.stdout.flush()
    answer = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    if not multihost.is_main_process():
        answer.close()
        answer = open(os.devnull, "w")
    sys.stdout = answer  # Python's own prints (and input()'s prompt) follow the answer
    return answer


def cmd_generate(args) -> int:
    mesh = multihost.init_from_args(args)
    out = _out()
    image = _image(args.image)  # fail on a bad image before loading the model
    model = _load(args, mesh)
    for piece in model.stream(image, args.prompt, template=args.template, **_sampling(args)):
        out.write(piece)
        out.flush()
    out.write("\n")
    return 0


def _query() -> bytes:
    try:
        return input("you> ").strip().encode()
    except EOFError:
        print()
        return b""


def cmd_chat(args) -> int:
    mesh = multihost.init_from_args(args)
    out = _out()
    image = _image(args.image)
    model = _load(args, mesh)
    history: list[tuple[str, str]] = []
    out.write("cogvlm-jax chat: empty line or Ctrl-D to quit, '/image PATH' to change the picture, '/clear' to "
              "restart.\n")
    while True:
        query = multihost.from_main(_query).decode()
        if not query:
            return 0
        if query.startswith("/image "):
            image, history = _image(query[7:].strip()), []
            continue
        if query == "/clear":
            history = []
            continue
        out.write("cogvlm> ")
        answer = []
        for piece in model.stream(image, query, tuple(history), template=args.template, **_sampling(args)):
            answer.append(piece)
            out.write(piece)
            out.flush()
        out.write("\n")
        history.append((query, "".join(answer)))


def _cpu_mesh(text: str):
    """A mesh of this shape over CPU devices (made up to the count needed): it sets the stored chunk layout."""
    import jax

    from cogvlm_jax.axes import make_mesh

    shape = multihost.parse_mesh(text)
    n = shape[0] * shape[1] * shape[2]
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:  # backends already up: use the CPU devices there are
        pass
    devices = jax.devices("cpu")
    if len(devices) < n:
        raise ValueError(f"--mesh {text} needs {n} CPU devices; this process has {len(devices)}")
    return make_mesh(*shape, devices=devices[:n])


def cmd_convert(args) -> int:
    from convert.convert_hf import main_convert

    mesh = _cpu_mesh(args.mesh) if args.mesh else None
    return main_convert(args.src, args.dst, to=args.to, mesh=mesh) or 0


def cmd_plan(args) -> int:
    from cogvlm_jax.config import load_config
    from cogvlm_jax.plan import format_plan, plan

    data, fsdp, tensor = multihost.parse_mesh(args.mesh)
    cfg = load_config(args.config)
    context = args.context or cfg.context_length
    p = plan(cfg, data, fsdp, tensor, args.dtype, args.batch, context)
    print(format_plan(cfg.name or args.config, p, args.dtype, args.batch, context))
    return 0


def cmd_bench(args) -> int:
    from benchmarks.run import main as bench_main

    return bench_main(args.bench_args) or 0


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
    cv.add_argument("--mesh", metavar="DATA,FSDP,TENSOR",
                    help="store each tensor in chunks of its shard on this mesh (made of CPU devices), so that "
                         "loading on it, in one process or several, reads only each process's slices")
    cv.set_defaults(func=cmd_convert)

    pl = sub.add_parser("plan", help="per-device memory of parameters and KV cache on a mesh (nothing allocated)")
    pl.add_argument("--config", required=True, help="config.json, checkpoint directory or preset name")
    pl.add_argument("--mesh", default="1,1,1", help="DATA,FSDP,TENSOR")
    pl.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    pl.add_argument("--batch", type=int, default=1)
    pl.add_argument("--context", type=int, help="KV cache length (default: the model's context)")
    pl.set_defaults(func=cmd_plan)

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
