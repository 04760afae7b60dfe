"""``cogvlm-jax convert|generate|chat|train|serve|plan|compile|bench``: bad input is one clear line on stderr
and a non-zero exit.

``generate``, ``chat``, ``train`` and ``serve`` run on one device, on a mesh (``--mesh``), or as one of
several processes (``--coordinator/--num-processes/--process-id``, see ``multihost.py``): then process 0
reads the input and prints (``train``: writes the log and the export; ``serve``: serves HTTP), the others
follow it.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import signal
import sys
from typing import Optional
import threading

from cogvlm_jax import files
from cogvlm_jax.api import DEFAULT_MODEL, DEFAULT_MODEL_NAME
from cogvlm_jax.dtypes import DTYPES
from cogvlm_jax.generation import prefix_cache
from cogvlm_jax.models.execution import LAYOUTS
from cogvlm_jax.parallel import compile_cache, multihost
from cogvlm_jax.parallel.heartbeat import DEFAULT_TIMEOUT_S as PEER_TIMEOUT_S
from cogvlm_jax.parallel.heartbeat import EXIT_PEER_LOST

TEMPLATES = ("chat", "vqa", "base")
EXIT_USAGE = 2  # bad input: one line on stderr (argparse's own status for a bad option)
EXIT_INTERRUPTED = 130  # Ctrl-C: 128 + SIGINT, as a shell reports a process the signal ended
# The errors a user's input causes, printed as one line: every error class of the project subclasses
# ValueError (ConfigError, CheckpointError, DataError, TokenizerError, ImageError, InputError, ClusterError,
# AotError) and names the problem; OSError covers a missing, unreadable or unwritable path.
USER_ERRORS = (ValueError, OSError)


class _Parser(argparse.ArgumentParser):
    """argparse, its errors one line (``cogvlm-jax VERB: error: ...``, exit status 2) like every other error
    of the CLI, without the usage block (``--help`` prints it)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _int(low: int | None = None, high: int | None = None):
    """An argparse type: a decimal integer in [low, high] (either bound may be None), else a clear error."""
    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if (low is not None and value < low) or (high is not None and value > high):
            want = f"in [{low}, {high}]" if low is not None and high is not None else \
                f">= {low}" if low is not None else f"<= {high}"
            raise argparse.ArgumentTypeError(f"must be an integer {want}, got {value}")
        return value
    return parse


def _float(low: float | None = None, high: float | None = None, low_open: bool = False):
    """An argparse type: a finite number in [low, high] (``low_open``: (low, high]), else a clear error."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        bounds = ([f"> {low:g}" if low_open else f">= {low:g}"] if low is not None else []) + \
            ([f"<= {high:g}"] if high is not None else [])
        if not (math.isfinite(value) and (low is None or value > low or (value == low and not low_open)) and
                (high is None or value <= high)):
            raise argparse.ArgumentTypeError(f"must be a finite number{' ' if bounds else ''}{' and '.join(bounds)}, "
                                             f"got {text!r}")
        return value
    return parse


POSITIVE, NON_NEGATIVE = _int(1), _int(0)
PORT = _int(0, 65535)
_mesh = multihost.mesh_arg  # DATA,FSDP,TENSOR, three counts >= 1

_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """An argparse type: a size in bytes, ``5GB`` / ``500MB`` / ``2GiB`` / ``1048576`` (decimal or binary
    units, as Hugging Face's ``max_shard_size``), at least 1 byte."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", text, re.IGNORECASE)
    if m is None:
        raise argparse.ArgumentTypeError(f"expected a size such as 5GB, 500MB, 2GiB or a number of bytes, got {text!r}")
    value = int(float(m.group(1)) * _SIZE_UNITS[(m.group(2) or "").upper()])
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 byte, got {text!r}")
    return value


def _add_revision_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--revision", help="branch, tag or commit of a Hugging Face Hub id (default: main)")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="checkpoint directory (HF safetensors or converted) or Hugging Face Hub id; "
                   "default: the small model shipped in the package (coloured shapes only, see docs/default-model.md)")
    _add_revision_arg(p)
    p.add_argument("--tokenizer", help="tokenizer.model / tokenizer.json, its directory or a Hub id (default: beside "
                   "the model)")
    p.add_argument("--dtype", default="float32", choices=tuple(DTYPES))
    _add_quantize_args(p)
    p.add_argument("--template", choices=TEMPLATES, help="prompt template (default: the checkpoint's)")
    p.add_argument("--max-new-tokens", type=POSITIVE,
                   help="the most tokens an answer may take (default: until eos or the context is full)")
    p.add_argument("--temperature", type=_float(0.0), default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=NON_NEGATIVE, help="0 = off")
    p.add_argument("--top-p", type=_float(0.0, 1.0, low_open=True))
    p.add_argument("--seed", type=NON_NEGATIVE, default=0)
    multihost.add_cli_args(p)


