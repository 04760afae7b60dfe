"""Accuracy of a coloured-shapes model (default: the shipped one) on fresh generated questions, by kind.

    python -m benchmarks.default_model [--model DIR] [--n 600] [--seed 424242] [--quantize int8|int4]

One JSON line per kind and one overall (exact match, as ``synthetic.score`` counts it), then the most
common mistakes. The scores in docs/default-model.md come from this with its defaults; its quantized
scores from ``--n 200 --seed 20261202`` (tests/test_default_model.py's questions) with and without
``--quantize``, and with its defaults.
"""

from __future__ import annotations

import argparse
import collections

from benchmarks.common import emit, record


def main(argv=None) -> int:
    import cogvlm_jax
    from cogvlm_jax.recipes import synthetic
    from cogvlm_jax.recipes.default_model import MAX_SHAPES

    p = argparse.ArgumentParser(prog="python -m benchmarks.default_model", description=__doc__.split("\n")[0])
    p.add_argument("--model", help="checkpoint directory (default: the shipped default model)")
    p.add_argument("--n", type=int, default=600, help="questions")
    p.add_argument("--seed", type=int, default=424242, help="the data set the questions come from")
    p.add_argument("--quantize", choices=("int8", "int4"), help="hold the model's weights quantized "
                   "(cogvlm_jax.load(..., quantize=))")
    p.add_argument("--batch-size", type=int, default=100, help="questions answered together")
    args = p.parse_args(argv)
    model = cogvlm_jax.load(args.model, progress=False, quantize=args.quantize)
    items = synthetic.examples(args.seed, args.n, max_shapes=MAX_SHAPES)
    acc, preds = synthetic.score(model, items, batch_size=args.batch_size)
    mistakes = collections.Counter((synthetic.kind_of(e.query), e.answer, pred) for e, pred in zip(items, preds)
                                   if not synthetic.exact_match(pred, e.answer))
    name = args.model or "default_model"
    quantize = args.quantize or "none"
    for kind, oks in synthetic.right_by_kind(items, preds).items():
        emit(record(f"default_model_{kind}", sum(oks) / len(oks), "exact match", config=name, questions=len(oks),
                    quantize=quantize))
    emit(record("default_model", acc, "exact match", config=name, questions=len(items), seed=args.seed,
                quantize=quantize))
    for (kind, answer, pred), n in mistakes.most_common(8):
        print(f"{n:4d} x {kind}: {answer!r} answered {pred!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
