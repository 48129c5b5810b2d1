"""Shared oracles for the interventions tests."""

from __future__ import annotations

import pytest


def _brute_force_top_k(embedding, token_id, top_k, exclude=()):
    """The oracle: cosine similarity to every row, one by one, sorted by (-sim, id)."""
    query = embedding[token_id].double()
    sims = []
    for other in range(embedding.shape[0]):
        if other == token_id or other in exclude:
            continue
        row = embedding[other].double()
        sims.append((-float(query @ row / (query.norm() * row.norm())), other))
    return [other for _, other in sorted(sims)[:top_k]]


@pytest.fixture(scope="session")
def brute_force_top_k():
    """The oracle of nearest neighbours: cosine similarity to every row, one by one."""
    return _brute_force_top_k