def _add_quantize_args(p: argparse.ArgumentParser, what: str = "hold") -> None:
    p.add_argument("--quantize", choices=("int8", "int4"),
                   help=f"{what} the decoder, lm_head and adapter weights as int8 (per output channel) or int4 "
                        "(groups of 128 inputs); a checkpoint converted with --quantize loads as it is stored")
    p.add_argument("--quantize-vision", action="store_true", help="with --quantize: the ViT's linears too")


def _quantize_kw(args) -> dict:
    return dict(quantize=args.quantize, quantize_vision=args.quantize_vision)


def _sampling(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, seed=args.seed)


def check_tokenizer(tokenizer: str | None, model: str | None, revision: str | None = None) -> None:
    """Every verb that reads or writes text needs a tokenizer: find it before any weights are read, and
    name the flag that gives one (``--tokenizer``) if there is none. The model's config.json is read first,
    so that a bad one is the error shown (a folder without one is ``load``'s to name). Hub ids are
    resolved (fetched if need be) first: ``load`` then finds them in the cache."""
    from cogvlm_jax.config import load_config
    from cogvlm_jax.hub import resolve
    from cogvlm_jax.inputs.tokenizer import TokenizerError, tokenizer_dir, tokenizer_files

    name = model
    model = DEFAULT_MODEL if model is None else resolve(model, revision, progress=multihost.is_main_process())
    is_checkpoint = os.path.isfile(os.path.join(model, "config.json"))
    if is_checkpoint:
        load_config(model)
    if tokenizer is not None:
        found = resolve(tokenizer, kind="tokenizer", progress=multihost.is_main_process())
        if not os.path.exists(found):
            raise TokenizerError(f"--tokenizer {tokenizer} does not exist")
        if not tokenizer_files(found):
            raise TokenizerError(f"--tokenizer {tokenizer} holds no tokenizer.json or tokenizer.model (nor does its "
                                 "tokenizer/ folder)")
    elif is_checkpoint and tokenizer_dir(model) is None:
        raise TokenizerError(f"no tokenizer beside the model {name} (tokenizer.json or tokenizer.model, in it or in "
                             "its tokenizer/ folder): pass --tokenizer FILE_OR_DIRECTORY (CogVLM1 checkpoints use "
                             "Vicuna's: --tokenizer lmsys/vicuna-7b-v1.5)")


def _load(args, mesh):
    import cogvlm_jax

    check_tokenizer(args.tokenizer, args.model, args.revision)
    return cogvlm_jax.load(args.model, dtype=args.dtype, tokenizer=args.tokenizer, mesh=mesh,
                           progress=multihost.is_main_process(), layout=args.layout, revision=args.revision,
                           **_quantize_kw(args))


def _image(path):
    """The image at ``path`` (read by process 0 and shared when several processes run), or None."""
    from cogvlm_jax.inputs.preprocess import load_image

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


def _boxes_format(path: str, image) -> str:
    """The PIL format ``--boxes-out PATH`` is written in (from its extension), checked before the model
    loads: an image to draw on, a known extension, an existing folder."""
    from PIL import Image

    if image is None:
        raise ValueError("--boxes-out needs --image: the boxes are drawn on the picture asked about")
    fmt = Image.registered_extensions().get(os.path.splitext(path)[1].lower())
    if fmt is None or fmt not in Image.SAVE:
        raise ValueError(f"--boxes-out {path}: unknown image extension (use .png, .jpg, .webp, ...)")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ValueError(f"--boxes-out {path}: folder {parent} does not exist")
    return fmt


def _write_boxes(path: str, fmt: str, image, answer: str) -> None:
    """The picture with the answer's boxes drawn, written atomically; how many is said on stderr."""
    from cogvlm_jax.grounding import draw_boxes, parse_boxes

    boxes = parse_boxes(answer, image.size)
    with files.atomic_file(path, "wb") as f:
        draw_boxes(image, boxes).save(f, format=fmt)
    print(f"cogvlm-jax generate: {len(boxes)} box{'es' * (len(boxes) != 1)} drawn in {path}", file=sys.stderr)


def cmd_generate(args) -> int:
    mesh = multihost.init_from_args(args)
    out = _out()
    if args.video is not None and args.image:
        raise ValueError("give --image or --video, not both")
    if args.video is not None and not os.path.isfile(args.video):
        raise FileNotFoundError(f"video file {args.video} not found")
    if args.video is not None and args.boxes_out is not None:
        raise ValueError("--boxes-out draws on an --image, not a --video")
    images = [_image(path) for path in args.image or ()]  # fail on a bad image before loading the model
    image = images[0] if len(images) == 1 else images or None
    if args.boxes_out is not None and len(images) > 1:
        raise ValueError(f"--boxes-out draws on one picture; {len(images)} --image given")
    boxes_format = None if args.boxes_out is None else _boxes_format(args.boxes_out, image)
    model = _load(args, mesh)
    video = dict(video=args.video, video_strategy=args.video_strategy) if args.video is not None else {}
    answer = []
    for piece in model.stream(image, args.prompt, template=args.template, **video, **_sampling(args)):
        answer.append(piece)
        out.write(piece)
        out.flush()
    out.write("\n")
    if boxes_format is not None and multihost.is_main_process():
        _write_boxes(args.boxes_out, boxes_format, image, "".join(answer))
    return 0


