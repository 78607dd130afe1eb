"""Prompt handling for `vd edit`: token alignment (refine / word swap), reweighting, subject substitution.

Semantics follow Prompt-to-Prompt (ALGORITHM.md §5.3):
- refinement mapper: Needleman-Wunsch on the CLIP token ids incl. BOS/EOS (match +1, mismatch -1, gap 0;
  ties: left-gap, up-gap, diagonal). mapper[j] = aligned source index, alpha[j] = 1; inserted target
  tokens get mapper -1 and alpha 0 (they keep the edit path's own map). Padding j maps to j, alpha 1.
- word swap (AttentionReplace) when both prompts have the same words except substitutions whose token
  counts match: every target token takes the source map at the same position (identity mapper, alpha 1).
- equalizer: ones over the 77 target tokens, reweighted words' tokens set to their value; word lookup is
  case- and punctuation-insensitive (the reference's exact-match lookup silently missed "tiger,").
"""

from __future__ import annotations

import difflib
import re
import string
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from stages.common.errors import InputError

MAX_LEN = 77
ARTICLES = frozenset({"a", "an", "the"})
_PUNCT = string.punctuation + "“”‘’«»…"

# traceback codes
_LEFT, _UP, _DIAG = 1, 2, 3


# ----------------------------------------------------------------------------------------- tokens
def token_ids(tokenizer: Any, text: str, max_len: int = MAX_LEN) -> list[int]:
    """CLIP token ids of `text` with BOS and EOS, no padding, truncated to `max_len`."""
    ids = list(tokenizer(text, truncation=True, max_length=max_len).input_ids)
    return ids[:max_len]


def normalize_word(word: str) -> str:
    """Lower-case a word and strip surrounding punctuation ("Tiger," -> "tiger")."""
    return word.strip(_PUNCT).lower()


def words(text: str) -> list[str]:
    """Normalized whitespace-separated words of `text`, empty ones (pure punctuation) dropped."""
    return [w for w in (normalize_word(x) for x in text.split()) if w]


# ----------------------------------------------------------------------------------------- alignment
def global_align(x: Sequence[int], y: Sequence[int], gap: int = 0, match: int = 1,
                 mismatch: int = -1) -> list[tuple[int, int]]:
    """Needleman-Wunsch alignment of x (source) and y (target).

    Returns one (j, i) pair per target position j (in order): the aligned source index i, or -1 when the
    target token is an insertion. Tie-break order when scores are equal: left (insert), up (delete), diagonal.
    """
    nx, ny = len(x), len(y)
    score = [[0] * (ny + 1) for _ in range(nx + 1)]
    trace = [[0] * (ny + 1) for _ in range(nx + 1)]
    for j in range(1, ny + 1):
        score[0][j], trace[0][j] = j * gap, _LEFT
    for i in range(1, nx + 1):
        score[i][0], trace[i][0] = i * gap, _UP
    for i in range(1, nx + 1):
        for j in range(1, ny + 1):
            left = score[i][j - 1] + gap
            up = score[i - 1][j] + gap
            diag = score[i - 1][j - 1] + (match if x[i - 1] == y[j - 1] else mismatch)
            best = max(left, up, diag)
            score[i][j] = best
            trace[i][j] = _LEFT if best == left else _UP if best == up else _DIAG
    pairs: list[tuple[int, int]] = []
    i, j = nx, ny
    while i > 0 or j > 0:
        move = trace[i][j]
        if move == _DIAG:
            i, j = i - 1, j - 1
            pairs.append((j, i))
        elif move == _LEFT:
            j -= 1
            pairs.append((j, -1))
        else:
            i -= 1
    pairs.reverse()
    return pairs


def refinement_mapper(src_ids: Sequence[int], tgt_ids: Sequence[int],
                      max_len: int = MAX_LEN) -> tuple[torch.Tensor, torch.Tensor]:
    """(mapper int64 (max_len,), alphas float (max_len,)) for P2P refinement (see module doc)."""
    pairs = global_align(src_ids, tgt_ids)
    mapper = torch.arange(max_len, dtype=torch.int64)  # padding j -> j
    alphas = torch.ones(max_len)
    for j, i in pairs:
        mapper[j] = i
        alphas[j] = float(i >= 0)
    return mapper, alphas


def word_token_spans(tokenizer: Any, text: str) -> list[tuple[str, int, int]]:
    """(normalized word, first token, end token) for each whitespace word; token 0 is BOS.

    The span covers only the word's core (surrounding punctuation tokens excluded) when the core's tokens
    occur inside the word's tokens; otherwise the whole word. Empty-core words are skipped.
    """
    spans = []
    pos = 1
    for raw in text.split():
        toks = token_ids(tokenizer, raw)[1:-1]
        core = normalize_word(raw)
        start, end = pos, pos + len(toks)
        if core:
            core_toks = token_ids(tokenizer, core)[1:-1]
            k = _find(toks, core_toks)
            if k >= 0:
                start, end = pos + k, pos + k + len(core_toks)
            spans.append((core, start, end))
        pos += len(toks)
    return [(w, s, e) for w, s, e in spans if s < MAX_LEN - 1]


def _find(seq: Sequence[int], sub: Sequence[int]) -> int:
    for k in range(len(seq) - len(sub) + 1):
        if list(seq[k:k + len(sub)]) == list(sub):
            return k
    return -1


