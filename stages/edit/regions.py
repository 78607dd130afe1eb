"""Per-region edits (`vd edit --region NAME="target phrase"`): parsing, checks and the target prompt.

The workspace's named objects (written by `vd mask`): masks/objects/<name>/{raw, edit} uint8 (F, H, W) and
group "masks/objects" attrs {"names": [...], "phrases": {name: phrase or null}}. Each object's source
phrase (from those attrs or `--object NAME=PHRASE`) must be words of the inversion prompt; the target
prompt is the inversion prompt with every region's phrase replaced by its target phrase.
Notes: docs/concepts/extensions.md.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from stages.common.errors import InputError, UsageError
from stages.io.workspace import Workspace
from stages.method.prompts import ARTICLES, MAX_LEN, normalize_word, word_token_spans, words

OBJECTS = "masks/objects"
REGIONS_PREFIX = "regions:"  # a prompt-file line `regions: man="a robot" dog=cat`


# ----------------------------------------------------------------------------------------- parsing
def parse_assignments(items: Sequence[str] | None, flag: str) -> dict[str, str]:
    """["man=a robot", "dog=cat"] -> {"man": "a robot", "dog": "cat"}; malformed or repeated -> UsageError."""
    out: dict[str, str] = {}
    for item in items or []:
        name, sep, phrase = item.partition("=")
        name, phrase = name.strip(), " ".join(phrase.split())
        if not sep or not name or not words(phrase):
            raise UsageError(f"{flag} {item!r}: expected NAME=PHRASE, e.g. dog=\"a white cat\"")
        if name in out:
            raise UsageError(f"{flag} names object {name!r} twice")
        out[name] = phrase
    return out


def parse_regions_line(line: str) -> dict[str, str] | None:
    """The regions of a prompt-file line `regions: NAME=PHRASE ...` (shell quoting), or None for a prompt."""
    if not line.lower().startswith(REGIONS_PREFIX):
        return None
    try:
        items = shlex.split(line[len(REGIONS_PREFIX):])
    except ValueError as exc:
        raise UsageError(f"prompt file line {line!r}: {exc}") from None
    if not items:
        raise UsageError(f"prompt file line {line!r}: give at least one NAME=PHRASE")
    return parse_assignments(items, "regions:")


def validate_regions(cfg: Any) -> None:
    """Checks of the region settings of an EditConfig that need no workspace (UsageError)."""
    for flag, table in (("--region", cfg.regions), ("--object", cfg.objects)):
        for name, phrase in table.items():
            if not str(name).strip() or not words(str(phrase)):
                raise UsageError(f"{flag} {name}={phrase!r}: expected NAME=PHRASE with a non-empty phrase")
    if not 0.0 <= cfg.layout_steps <= 1.0:
        raise UsageError(f"--layout-steps must lie in [0, 1], got {cfg.layout_steps}")
    if not 0.0 <= cfg.layout_strength <= 100.0:
        raise UsageError(f"--layout-strength must lie in [0, 100], got {cfg.layout_strength}")
    if cfg.objects and not cfg.regions:
        raise UsageError("--object gives the source phrases of --region edits; add --region NAME=PHRASE")
    if cfg.regions and cfg.background:
        raise UsageError("--background cannot be combined with --region (regions edit named objects)")
    if cfg.regions and cfg.blend:
        raise UsageError("--blend cannot be combined with --region: each object blends from its own phrase "
                         "(turn that off with --no-region-blend)")


# ----------------------------------------------------------------------------------------- prompt
def phrase_spans(prompt: str, phrase: str) -> list[tuple[int, int]]:
    """Non-overlapping occurrences of `phrase` in `prompt` as [start, end) indices into words(prompt)."""
    want, have = words(phrase), words(prompt)
    out: list[tuple[int, int]] = []
    k = 0
    while want and k <= len(have) - len(want):
        if have[k:k + len(want)] == want:
            out.append((k, k + len(want)))
            k += len(want)
        else:
            k += 1
    return out


def _around(raw: str) -> tuple[str, str]:
    """The punctuation before and after a word's core ("(bear," -> "(", ",")."""
    core = normalize_word(raw)
    at = raw.lower().find(core)
    return raw[:at], raw[at + len(core):]