def _query() -> bytes:
    try:
        return input("you> ").strip().encode()
    except EOFError:
        print()
        return b""


def cmd_chat(args) -> int:
    from cogvlm_jax.generation.errors import InputError

    mesh = multihost.init_from_args(args)
    out = _out()
    images = [_image(path) for path in args.image or ()]  # a bad image fails before the model loads
    image = images[0] if len(images) == 1 else images or None
    model = _load(args, mesh)
    history: list[tuple[str, str]] = []
    out.write("cogvlm-jax chat: empty line or Ctrl-D to quit, '/image PATH' to change the picture, '/clear' to "
              "restart.\n")
    def refused(e: Exception) -> None:
        """A mistyped /image or a question too long: said, and the conversation goes on as it was (every
        process raises the same error: several processes share process 0's input)."""
        if multihost.is_main_process():
            print(f"cogvlm-jax chat: {e}", file=sys.stderr)

    while True:
        query = multihost.from_main(_query).decode()
        if not query:
            return 0
        if query.startswith("/image "):
            try:
                image, history = _image(query[7:].strip()), []
            except ValueError as e:
                refused(e)
            continue
        if query == "/clear":
            history = []
            continue
        pieces = model.stream(image, query, tuple(history), template=args.template, **_sampling(args))
        try:
            answer = [next(pieces, "")]  # the prompt is checked here, before anything is printed
        except InputError as e:
            refused(e)
            continue
        out.write("cogvlm> " + answer[0])
        out.flush()
        for piece in pieces:
            answer.append(piece)
            out.write(piece)
            out.flush()
        out.write("\n")
        history.append((query, "".join(answer)))


def cmd_convert(args) -> int:
    from cogvlm_jax.training.export import main_convert

    mesh = multihost.mesh_from_flag(args.mesh, cpu=True) if args.mesh else None
    if args.quantize_vision and not args.quantize:
        raise ValueError("--quantize-vision needs --quantize int8 or int4")
    kw = _quantize_kw(args) if args.quantize else {}
    return main_convert(args.src, args.dst, to=args.to, overwrite=args.overwrite, mesh=mesh,
                        max_shard_bytes=args.max_shard_size, revision=args.revision, **kw) or 0


def cmd_plan(args) -> int:
    from cogvlm_jax.config import load_config
    from cogvlm_jax.hub import resolve
    from cogvlm_jax.parallel.planner import format_plan, plan

    data, fsdp, tensor = multihost.parse_mesh(args.mesh)
    cfg = load_config(resolve(args.config, args.revision, kind="config"))
    context = args.context or cfg.context_length
    from cogvlm_jax.models.quantize import make

    p = plan(cfg, data, fsdp, tensor, args.dtype, args.batch, context,
             quant=make(args.quantize, args.quantize_vision, "tpu"))
    print(format_plan(cfg.name or args.config, p, args.dtype, args.batch, context, args.quantize))
    if args.target:  # what the shapes leave out: the compiled program's temporaries, outputs and code
        from cogvlm_jax import aot

        aot.compile_only_process()
        r = aot.report(aot.compile_for(cfg, target=args.target, mesh=(data, fsdp, tensor), program="decode",
                                       batch=args.batch, cache_length=context, dtype=args.dtype, check_fit=False,
                                       **_quantize_kw(args)))
        print(aot.format_fit(r))
    return 0


def cmd_compile(args) -> int:
    """Compile one program for a TPU slice or GPU host on this machine (``cogvlm_jax.aot``) and print its report."""
    from cogvlm_jax import aot
    from cogvlm_jax.hub import resolve

    args.config = resolve(args.config, args.revision, kind="config")
    aot.compile_only_process()  # this process runs nothing itself: libtpu / the CUDA plugin only compile
    train_config = None
    if args.program == "train":
        from cogvlm_jax.training.trainer import TrainConfig

        train_config = TrainConfig(trainable=args.trainable, remat=args.remat)
    kw = dict(batch=args.batch, cache_length=args.cache_length, prompt_length=args.prompt_length, image=args.image,
              frames=args.frames,
              dtype=args.dtype, max_new_tokens=args.max_new_tokens, chunk=args.chunk, train_config=train_config,
              **_quantize_kw(args))
    mesh = multihost.parse_mesh(args.mesh) if args.mesh else None
    kw["layout"] = args.layout
    compiled = aot.compile_for(args.config, target=args.target, mesh=mesh, program=args.program,
                               check_fit=not args.no_fit_check, **kw)
    print(aot.report(compiled).format())
    if args.per_layer:
        per = aot.layer_collectives(args.config, args.target, mesh, args.program, **kw)
        print("  collectives per decoder layer: " + (", ".join(f"{k} {v}" for k, v in per.items() if v) or "none"))
    if args.hlo:
        files.write_text(args.hlo, compiled.as_text() or "")
    return 0


