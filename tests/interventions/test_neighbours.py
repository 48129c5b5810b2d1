"""Tests for piggyback_interp.interventions.neighbours: replacement candidates, checked
against the brute-force cosine top-k of tests/interventions/conftest.py."""

from __future__ import annotations

import doctest

import pytest
import torch

from piggyback_interp.interventions import neighbours as neighbours_module
from piggyback_interp.interventions.neighbours import nearest_neighbours

# ---------------------------------------------------------------- nearest_neighbours


def test_nearest_neighbours_match_brute_force(brute_force_top_k):
    emb = torch.randn(60, 8, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([0, 7, 59, 7])
    got = nearest_neighbours(emb, ids, top_k=5)
    assert got.shape == (4, 5) and got.dtype == torch.long
    assert got.tolist() == [brute_force_top_k(emb, i, 5) for i in ids.tolist()]


def test_nearest_neighbours_never_self_or_excluded(brute_force_top_k):
    emb = torch.randn(40, 6, generator=torch.Generator().manual_seed(1))
    emb[5] = emb[3] * 2  # token 5's nearest (cosine 1) would be 3, which is excluded
    exclude = {3, 11, 12, 1000, -4}  # ids outside the vocabulary are ignored
    got = nearest_neighbours(emb, torch.arange(40), top_k=7, exclude=exclude)
    for token, row in enumerate(got.tolist()):
        assert token not in row and not exclude & set(row) and len(set(row)) == 7
        assert row == brute_force_top_k(emb, token, 7, exclude)


def test_nearest_neighbours_chunked_equals_unchunked():
    emb = torch.randn(101, 16, generator=torch.Generator().manual_seed(2))
    ids = torch.arange(0, 101, 3)
    whole = nearest_neighbours(emb, ids, top_k=5, exclude={4}, chunk_size=1000)
    for chunk in (1, 7, 50):
        assert torch.equal(
            nearest_neighbours(emb, ids, top_k=5, exclude={4}, chunk_size=chunk), whole
        )


def test_nearest_neighbours_break_ties_by_lower_id_in_any_chunking():
    emb = torch.zeros(10, 2)
    emb[:, 0] = 1.0  # every token points the same way: all similarities are 1
    for chunk in (1, 3, 100):
        got = nearest_neighbours(emb, torch.tensor([4]), top_k=3, chunk_size=chunk)
        assert got.tolist() == [[0, 1, 2]]


def test_nearest_neighbours_errors():
    emb = torch.randn(5, 3)
    with pytest.raises(ValueError, match=r"top_k must be a positive integer"):
        nearest_neighbours(emb, torch.tensor([0]), top_k=0)
    with pytest.raises(ValueError, match=r"chunk_size must be a positive integer"):
        nearest_neighbours(emb, torch.tensor([0]), chunk_size=0)
    with pytest.raises(ValueError, match=r"token_ids must be vocabulary ids in \[0, 5\)"):
        nearest_neighbours(emb, torch.tensor([5]), top_k=2)
    with pytest.raises(ValueError, match=r"only 2 candidate tokens remain.*smaller top_k"):
        nearest_neighbours(emb, torch.tensor([0]), top_k=3, exclude={1, 2})


def test_docstring_examples_run():
    result = doctest.testmod(neighbours_module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0