def replace_spans(prompt: str, edits: Sequence[tuple[int, int, str]]) -> tuple[str, list[tuple[int, int]]]:
    """Replace word spans [start, end) of words(prompt) by new phrases (spans disjoint); returns the new
    prompt and each new phrase's [start, end) in words(new prompt). Punctuation around a span stays;
    "a tiger" after an article drops its own article (as the single-subject phrase edit does)."""
    raw = prompt.split()
    cores = [i for i, r in enumerate(raw) if normalize_word(r)]  # words() index -> raw index
    order = sorted(range(len(edits)), key=lambda e: edits[e][0])
    out: list[str] = []
    ranges: list[tuple[int, int]] = [(0, 0)] * len(edits)
    pos = 0
    for e in order:
        start, end, phrase = edits[e]
        first, last = cores[start], cores[end - 1]
        out.extend(raw[pos:first])
        head = phrase.split()
        if len(head) > 1 and head[0].lower() in ARTICLES and out and normalize_word(out[-1]) in ARTICLES:
            head = head[1:]
        new = f"{_around(raw[first])[0]}{' '.join(head)}{_around(raw[last])[1]}".split()
        before = len(words(" ".join(out)))
        ranges[e] = (before, before + len(words(" ".join(new))))
        out.extend(new)
        pos = last + 1
    out.extend(raw[pos:])
    return " ".join(out), ranges


@dataclass
class Region:
    """One edited object: its source and target phrases and their word spans in both prompts."""

    name: str
    source: str
    target: str
    src_spans: list[tuple[int, int]] = field(default_factory=list)
    tgt_spans: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class RegionPlan:
    """The objects of the workspace (in order), the edited ones, and the target prompt."""

    names: list[str]
    regions: list[Region]
    target: str

    @property
    def edited(self) -> list[bool]:
        """Per workspace object (in `names` order): whether a region edits it."""
        chosen = {r.name for r in self.regions}
        return [n in chosen for n in self.names]


def object_names(ws: Workspace) -> tuple[list[str], dict[str, Any]]:
    """The workspace's object names and their stored phrases; InputError when it has none."""
    attrs = ws.group_attrs(OBJECTS)
    names = [str(n) for n in attrs.get("names") or []]
    if not names:
        raise InputError(f"workspace {ws.path} has no named objects; run `vd mask ... --object NAME ...` "
                         "to make them, or edit with --prompt")
    return names, dict(attrs.get("phrases") or {})


def plan_regions(ws: Workspace, source: str, regions: dict[str, str], objects: dict[str, str]) -> RegionPlan:
    """Check the regions against the workspace's objects and the inversion prompt; build the target prompt."""
    names, stored = object_names(ws)
    for flag, table in (("--region", regions), ("--object", objects)):
        for name in table:
            if name not in names:
                raise InputError(f"{flag} {name}: unknown object {name!r}; this workspace has "
                                 f"{', '.join(names)}")
    phrases = {**stored, **objects}
    plan: list[Region] = []
    for name, target in regions.items():
        phrase = phrases.get(name)
        if not phrase or not words(str(phrase)):
            raise InputError(f"object {name!r} has no source phrase; give it with --object {name}=\"PHRASE\" "
                             "(words of the inversion prompt)")
        spans = phrase_spans(source, str(phrase))
        if not spans:
            raise InputError(f"the phrase {phrase!r} of object {name!r} is not in the inversion prompt "
                             f"{source!r}")
        plan.append(Region(name, str(phrase), " ".join(target.split()), spans))
    taken: dict[int, str] = {}
    for region in plan:
        for start, end in region.src_spans:
            for k in range(start, end):
                if k in taken:
                    raise InputError(f"regions {taken[k]!r} and {region.name!r} name the same words of the "
                                     f"inversion prompt ({words(source)[k]!r}); give them distinct phrases")
                taken[k] = region.name
    edits = [(s, e, r.target, i) for i, r in enumerate(plan) for s, e in r.src_spans]
    target, ranges = replace_spans(source, [(s, e, t) for s, e, t, _ in edits])
    for (_s, _e, _t, i), span in zip(edits, ranges):
        plan[i].tgt_spans.append(span)
    return RegionPlan(names, plan, target)