def benchmark_checkout(package_dir: str = os.path.dirname(os.path.abspath(__file__)),
                       cwd: Optional[str] = None) -> Optional[str]:
    """The source checkout ``cogvlm-jax bench`` runs the benchmarks in, or None: the one this package was
    installed from in editable mode, else the working directory if it is one. The benchmarks are not
    installed with the package (they read the test fixtures)."""
    for root in (os.path.dirname(package_dir), os.path.abspath(cwd or os.getcwd())):
        if all(os.path.exists(os.path.join(root, *part)) for part in
               (("benchmarks", "run.py"), ("tests", "fixtures"), ("cogvlm_jax", "cli.py"))):
            return root
    return None


BENCH_RUN = "import sys; from benchmarks.run import main; sys.exit(main(sys.argv[1:], prog='cogvlm-jax bench'))"


def cmd_bench(args) -> int:
    """``python -m benchmarks.run`` with every option given (``--help`` lists them) in the source checkout
    (``benchmark_checkout``); without one, one line says so."""
    import subprocess

    root = benchmark_checkout()
    if root is None:
        raise FileNotFoundError("the benchmarks need a source checkout: run cogvlm-jax bench inside one (or "
                                "pip install -e . there); this installation has no benchmarks/ or tests/fixtures/")
    return subprocess.call([sys.executable, "-c", BENCH_RUN, *args.bench_args], cwd=root)


# cogvlm-jax train: option -> (RunConfig / TrainConfig field, default). Defaults are applied here, so that
# on --resume only the options actually given are checked against the run's saved settings.
_TRAIN_OPTIONS = {
    "data": ("data", None), "model": ("model", DEFAULT_MODEL), "tokenizer": ("tokenizer", None),
    "template": ("template", None), "batch_size": ("batch_size", 8), "seed": ("seed", 0),
    "dtype": ("dtype", "float32"), "mesh": ("mesh", "1,1,1"),
    "trainable": ("train.trainable", "full"), "steps": ("train.total_steps", None),
    "lr": ("train.learning_rate", 1e-4), "warmup": ("train.warmup_steps", 0),
    "end_lr_ratio": ("train.end_lr_ratio", 0.0), "weight_decay": ("train.weight_decay", 0.0),
    "max_grad_norm": ("train.max_grad_norm", 1.0), "adam_eps": ("train.eps", 1e-8), "accum": ("train.accum", 1), "remat": ("train.remat", False),
    "lora_rank": ("train.lora_rank", 8), "lora_alpha": ("train.lora_alpha", 16.0),
    "lora_targets": ("train.lora_targets", None),
    "quantize": ("train.quantize", None), "quantize_vision": ("train.quantize_vision", False),
}


def _run_config(args, base=None):
    """The RunConfig of ``cogvlm-jax train``: ``base`` (a resumed run's) or the defaults, then the options given."""
    import dataclasses
    import os

    from cogvlm_jax.hub import resolve
    from cogvlm_jax.training.run import RunConfig
    from cogvlm_jax.training.trainer import TrainConfig

    if args.revision is not None and args.model is None:
        raise ValueError("--revision is the revision of --model's Hub id: give --model too")
    top, tc = {}, {}
    for opt, (field, default) in _TRAIN_OPTIONS.items():
        value = getattr(args, opt)
        if value is None or value is False:
            if base is not None:
                continue
            value = default
        if value is None:
            continue
        if opt in ("model", "tokenizer"):  # a Hub id: its snapshot in the cache, recorded as a directory
            value = resolve(value, args.revision if opt == "model" else None, kind=opt, progress=not args.quiet)
        if opt in ("data", "model", "tokenizer"):
            value = os.path.abspath(value)
        elif opt == "mesh":
            value = multihost.parse_mesh(value)
        elif opt == "lora_targets":
            value = tuple(t.strip() for t in value.split(",") if t.strip())
        if field.startswith("train."):
            tc[field[len("train."):]] = value
        else:
            top[field] = value
    if base is not None:
        return dataclasses.replace(base, **top, train=dataclasses.replace(base.train, **tc))
    if "data" not in top:
        raise ValueError("--data is required for a new run")
    if "total_steps" not in tc:  # --epochs: fit() sets the step count once the data is read
        tc["total_steps"] = max(1, tc.get("warmup_steps", 0))
    return RunConfig(train=TrainConfig(**tc), **top)


