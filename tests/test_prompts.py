"""Token alignment, reweighting and subject substitution on the real CLIP tokenization (SD1.5 ids)."""

from __future__ import annotations

import pytest
import torch

from stages.common.errors import InputError
from stages.method.prompts import (changed_words, cross_plan, equalizer, global_align, refinement_mapper,
                            resolve_prompt, slug, token_ids, word_positions)
from stages.models.tokenizer import clip_tokenizer

BEAR = "A brown bear, walking on rocky terrain, next to a stone wall."
TIGER = "A tiger, walking on rocky terrain, next to a stone wall."


@pytest.fixture(scope="module")
def tok():
    return clip_tokenizer()


def test_bear_to_tiger_refinement_mapper_by_hand(tok):
    src, tgt = token_ids(tok, BEAR), token_ids(tok, TIGER)
    # <bos> a brown bear , walking on rocky terrain , next to a stone wall . <eos>
    assert src == [49406, 320, 2866, 4298, 267, 3941, 525, 9648, 20184, 267, 1131, 531, 320, 2441, 2569, 269, 49407]
    assert tgt[2] == 6531 and len(tgt) == 16  # "tiger"
    mapper, alphas = refinement_mapper(src, tgt)
    # bos->0, a->1, tiger inserted, ", walking ... <eos>" -> 4..16, padding j -> j
    expected = [0, 1, -1] + list(range(4, 17)) + list(range(16, 77))
    assert mapper.tolist() == expected
    assert alphas[2] == 0.0
    assert torch.all(alphas[[0, 1] + list(range(3, 77))] == 1.0)


def test_alignment_tie_break_prefers_gaps_over_substitution(tok):
    # one differing token: gap cost 0 means deletion + insertion, never a mismatch (score -1)
    pairs = global_align([1, 5, 2], [1, 6, 2])
    assert pairs == [(0, 0), (1, -1), (2, 2)]
    # left-gap is preferred on ties: the inserted target token comes first in the traceback
    assert global_align([1, 2], [1, 3, 2]) == [(0, 0), (1, -1), (2, 1)]
    # deletions of source tokens leave no target entries
    assert global_align([1, 7, 8, 2], [1, 2]) == [(0, 0), (1, 3)]


@pytest.mark.parametrize("source,target,new", [
    ("A black swan swimming in a river, green plants on the bank.",
     "A white swan swimming in a river, green plants on the bank.", ["white"]),
    ("A silver SUV drives on a narrow country road", "A LEGO car drives on a narrow country road", ["lego", "car"]),
    ("Astronaut walks, a body of water", "Iron Man walks, a body of water", ["iron", "man"]),
    ("A Wolf is turning head with some treesin the background",
     "A Husky is turning head with some treesin the background", ["husky"]),
])
def test_refine_marks_exactly_the_new_words(tok, source, target, new):
    plan = cross_plan(tok, source, target, mode="refine")
    inserted = [j for j in range(len(plan.tgt_ids)) if plan.alphas[j] == 0]
    words = [tok.convert_ids_to_tokens(plan.tgt_ids[j]).replace("</w>", "") for j in inserted]
    assert words == new
    for j in range(len(plan.tgt_ids)):
        if plan.alphas[j] == 1:
            assert plan.src_ids[plan.mapper[j]] == plan.tgt_ids[j]


def test_word_swap_when_token_counts_match(tok):
    plan = cross_plan(tok, "A black swan swimming", "A white swan swimming")
    assert plan.mode == "swap"
    assert plan.mapper.tolist() == list(range(77)) and torch.all(plan.alphas == 1)
    assert cross_plan(tok, BEAR, TIGER).mode == "refine"  # "brown bear" -> "tiger": counts differ
    assert cross_plan(tok, BEAR, BEAR).mode == "refine"  # identical prompts: identity alignment
    with pytest.raises(InputError):
        cross_plan(tok, BEAR, TIGER, mode="swap")


def test_equalizer_finds_words_regardless_of_punctuation_and_case(tok):
    eq = equalizer(tok, TIGER, {"Tiger": 2.0, "wall": 0.5})
    assert eq[2] == 2.0  # "tiger," -> only the word token, not the comma
    assert eq[3] == 1.0
    assert eq[13] == 0.5 and eq[14] == 1.0  # "wall." -> token 13, the period (14) untouched
    assert int((eq != 1).sum()) == 2
    assert word_positions(tok, "Iron Man walks, iron bars", "iron") == [1, 5]
    assert word_positions(tok, "Iron Man walks", "iron man") == [1, 2]
    with pytest.raises(InputError, match="not in the target prompt"):
        equalizer(tok, TIGER, {"lion": 2.0})


def test_subject_substitution():
    assert resolve_prompt("tiger", BEAR, "brown bear") == (TIGER, "phrase")
    assert resolve_prompt("a tiger", BEAR, "Brown Bear") == (TIGER, "phrase")
    assert resolve_prompt(TIGER, BEAR, "brown bear") == (TIGER, "full")
    assert resolve_prompt(TIGER, BEAR, None) == (TIGER, "full")
    with pytest.raises(InputError, match="re-invert with --subject"):
        resolve_prompt("tiger", BEAR, None)
    with pytest.raises(InputError, match="does not contain the subject"):
        resolve_prompt("tiger", BEAR, "polar bear")
    # the subject must match whole words
    with pytest.raises(InputError):
        resolve_prompt("tiger", "A bearded man", "bear")


def test_changed_words_and_slug():
    assert changed_words(BEAR, TIGER) == ["tiger"]
    assert slug(changed_words("Astronaut walks", "Iron Man walks")) == "iron-man"
    assert slug([]) == "edit"
    assert slug(["Über", "cat!"]) == "ber-cat"