def word_positions(tokenizer: Any, text: str, phrase: str) -> list[int]:
    """Token positions of every occurrence of `phrase` (one or more words) in `text`, case/punctuation-free."""
    target = words(phrase)
    if not target:
        return []
    spans = word_token_spans(tokenizer, text)
    names = [w for w, _, _ in spans]
    out: list[int] = []
    for k in range(len(names) - len(target) + 1):
        if names[k:k + len(target)] == target:
            for _, s, e in spans[k:k + len(target)]:
                out.extend(range(s, min(e, MAX_LEN - 1)))
    return sorted(set(out))


def swap_compatible(tokenizer: Any, source: str, target: str) -> bool:
    """True when target differs from source only by word substitutions with equal token counts."""
    sw, tw = source.split(), target.split()
    if len(sw) != len(tw) or token_ids(tokenizer, source) == token_ids(tokenizer, target):
        return False
    for a, b in zip(sw, tw):
        if a != b and len(token_ids(tokenizer, a)) != len(token_ids(tokenizer, b)):
            return False
    return len(token_ids(tokenizer, source)) == len(token_ids(tokenizer, target))


def equalizer(tokenizer: Any, text: str, weights: dict[str, float], max_len: int = MAX_LEN) -> torch.Tensor:
    """(max_len,) ones with the tokens of each reweighted word set to its value; unknown word -> InputError."""
    eq = torch.ones(max_len)
    for word, value in weights.items():
        pos = word_positions(tokenizer, text, word)
        if not pos:
            raise InputError(f"reweight word {word!r} is not in the target prompt {text!r}")
        eq[pos] = float(value)
    return eq


# ----------------------------------------------------------------------------------------- prompts
def resolve_prompt(text: str, source: str, subject: str | None) -> tuple[str, str]:
    """Resolve `vd edit --prompt TEXT` into (target prompt, mode) with mode "full" or "phrase".

    TEXT is a full prompt unless it shares no words with the source prompt (articles aside); then it
    replaces every occurrence of the stored subject ("tiger" + "A brown bear, ..." -> "A tiger, ...").
    """
    text = " ".join(text.split())
    if not text:
        raise InputError("empty prompt")
    shared = (set(words(text)) & set(words(source))) - ARTICLES
    if shared:
        return text, "full"
    if not subject:
        raise InputError(f"{text!r} shares no words with the source prompt and the workspace has no subject: "
                         "give a full target prompt or re-invert with --subject")
    pattern = re.compile(r"(?<![\w])" + r"\s+".join(re.escape(w) for w in subject.split()) + r"(?![\w])",
                         re.IGNORECASE)
    match = pattern.search(source)
    if match is None:
        raise InputError(f"the source prompt {source!r} does not contain the subject {subject!r}; "
                         "give a full target prompt")
    phrase = text
    head = phrase.split()
    before = source[: match.start()].split()
    if len(head) > 1 and head[0].lower() in ARTICLES and before and before[-1].lower() in ARTICLES:
        phrase = " ".join(head[1:])  # "a tiger" after "A " -> "A tiger", not "A a tiger"
    return pattern.sub(lambda _m: phrase, source), "phrase"


def changed_words(source: str, target: str) -> list[str]:
    """Target words that are not aligned to identical source words (normalized), in order."""
    sw, tw = words(source), words(target)
    out: list[str] = []
    for op, _i1, _i2, j1, j2 in difflib.SequenceMatcher(a=sw, b=tw, autojunk=False).get_opcodes():
        if op in ("replace", "insert"):
            out.extend(tw[j1:j2])
    return out


def slug(parts: Sequence[str], default: str = "edit", max_len: int = 40) -> str:
    """A workspace-safe name from words ("Iron", "Man" -> "iron-man")."""
    text = "-".join(p.lower() for p in parts)
    text = re.sub(r"[^a-z0-9]+", "-", text).strip("-")[:max_len].strip("-")
    return text or default


# ----------------------------------------------------------------------------------------- plan
@dataclass
class CrossPlan:
    """Everything the P2P cross-attention handler needs, plus what to report."""

    mode: str  # "refine" | "swap"
    mapper: torch.Tensor  # (77,) int64, -1 for inserted tokens
    alphas: torch.Tensor  # (77,) float
    equalizer: torch.Tensor  # (77,) float
    src_ids: list[int] = field(default_factory=list)
    tgt_ids: list[int] = field(default_factory=list)


def cross_plan(tokenizer: Any, source: str, target: str, reweight: dict[str, float] | None = None,
               mode: str = "auto", device: Any = None) -> CrossPlan:
    """Alignment and equalizer for editing `source` into `target` (mode: auto | refine | swap).

    device: where the mapper, alphas and equalizer live (the UNet's device: P2P reads them in every cross
    layer call, and a host-to-device copy there would synchronise the GPU each time); built on the CPU."""
    if mode not in ("auto", "refine", "swap"):
        raise InputError(f"unknown cross-attention mode {mode!r}; choose auto, refine or swap")
    src, tgt = token_ids(tokenizer, source), token_ids(tokenizer, target)
    use_swap = mode == "swap" or (mode == "auto" and swap_compatible(tokenizer, source, target))
    if mode == "swap" and len(src) != len(tgt):
        raise InputError(f"word swap needs equal token counts ({len(src)} vs {len(tgt)}); use refine")
    if use_swap:
        mapper, alphas = torch.arange(MAX_LEN, dtype=torch.int64), torch.ones(MAX_LEN)
    else:
        mapper, alphas = refinement_mapper(src, tgt)
    eq = equalizer(tokenizer, target, reweight or {})
    if device is not None:
        mapper, alphas, eq = mapper.to(device), alphas.to(device), eq.to(device)
    return CrossPlan("swap" if use_swap else "refine", mapper, alphas, eq, src, tgt)