def cmd_train(args) -> int:
    from cogvlm_jax.training import run as finetune

    if args.steps is not None and args.epochs is not None:
        raise ValueError("give --steps or --epochs, not both")
    multihost.initialize(args.coordinator, args.num_processes, args.process_id, args.init_timeout)
    out = _out()
    shape = multihost.default_mesh_shape()
    if args.mesh is None and not args.resume and shape is not None:  # several processes: fsdp over them
        args.mesh = ",".join(map(str, shape))
    epochs = args.epochs
    if epochs is None and args.steps is None and not args.resume:
        epochs = 1.0
    run = _run_config(args, finetune.read_run(args.out) if args.resume else None)
    if not args.resume:
        check_tokenizer(run.tokenizer, run.model)
    path = finetune.fit(args.out, run, resume=args.resume, epochs=epochs, save_every=args.save_every,
                        keep=args.keep, progress=not args.quiet)
    out.write(path + "\n")
    return 0


def load_engine_and_config(args, mesh=None) -> tuple:
    """From the ``cogvlm-jax serve`` arguments (see ``cli.py``); the model on ``mesh`` if given."""
    import cogvlm_jax
    from cogvlm_jax.serving.engine import Engine
    from cogvlm_jax.serving.server import ServerConfig

    if args.max_image_pixels < 1:
        raise ValueError(f"--max-image-pixels must be >= 1, got {args.max_image_pixels}")
    if args.default_max_tokens is not None and args.default_max_tokens < 1:
        raise ValueError(f"--default-max-tokens must be >= 1, got {args.default_max_tokens}")
    if args.image_root is not None and not os.path.isdir(args.image_root):
        raise FileNotFoundError(f"--image-root {args.image_root} is not a directory")
    check_tokenizer(args.tokenizer, args.model, getattr(args, "revision", None))
    kw = dict(dtype=args.dtype, tokenizer=args.tokenizer, mesh=mesh, progress=multihost.is_main_process(),
              layout=getattr(args, "layout", None), revision=getattr(args, "revision", None),
              **_quantize_kw(args))
    model = cogvlm_jax.load(args.model, prefix_cache_bytes=0, **kw)  # the engine keeps its own
    name = args.model_name or (os.path.basename(os.path.normpath(args.model)) if args.model else DEFAULT_MODEL_NAME)
    engine = Engine(model, slots=args.slots, max_length=args.max_length, chunk=args.decode_chunk,
                    max_queue=args.max_queue, prefill_chunk=args.prefill_chunk,
                    prefix_cache_bytes=args.prefix_cache_mib << 20)
    config = ServerConfig(model_name=name, api_key=args.api_key, image_root=args.image_root,
                          max_image_bytes=args.max_image_bytes, max_image_pixels=args.max_image_pixels,
                          default_max_tokens=args.default_max_tokens,
                          drain_seconds=args.drain_seconds)
    return engine, config


def check_listen(host: str, port: int) -> None:
    """Fail before the model loads if the server could not listen on ``host:port`` (a name that does not
    resolve, an address not on this machine, a port in use or reserved): a socket is bound there and closed."""
    from cogvlm_jax.serving.server import bind

    try:
        bind(host, port).close()
    except OSError as e:  # socket.gaierror (a name that does not resolve) included
        raise OSError(f"cannot listen on --host {host} --port {port}: {e.strerror or e}") from None


