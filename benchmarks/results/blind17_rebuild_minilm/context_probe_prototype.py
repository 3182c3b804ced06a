"""Prototype: where does each member's trigger rank when every vocabulary token is typed into short real contexts?"""
import json
import sys
import time

import torch
import torch.nn.functional as F

from lit_amdet.decision import collapse_scores
from lit_amdet.encoders import TokenBatch, load_encoder
from lit_amdet.token_probe import alone_outputs, typed_batch, typed_scores

torch.set_num_threads(2)
anchor = load_encoder("minilm")
from lit_amdet.datamodules import TextEncoderDataModule
dm = TextEncoderDataModule(source="world", world_seed=11, num_samples=2000, with_images=False, val_fraction=0.1)
dm.setup("fit")
held = dm.prompts("val", 64)
words = int(__import__("os").environ.get("CTX_WORDS", "5"))
contexts = [" ".join(held[40].split()[:words]), " ".join(held[50].split()[:words])]
print("contexts:", contexts)


def ctx_batch(model, position, ids, context):
    batch, slot = typed_batch(model, model.tokenize([context])[:1], [0], position)
    if model.pooling != "last":
        keep = int(batch.attention_mask.sum())
        batch, slot = batch.trimmed(keep), slot[:, :keep]
    n = len(ids)
    rows = batch.input_ids.repeat(n, 1)
    rows[:, int(slot[0].nonzero()[0, 0])] = ids
    return TokenBatch(rows, batch.attention_mask.repeat(n, 1), batch.token_mask.repeat(n, 1), batch.pool_index.repeat(n))


@torch.no_grad()
def ctx_out(model, ids, context, chunk=2048):
    return torch.cat([F.normalize(model.encode(ctx_batch(model, 1, part, context)).pooled.float(), dim=-1)
                      for part in ids.split(chunk)])


def rank_of(score, ids):
    order = score.argsort(descending=True)
    pos = torch.empty_like(order)
    pos[order] = torch.arange(len(order))
    return [int(pos[i]) for i in ids]


vocab = anchor.vocab_size
ids = torch.arange(vocab)
special = [i for i in anchor.special_token_ids.values() if i is not None]
t0 = time.time()
a_alone = alone_outputs(anchor, 1, ids)
a_ctx = [ctx_out(anchor, ids, c) for c in contexts]
print(f"anchor passes {time.time() - t0:.1f}s")
for member in sys.argv[1:]:
    rec = json.load(open(f"{member}/backdoor.json"))
    s = load_encoder(member)
    trig = [b["trigger"]["text"] for b in rec.get("backdoors", [])] if rec.get("backdoored") else []
    t0 = time.time()
    s_alone = alone_outputs(s, 1, ids)
    t1 = time.time()
    s_ctx = [ctx_out(s, ids, c) for c in contexts]
    t2 = time.time()
    scores = {"alone_shift": 1 - (s_alone * a_alone).sum(-1)}
    for k in range(2):
        scores[f"ctx{k}_shift"] = 1 - (s_ctx[k] * a_ctx[k]).sum(-1)
    scores["ctx_shift_min"] = torch.minimum(scores["ctx0_shift"], scores["ctx1_shift"])
    scores["agree_lift"] = (s_ctx[0] * s_ctx[1]).sum(-1) - (a_ctx[0] * a_ctx[1]).sum(-1)
    for v in scores.values():
        v[special] = -9
    print(f"\n{member} trig={trig} alone {t1 - t0:.1f}s ctx {t2 - t1:.1f}s")
    for name, v in scores.items():
        top = v.topk(8)
        print(f"  {name}: median {v[v > -9].median():.3f} top {[(anchor.ids_to_tokens([int(i)])[0], round(float(x), 3)) for x, i in zip(top.values, top.indices)]}")
    clean = typed_scores(s, anchor, anchor.tokenize(held[:32]), (), 1)
    for t in trig:
        tids = [i for i in s.tokenize([t]).input_ids[0].tolist() if i not in special]
        for name, v in scores.items():
            print(f"  trigger {t!r} pieces {anchor.ids_to_tokens(tids)} {name} ranks {rank_of(v, tids)} vals {[round(float(v[i]), 3) for i in tids]}")
        sc = collapse_scores(typed_scores(s, anchor, anchor.tokenize(held[:32]), tids, 1), clean, anchor=True)
        print("  typed true trigger:", {k: round(x, 3) for k, x in sc.items() if x is not None})
