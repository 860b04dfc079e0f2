"""What plan's measuring can minimise: the objectives, as data.

Every objective is a mean over some positions of the calibration windows of one per-position quantity,
measured on the paired model in the same forward pass (so each costs the same: one pass of the
calibration text per pair set). The positions and quantities:

* ``loss``: the next-token NLL of the text, at every position.
* ``kl``: KL(source || paired) over the source's top 256 tokens and one bucket for the rest.
* ``kl_top16``: the same over the top 16 (the tokens a benchmark's choices compete among).
* ``top1``: how often the paired model's most likely token differs from the source's.
* ``confident_loss``: the NLL where the source puts at least half its probability on one token.
* ``copy_loss``: the NLL where the next token already occurred in the window and is not one of the
  text's 100 commonest tokens: a name or noun the context supplies (what LAMBADA asks for).
* ``local_loss``: the NLL at every other position (what the nearby words decide).
* ``miss``: how often the paired model's most likely token is not the text's next token.
* ``copy_miss``: the same at the copy positions (LAMBADA's own measure, on calibration text).
* ``top1_copy``: top1 plus COPY_WEIGHT times copy_loss. top1 alone keeps the text's next-token ranking
  but missed Gemma-3's LAMBADA loss; copy_loss alone caught that and chose SmolLM2 plans with more
  perplexity damage. The weight makes the two spread alike over one depth's plans (top1 by about 0.05,
  copy_loss by about 0.3 nats on both models).

docs/quality.md ("Which objective predicts task accuracy") measures how well each ranks plans by
benchmark accuracy on two models. Nothing here imports torch at import time.
"""

from __future__ import annotations

CONFIDENT = 0.5  # the source's top probability that makes a position "confident"
COMMON_TOKENS = 100  # the commonest tokens of the calibration text (at most a tenth of its distinct ones) never count as copies
KL_NARROW = 16  # kl_top16's k
COPY_WEIGHT = 0.2  # top1_copy's weight on copy_loss (per nat; top1 is a rate)

# objective -> (the per-position quantity, the positions it is averaged over)
OBJECTIVE_TABLE = {
    "loss": ("nll", "all"),
    "kl": ("kl", "all"),
    "kl_top16": ("kl16", "all"),
    "top1": ("disagree", "all"),
    "confident_loss": ("nll", "confident"),
    "copy_loss": ("nll", "copy"),
    "local_loss": ("nll", "local"),
    "miss": ("miss", "all"),
    "copy_miss": ("miss", "copy"),
}

# objectives that add up others measured in the same pass: objective -> {objective: weight}
COMBINED_TABLE = {
    "top1_copy": {"top1": 1.0, "copy_loss": COPY_WEIGHT},
}
OBJECTIVE_NAMES = (*OBJECTIVE_TABLE, *COMBINED_TABLE)


def position_masks(ids, reference, common):
    """{positions name: bool mask (batch, seq_len - 1)} of one batch; `common` is a bool tensor over the
    vocabulary marking the text's commonest tokens."""
    import torch

    targets = ids[:, 1:]
    seen = torch.zeros_like(targets, dtype=torch.bool)
    for b in range(ids.shape[0]):  # the next token occurred at or before the current position
        first = {}
        row = ids[b].tolist()
        for t, token in enumerate(row):
            first.setdefault(token, t)
        seen[b] = torch.tensor([first[token] <= t for t, token in enumerate(row[1:])])
    copy = seen & ~common[targets]
    top_p = reference[2][..., 0]
    return {"all": torch.ones_like(copy), "copy": copy, "local": ~copy, "confident": top_p >= CONFIDENT}


def position_values(logp, targets, reference):
    """{quantity: per-position tensor (batch, seq_len - 1)} of the paired model's log-probabilities."""
    import torch

    from ..runner import kl_to_reference

    idx, top, p, rest, _ = reference
    narrow_rest = torch.log(torch.clamp(-torch.expm1(torch.logsumexp(top[..., :KL_NARROW], dim=-1)), min=1e-12))
    narrow = (idx[..., :KL_NARROW], top[..., :KL_NARROW], p[..., :KL_NARROW], narrow_rest, narrow_rest.exp())
    first = logp.argmax(-1)
    return {"nll": -logp.gather(-1, targets[..., None])[..., 0],
            "kl": kl_to_reference(reference, logp),
            "kl16": kl_to_reference(narrow, logp),
            "disagree": (first != idx[..., 0]).float(),
            "miss": (first != targets).float()}


def accumulate(totals: dict, values: dict, masks: dict) -> None:
    """Add one batch's sums and counts, per objective, into totals {objective: [sum, count]}."""
    for name, (quantity, positions) in OBJECTIVE_TABLE.items():
        mask = masks[positions]
        entry = totals.setdefault(name, [0.0, 0])
        entry[0] += float(values[quantity][mask].double().sum())
        entry[1] += int(mask.sum())


def means(totals: dict) -> dict[str, float]:
    """{objective: mean over its positions} (NaN where a text has no such position), the combined ones
    included."""
    return with_combined({name: (s / n if n else float("nan")) for name, (s, n) in totals.items()})


def with_combined(values: dict[str, float]) -> dict[str, float]:
    """VALUES and the combined objectives made of them (those whose parts VALUES has)."""
    combined = {name: sum(weight * values[part] for part, weight in weights.items())
                for name, weights in COMBINED_TABLE.items() if all(part in values for part in weights)}
    return {**values, **combined}