def cmd_serve(args) -> int:
    from cogvlm_jax.serving.server import serve

    import jax

    from cogvlm_jax.serving.peers import PeerWatch

    if not args.peer_timeout > 0:
        raise ValueError(f"--peer-timeout must be > 0 seconds, got {args.peer_timeout}")
    mesh = multihost.init_from_args(args, recoverable=True)  # a lost peer: PeerWatch decides, JAX does not abort
    watch = PeerWatch(args.peer_timeout) if jax.process_count() > 1 else None
    out = _out()
    if multihost.is_main_process():
        check_listen(args.host, args.port)
    engine, config = load_engine_and_config(args, mesh)
    if watch is not None:
        watch.engine = engine
    try:
        if not multihost.is_main_process():  # process 0 serves HTTP; this one runs the same device programs
            engine.follow()
            watch.stop()
            multihost.leave(0)

        def announce(line: str) -> None:
            out.write(line + "\n")
            out.flush()

        return serve(engine, config, host=args.host, port=args.port, log_level=args.log_level, announce=announce,
                     exit_after=True)
    finally:
        if watch is not None:
            watch.stop()


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cogvlm-jax", description="CogVLM / CogVLM2 in JAX")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="answer one question about an image, streamed")
    _add_model_args(g)
    g.add_argument("--image", action="append", help="image file (omit for a text-only prompt); repeat it for "
                   "several images, one span each in the order given")
    g.add_argument("--video", help="video file, for a CogVLM2-Video checkpoint (docs/video.md)")
    g.add_argument("--video-strategy", choices=("base", "chat"), default=None,
                   help="how frames are sampled: base (24 evenly over the first 60 s) or chat (the frame nearest "
                        "each second, up to 24); default: by the template")
    g.add_argument("--prompt", required=True)
    g.add_argument("--boxes-out", metavar="PATH",
                   help="write the image with the answer's [[x0,y0,x1,y1]] boxes drawn (grounding models; the "
                        "format from the extension), replaced atomically")
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="multi-turn chat about an image")
    _add_model_args(c)
    c.add_argument("--image", action="append", help="image file; repeat it for several images, one span each in "
                   "the order given (the conversation keeps them; '/image PATH' starts again with one)")
    c.set_defaults(func=cmd_chat)

    cv = sub.add_parser("convert", help="HF safetensors -> our Orbax format, or back with --to hf")
    cv.add_argument("src")
    cv.add_argument("dst")
    cv.add_argument("--to", choices=("ours", "hf"), default="ours",
                    help="hf: export ours, or a training checkpoint OUT/checkpoints/step_N (full or vision-expert)")
    cv.add_argument("--max-shard-size", type=parse_size, metavar="SIZE",
                    help="--to hf: shards of at most SIZE (5GB, 500MB, 2GiB, bytes), a larger tensor alone; default: "
                         "the files of the HF checkpoint SRC was converted from (its shards and index, or one file)")
    cv.add_argument("--overwrite", action="store_true", help="replace DST if it exists and is not empty")
    _add_revision_arg(cv)
    cv.add_argument("--mesh", metavar="DATA,FSDP,TENSOR", type=_mesh,
                    help="store each tensor in chunks of its shard on this mesh (made of CPU devices), so that "
                         "loading on it, in one process or several, reads only each process's slices")
    _add_quantize_args(cv, "store")
    cv.set_defaults(func=cmd_convert)

    pl = sub.add_parser("plan", help="per-device memory of parameters and KV cache on a mesh (nothing allocated)")
    pl.add_argument("--config", required=True, help="config.json, checkpoint directory, Hub id or preset name")
    _add_revision_arg(pl)
    pl.add_argument("--mesh", default="1,1,1", type=_mesh, help="DATA,FSDP,TENSOR")
    pl.add_argument("--dtype", default="bfloat16", choices=tuple(DTYPES))
    pl.add_argument("--batch", type=POSITIVE, default=1)
    pl.add_argument("--context", type=POSITIVE, help="KV cache length (default: the model's context)")
    pl.add_argument("--target", help="also compile the decode loop for this target (v5e-8, v6e-8, v4-8, v5p-8, "
                                     "h100-8; needs the [aot] extra) and report its temporaries and peak")
    _add_quantize_args(pl, "count")
    pl.set_defaults(func=cmd_plan)

    co = sub.add_parser("compile", help="compile a program for a TPU slice or GPU host here (no accelerator needed) "
                        "and print its memory, cost and collectives")
    co.add_argument("--config", required=True, help="config.json, checkpoint directory, Hub id or preset name")
    _add_revision_arg(co)
    co.add_argument("--target", default="v5e-8", help="v5e-8, v6e-8, v4-8, v5p-8 or h100-8 (default v5e-8)")
    co.add_argument("--mesh", metavar="DATA,FSDP,TENSOR", type=_mesh, help="default: every device on tensor")
    co.add_argument("--program", default="decode",
                    choices=("prefill", "decode", "decode_step", "insert", "decode_chunk", "train"))
    co.add_argument("--batch", type=POSITIVE, default=1, help="rows (insert / decode_chunk: the server's slots)")
    co.add_argument("--cache-length", type=POSITIVE, help="KV slots per row (default: the model's context; prefill: "
                    "the prompt plus --max-new-tokens)")
    co.add_argument("--prompt-length", type=POSITIVE, help="prefill / insert / train: tokens per row")
    co.add_argument("--image", action="store_true", help="prefill / insert / train: one image per row")
    co.add_argument("--frames", type=POSITIVE, default=None,
                    help="a video model (CogVLM2-Video): video frames per row (default with --image: 24)")
    co.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    co.add_argument("--max-new-tokens", type=POSITIVE, default=256)
    co.add_argument("--chunk", type=POSITIVE, help="decode_chunk: decode steps per call (default the server's, 4)")
    co.add_argument("--trainable", default="full", choices=("full", "vision-expert", "lora"))
    co.add_argument("--remat", action="store_true", help="train: recompute each layer in the backward pass")
    co.add_argument("--layout", choices=LAYOUTS,
                    help="how the programs split over the mesh (default: the target's, megatron; train: exact)")
    _add_quantize_args(co, "compile with")
    co.add_argument("--per-layer", action="store_true",
                    help="also the collectives one decoder layer adds (two more compiles, of 1 and 2 layers)")
    co.add_argument("--no-fit-check", action="store_true", help="report a program that does not fit instead of "
                    "failing")
    co.add_argument("--hlo", metavar="FILE", help="write the compiled HLO text here")
    co.set_defaults(func=cmd_compile)

    t = sub.add_parser("train", help="fine-tune on a JSONL file (full, vision-expert or LoRA), with checkpoints, "
                                     "--resume and an exported model in OUT/model")
    t.add_argument("--data", help='JSONL: {"image": path, "query": str, "answer": str, "history": [[q, a], ...]}')
    t.add_argument("--model", help="checkpoint to start from (HF safetensors or converted, or a Hub id); default: "
                   "the small model shipped in the package, like generate and serve")
    _add_revision_arg(t)
    t.add_argument("--out", required=True, help="run directory: run.json, log.jsonl, checkpoints/, model/")
    t.add_argument("--tokenizer", help="tokenizer file, directory or Hub id (default: beside the model)")
    t.add_argument("--template", choices=TEMPLATES, help="prompt template (default: the model's)")
    t.add_argument("--trainable", choices=("full", "vision-expert", "lora"), help="what to train (default full)")
    t.add_argument("--steps", type=POSITIVE, help="optimizer steps (default: --epochs 1)")
    t.add_argument("--epochs", type=_float(0.0, low_open=True), help="passes over the data (instead of --steps)")
    t.add_argument("--batch-size", type=POSITIVE, help="records per optimizer step (default 8)")
    t.add_argument("--accum", type=POSITIVE, help="micro-batches per step (gradient accumulation; default 1)")
    t.add_argument("--lr", type=_float(0.0, low_open=True), help="peak learning rate (default 1e-4)")
    t.add_argument("--warmup", type=NON_NEGATIVE, help="linear warmup steps (default 0), then cosine decay")
    t.add_argument("--end-lr-ratio", type=_float(0.0, 1.0), help="final learning rate / peak (default 0)")
    t.add_argument("--weight-decay", type=_float(0.0), help="AdamW decoupled weight decay (default 0)")
    t.add_argument("--max-grad-norm", type=_float(0.0), help="global gradient-norm clip, 0 = off (default 1)")
    t.add_argument("--adam-eps", type=_float(0.0, low_open=True),
                   help="AdamW's epsilon, added to the root of the second moment (default 1e-8)")
    t.add_argument("--lora-rank", type=POSITIVE, help="LoRA rank (default 8)")
    t.add_argument("--lora-alpha", type=_float(0.0, low_open=True),
                   help="LoRA alpha; the update is scaled by alpha / rank (default 16)")
    t.add_argument("--lora-targets", help="comma-separated globs over linear-layer paths (default: the decoder's "
                                          "attention projections, both experts)")
    t.add_argument("--remat", action="store_true", default=None, help="recompute layers in the backward pass")
    t.add_argument("--quantize", choices=("int8", "int4"),
                   help="with --trainable lora (QLoRA): hold the frozen base's decoder, lm_head and adapter weights "
                        "as int8 (per output channel) or int4 (groups of 128 inputs); the factors stay float32 and "
                        "the export is float (the dequantized base, the factors merged)")
    t.add_argument("--quantize-vision", action="store_true", help="with --quantize: the ViT's linears too")
    t.add_argument("--save-every", type=POSITIVE, default=100, help="checkpoint every N steps (and at the end)")
    t.add_argument("--keep", type=POSITIVE, default=3, help="checkpoints kept (newest)")
    t.add_argument("--seed", type=NON_NEGATIVE, help="data order and LoRA initialisation (default 0)")
    t.add_argument("--dtype", choices=tuple(DTYPES),
                   help="compute dtype, frozen weights and export (trainable weights stay float32; default float32)")
    t.add_argument("--mesh", type=_mesh, help="DATA,FSDP,TENSOR devices (default 1,1,1; with several processes "
                                  "1,PROCESSES,DEVICES-PER-PROCESS)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    multihost.add_cli_args(t, mesh=False)
    t.set_defaults(func=cmd_train)

    sv = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching, and a chat page at /")
    sv.add_argument("--model", help="checkpoint directory (HF safetensors or converted) or Hugging Face Hub id; "
                    "default: the small model shipped in the package (coloured shapes only, see docs/default-model.md)")
    _add_revision_arg(sv)
    sv.add_argument("--tokenizer", help="tokenizer file, directory or Hub id (default: beside the model)")
    sv.add_argument("--dtype", default="float32", choices=tuple(DTYPES))
    _add_quantize_args(sv)
    sv.add_argument("--model-name", help="the id clients send as 'model' (default: the checkpoint's directory name, "
                    f"or {DEFAULT_MODEL_NAME!r} for the shipped model)")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=PORT, default=8000, help="0: any free port (printed at start)")
    sv.add_argument("--slots", type=POSITIVE, default=8, help="requests decoded together")
    sv.add_argument("--max-length", type=POSITIVE, help="KV cache tokens per slot: prompt + max_tokens, the prompt "
                                                   "padded to its bucket where that fits (default: the model's "
                                                   "context length)")
    sv.add_argument("--max-queue", type=NON_NEGATIVE, default=64, help="requests waiting for a slot before 429")
    sv.add_argument("--decode-chunk", type=POSITIVE, default=4, help="decode steps per device call")
    sv.add_argument("--prefill-chunk", type=NON_NEGATIVE, default=0,
                    help="chunked prefill: the most text-prompt tokens prefilled inside each decode step (no "
                         "compile per prompt length); 0 (default): each prompt prefilled alone")
    sv.add_argument("--prefix-cache-mib", type=NON_NEGATIVE, default=prefix_cache.DEFAULT_BYTES >> 20,
                    help="device memory (MiB) for the keys and values of recent conversations and the features "
                         "of their images: a follow-up turn prefills only its new tokens; 0: off (default: "
                         "%(default)s)")
    sv.add_argument("--default-max-tokens", type=POSITIVE,
                    help="the most tokens of an answer whose request sets no max_tokens (default: until eos or "
                         "the context is full)")
    sv.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every endpoint but /health and /")
    sv.add_argument("--image-root", help="directory file:// image URLs may read from (default: none allowed)")
    sv.add_argument("--max-image-bytes", type=POSITIVE, default=20 << 20)
    sv.add_argument("--max-image-pixels", type=POSITIVE, default=40_000_000,
                    help="width x height an image may declare, checked before it is decoded (default 40 MP)")
    sv.add_argument("--drain-seconds", type=_float(0.0), default=30.0,
                    help="on SIGTERM, time running requests get to finish")
    sv.add_argument("--peer-timeout", type=float, default=PEER_TIMEOUT_S,
                    help="several processes: a process silent this long is lost; process 0 then answers 503 and "
                         f"exits with status {EXIT_PEER_LOST} naming it (default {PEER_TIMEOUT_S:g} s)")
    sv.add_argument("--log-level", default="warning", choices=("critical", "error", "warning", "info", "debug"))
    multihost.add_cli_args(sv)
    sv.set_defaults(func=cmd_serve)

    bn = sub.add_parser("bench", add_help=False,
                        help="benchmarks against the hardware limit, in a source checkout (bench --help: the options)")
    bn.add_argument("bench_args", nargs=argparse.REMAINDER)
    bn.set_defaults(func=cmd_bench)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if argv[:1] == ["bench"]:
        # everything after the verb, --help included, is benchmarks.run's own (argparse's REMAINDER stops at a
        # leading option)
        args = parser.parse_args(["bench"])
        args.bench_args = argv[1:]
    else:
        args = parser.parse_args(argv)
    if args.command not in ("compile", "plan", "bench"):
        # before anything compiles (see compile_cache); `compile` and `plan --target` report XLA's own compile seconds for their
        # targets, which a cached program would replace by a file read, and `bench` runs in a child process
        compile_cache.enable()
    with _exit_on_interrupt(args.command):
        try:
            return args.func(args)
        except KeyboardInterrupt:
            print(f"cogvlm-jax {args.command}: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        except USER_ERRORS as e:
            print(f"cogvlm-jax {args.command}: error: {e}", file=sys.stderr)
            return EXIT_USAGE


@contextlib.contextmanager
def _exit_on_interrupt(command: str):
    """While a verb runs, Ctrl-C (SIGINT) ends the process at once: one line on stderr, this process's writes
    in flight undone (``files.abandon_writes``: temporaries removed, a destination moved aside put back),
    exit status 130.

    The default handler raises KeyboardInterrupt wherever the main thread is, and that can be inside a
    callback XLA's C++ makes into Python in the middle of a compile: the exception then unwinds through C++
    (a segmentation fault) or is swallowed by it (the run goes on). Exiting from the handler never unwinds.
    The server replaces the handler while it serves, to drain running requests first.
    """
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return

    def interrupted(signum, frame):
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        with contextlib.suppress(Exception):
            sys.stderr.write(f"\ncogvlm-jax {command}: interrupted\n")
            sys.stderr.flush()
        with contextlib.suppress(Exception):
            files.abandon_writes()
        os._exit(EXIT_INTERRUPTED)

    previous = signal.signal(signal.SIGINT, interrupted)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


if __name__ == "__main__":
    sys.exit(main())
