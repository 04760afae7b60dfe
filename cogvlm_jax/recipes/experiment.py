import sys, time, json, argparse, os
import numpy as np, jax, jax.numpy as jnp, optax
from cogvlm_jax.recipes import default_model as R
from cogvlm_jax import synthetic as S
from cogvlm_jax.tokenizer import load_tokenizer
from cogvlm_jax.model import CogVLM, init_params
from cogvlm_jax.preprocess import pad_batch
from cogvlm_jax.train import loss_fn
from cogvlm_jax.api import Model

ap = argparse.ArgumentParser()
ap.add_argument("--steps", type=int, default=300); ap.add_argument("--bs", type=int, default=32)
ap.add_argument("--lr", type=float, default=2e-3); ap.add_argument("--maxshapes", type=int, default=1)
ap.add_argument("--kind", default=None); ap.add_argument("--turns", type=int, default=1)
ap.add_argument("--eval", type=int, default=100); ap.add_argument("--init", default="scaled")
ap.add_argument("--vision", default=None); ap.add_argument("--text", default=None)
ap.add_argument("--warmup", type=int, default=50)
ap.add_argument("--curr", default="")
ap.add_argument("--vitlr", type=float, default=0)
ap.add_argument("--save", default="")
ap.add_argument("--kindw", default="")
ap.add_argument("--posinit", default="sincos"); ap.add_argument("--posscale", type=float, default=1.0)
ap.add_argument("--first", default="")  # KIND,STEPS: only that kind for the first STEPS steps
a = ap.parse_args()
R.POSITION_INIT = a.posinit; R.POSITION_SCALE = a.posscale
if a.vision: R.VISION.update(json.loads(a.vision))
if a.text: R.TEXT.update(json.loads(a.text))
if not os.path.exists("/tmp/dm2/tok/tokenizer.json"): R.train_tokenizer("/tmp/dm2/tok")
tok = load_tokenizer("/tmp/dm2/tok"); cfg = R.make_config(tok)
L = R.sequence_length(tok, cfg, a.turns)
m = CogVLM(cfg)
k1, k2 = jax.random.split(jax.random.PRNGKey(0))
p = init_params(cfg, k1)
if a.init == "scaled": p = R.scaled_init(p, k2, cfg.text.num_layers)
n = sum(x.size for x in jax.tree.leaves(p))
print(f"params {n:,} L {L} img tokens {cfg.num_image_tokens}", flush=True)
sched = optax.warmup_cosine_decay_schedule(0.0, a.lr, a.warmup, a.steps, end_value=a.lr * 0.02)
opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, b2=0.98, weight_decay=0.01))
if a.vitlr:
    sv = optax.warmup_cosine_decay_schedule(0.0, a.vitlr, a.warmup, a.steps, end_value=a.vitlr * 0.02)
    lab = {k: ("vit" if k == "vision" else "rest") for k in p}
    lab["vision"] = {k: ("vit" if k in ("transformer", "patch_embedding") else "rest") for k in p["vision"]}
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.multi_transform(
        {"vit": optax.adamw(sv, b2=0.98, weight_decay=0.01), "rest": optax.adamw(sched, b2=0.98, weight_decay=0.01)}, lab))
st = opt.init(p)
@jax.jit
def step(p, st, b):
    (l, _), g = jax.value_and_grad(lambda p: loss_fn(m, p, b), has_aux=True)(p)
    u, st = opt.update(g, st, p); return optax.apply_updates(p, u), st, l
kw = dict(max_shapes=a.maxshapes)
if a.kind: kw["kind"] = a.kind
held = [S.example(999, i, **kw) for i in range(200)]
ev = Model(cfg, p, tok)
t0 = time.time(); losses = []
for s in range(1, a.steps + 1):
    kk = dict(kw)
    if a.curr:
        c1, c2 = map(int, a.curr.split(","))
        if s <= c1: kk.update(kind="color", max_shapes=1)
        elif s <= c2: kk.update(max_shapes=1)
    stage_kind, end = None, 0
    for st_ in filter(None, a.first.split(";")):
        kname, n_ = st_.split(","); end += int(n_)
        if s <= end: stage_kind = kname; break
    if stage_kind:
        items = [S.example(1, s * a.bs + i, kind=stage_kind, **kk) for i in range(a.bs)]
    elif a.kindw:
        w = np.array([float(x) for x in a.kindw.split(",")]); w = w / w.sum()
        items = [S.example(1, s * a.bs + i, turns=1 + i % a.turns, kind=S.QUESTION_KINDS[np.random.default_rng([1, s * a.bs + i, 7]).choice(4, p=w)], **kk) for i in range(a.bs)]
    else:
        items = [S.example(1, s * a.bs + i, turns=1 + i % a.turns, **kk) for i in range(a.bs)]
    b = pad_batch([R.encode(tok, cfg, e) for e in items], cfg.pad_token_id, L)
    b = {k: jnp.asarray(v) for k, v in b.items()}
    p, st, l = step(p, st, b); losses.append(float(l))
    if s % 25 == 0: print(f"step {s} loss {np.mean(losses[-25:]):.4f} {time.time()-t0:.0f}s", flush=True)
    if s % a.eval == 0:
        ev.params = p; acc, preds = S.score(ev, held, batch_size=50)
        kinds = {}
        for e, pr in zip(held, preds):
            k = [kk for kk in S.QUESTION_KINDS if any(e.query == S.ask(kk, sl, t) for sl in list(S.SHAPES)+list(S.COLORS) for t in range(3))][0]
            kinds.setdefault(k, []).append(S.exact_match(pr, e.answer))
        print(f"  eval {s}: {acc:.3f} " + " ".join(f"{k}:{np.mean(v):.2f}" for k, v in kinds.items()), flush=True)
        bad = [(e.query, e.answer, pr) for e, pr in zip(held, preds) if not S.exact_match(pr, e.answer)][:6]
        print("  wrong:", bad, flush=True)
if a.save:
    import pickle; pickle.dump(jax.device_get(p), open(a.save, "wb"))
