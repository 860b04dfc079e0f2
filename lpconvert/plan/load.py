"""Load the model and tokenise the calibration text into a Calibrator (torch and transformers load here)."""

from __future__ import annotations

from ..errors import LPError
from ..memory import Setter, check_fits, logits_bytes, memory_fixes, option_setter, stream_bytes
from ..settings import PlanSettings
from .defaults import CACHE_LIMIT, Progress
from .measure import Calibrator


def build_calibrator(source, settings: PlanSettings | None = None, progress: Progress = None,
                     setter: Setter = option_setter) -> Calibrator:
    """Load the model and tokenise calibration windows (and held-out windows of the same text: only
    when the search re-measures its front-runners on them, settings.verify > 0). `setter` names settings in
    messages as the user wrote them (--dtype, or plan.dtype in a recipe)."""

    from ..runner import NotFinite, not_finite_fix
    from ..runtime import compute_dtype, dtype_name, resolve_device, text_windows
    from ..streaming import load_model

    s = settings or PlanSettings()
    calib, tokens, seq_len, seed, objective = s.calib, s.tokens, s.seq_len, s.seed, s.objective
    heldout_tokens = s.heldout_tokens if s.verify else 0
    device = resolve_device(s.device)
    torch_dtype = compute_dtype(s.dtype, device)
    _check_token_counts(tokens, heldout_tokens, seq_len)
    check_plan_memory(source, s, dtype_name(torch_dtype), device, setter)
    if progress:
        progress(f"tokenising the calibration text {calib}")
    tokenizer = source.load_tokenizer()
    text, windows = text_windows(tokenizer, calib, tokens=tokens, seq_len=seq_len, seed=seed, split="calib",
                                 also_tokens=heldout_tokens)
    heldout = _heldout_windows(tokenizer, text, seq_len=seq_len, tokens=heldout_tokens, seed=seed)
    vocab = source.config.vocab_size
    if int(windows.input_ids.max()) >= vocab:
        raise LPError(f"the tokenizer of {source.name} produces ids beyond the model's vocabulary ({vocab})",
                      "use the model's own tokenizer files")
    if progress:
        progress(f"loading {source.name} ({dtype_name(torch_dtype)} on {device})")
    model = load_model(source, dtype=torch_dtype, device=device, load=s.load)
    if progress:
        progress(f"measuring the source on {windows.provenance['tokens']} calibration tokens")
    try:
        return Calibrator(model, windows.input_ids, heldout_ids=None if heldout is None else heldout.input_ids,
                          objective=objective, batch_size=s.batch_size, provenance=windows.provenance,
                          heldout_provenance=None if heldout is None else heldout.provenance, progress=progress)
    except NotFinite as exc:
        raise LPError(f"plan measured NaN or Inf on {source.name}, starting at {exc.where}: no pair set can be "
                      "ranked from it", not_finite_fix(dtype_name(torch_dtype), setter)) from None


def check_plan_memory(source, s: PlanSettings, dtype: str, device: str, setter: Setter = option_setter) -> None:
    """The model, a batch's logits, the streams the search keeps (CACHE_LIMIT) and the residual stream of every
    window of a split (measuring runs layer-major: a layer's input and output, and the source's) must fit
    (memory.py)."""
    working = logits_bytes(source.config, s.batch_size, s.seq_len) + CACHE_LIMIT
    working += stream_bytes(source.config, max(s.tokens, s.heldout_tokens), dtype, streams=3)
    without = "drop --model (plan from the scores alone)" if setter is option_setter else setter("use_model", "false")
    check_fits(source, stage="plan", dtype=dtype, device=device, working=working, load=s.load,
               fixes=[*memory_fixes(setter, dtype=dtype, tokens=("tokens", "heldout_tokens")), without])


def _check_token_counts(tokens: int, heldout_tokens: int, seq_len: int) -> None:
    if tokens < seq_len:
        raise LPError(f"--tokens {tokens} is less than one window of --seq-len {seq_len}",
                      f"use --tokens {seq_len} or more")
    if 0 < heldout_tokens < seq_len:
        raise LPError(f"--heldout-tokens {heldout_tokens} is less than one window of --seq-len {seq_len}",
                      f"use --heldout-tokens {seq_len} or more, or 0 to switch the held-out check off")


def _heldout_windows(tokenizer, text, *, seq_len: int, tokens: int, seed: int):
    """Held-out windows of the calibration text, or None when none are asked for or the text is too short."""
    if tokens <= 0:
        return None
    from ..texts import tokenize_windows

    try:
        return tokenize_windows(tokenizer, text, seq_len=seq_len, num_tokens=tokens, seed=seed, split="heldout")
    except LPError:
        return None  # text too short for a held-out split: plan without the check, and say so