def token_positions(tokenizer: Any, text: str, spans: Sequence[tuple[int, int]]) -> list[int]:
    """CLIP token positions of word spans of words(text) (BOS is 0; truncated words dropped)."""
    tokens = word_token_spans(tokenizer, text)
    out: list[int] = []
    for start, end in spans:
        for _w, s, e in tokens[start:end]:
            out.extend(range(s, min(e, MAX_LEN - 1)))
    return sorted(set(out))


# ----------------------------------------------------------------------------------------- masks
def object_arrays(names: Sequence[str]) -> list[str]:
    """The workspace arrays the regions read."""
    return [f"{OBJECTS}/{n}/{kind}" for n in names for kind in ("raw", "edit")]


def load_objects(ws: Workspace, names: Sequence[str], frames: int) -> tuple[np.ndarray, np.ndarray]:
    """(labels int64 (F, H, W): 0 background, k + 1 object k; edit masks bool (K, F, H, W)).

    A pixel belongs to the object whose raw mask holds it (raws are disjoint), else to the first object
    whose (ellipse-extended) edit mask holds it; the background is outside every edit mask.
    """
    raws, edits = [], []
    for name in names:
        raw, edit = (np.asarray(ws.read(f"{OBJECTS}/{name}/{kind}")) > 0 for kind in ("raw", "edit"))
        if raw.shape != edit.shape or raw.ndim != 3 or raw.shape[0] != frames:
            raise InputError(f"the masks of object {name!r} in {ws.path} have shapes {raw.shape} and "
                             f"{edit.shape}, expected ({frames}, H, W); rerun `vd mask`")
        raws.append(raw)
        edits.append(edit)
    labels = np.zeros(raws[0].shape, np.int64)
    for masks in (raws, edits):
        for k, m in enumerate(masks):
            labels[(labels == 0) & m] = k + 1
    return labels, np.stack(edits)


# ----------------------------------------------------------------------------------------- attention pieces
@dataclass
class WindowRegions:
    """The region pieces of one temporal window."""

    keys: Any  # stages.method.control.layout.RegionKeys
    layout: Any  # Layout (VideoGrain's layout modulation), or None when it is off
    blend: Any  # RegionBlend, or None when --no-region-blend


def region_controls(ws: Workspace, plan: RegionPlan, cfg: Any, tokenizer: Any, source: str, target: str,
                    spans: Sequence[tuple[int, int]], latent_hw: tuple[int, int], timesteps: Sequence[int],
                    steps: int) -> list[WindowRegions]:
    """SA-II key sets, layout modulation and per-object blend of a region edit, one set per window span.

    The layout's regions are the label map's parts (background and every workspace object); the edited
    objects carry their target-phrase tokens (stages.method.control.layout)."""
    import torch

    from stages.method.control.editing import LocalBlend
    from stages.method.control.layout import Layout, RegionBlend, RegionKeys, nearest

    frames = spans[-1][1]
    labels = torch.from_numpy(load_objects(ws, plan.names, frames)[0])
    index = {n: k for k, n in enumerate(plan.names)}
    tgt_pos = [token_positions(tokenizer, target, r.tgt_spans) for r in plan.regions]
    object_pos: list[list[int]] = [[] for _ in plan.names]  # per label k - 1; empty for unedited objects
    for region, pos in zip(plan.regions, tgt_pos):
        object_pos[index[region.name]] = pos
    src_pos = [token_positions(tokenizer, source, r.src_spans) for r in plan.regions]
    layout_steps = int(steps * cfg.layout_steps)
    unedited = [k + 1 for k, edited in enumerate(plan.edited) if not edited]
    exclude = torch.isin(nearest(labels, latent_hw).round().long(), torch.tensor(unedited, dtype=torch.long))
    out = []
    for s, e in spans:
        layout = None
        if layout_steps > 0 and cfg.layout_strength > 0:
            layout = Layout(labels[s:e], object_pos, timesteps, layout_steps, cfg.layout_strength, latent_hw)
        blend = None
        if cfg.region_blend:
            objects = [LocalBlend(sp, tp, latent_hw, cfg.blend_threshold) for sp, tp in zip(src_pos, tgt_pos)]
            blend = RegionBlend(objects, exclude[s:e, None])
        out.append(WindowRegions(RegionKeys(labels[s:e], plan.edited, latent_hw), layout, blend))
    return out
