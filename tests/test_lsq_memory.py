"""lsq's memory: a stated function of the model's width (lsq_memory_bytes), and the in-place blocked solve that
keeps it there computing the same ridge solution as a dense one."""

from __future__ import annotations

import pytest
import torch
from transformers import Gemma3TextConfig, LlamaConfig

from lpconvert.heal import lsq


def test_memory_at_llama_2_7b_width():
    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_hidden_layers=4)
    n, m = 22016, 4096
    gram = 8 * n * n  # 3.61 GiB: one float64 Gram, never a second
    cross, rhs = 8 * n * m, 8 * n * m
    weights = 3 * 4 * m * n  # current, best, candidate (float32)
    blocks = 3 * 8 * n * 1024
    assert lsq.lsq_memory_bytes(config, "cpu") == gram + cross + rhs + weights + blocks == 6_943_670_272
    assert lsq.lsq_memory_bytes(config, "cpu") < 6.5 * 2**30  # issue 33 asked for heal at 7B width under 12 GiB
    assert lsq.lsq_memory_bytes(config, "cuda") == lsq.lsq_memory_bytes(config, "cpu")
    assert lsq.lsq_memory_bytes(config, "mps") == 4 * n * n + 4 * n * m * 2 + weights + 3 * 4 * n * 1024


def test_memory_at_llama_3_70b_width_is_mostly_the_gram():
    config = LlamaConfig(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8)
    total = lsq.lsq_memory_bytes(config, "cpu")
    assert total == 40_869_298_176  # 38.1 GiB
    assert 8 * (2 * 28672) ** 2 / total > 0.64  # the Gram, 24.5 GiB


def test_sandwich_pairs_hold_one_gram_per_half():
    """Gemma 3: two Grams of side intermediate, half the n x n memory of one joint Gram."""
    kwargs = dict(hidden_size=640, intermediate_size=2048, num_attention_heads=4, num_key_value_heads=1, head_dim=256)
    n, m, side = 4096, 640, 2048
    expected = 2 * 8 * side**2 + 8 * n * m + 8 * side * m + 4 * 4 * n * m + 3 * 8 * side * 1024
    assert lsq.lsq_memory_bytes(Gemma3TextConfig(**kwargs), "cpu") == expected
    assert lsq.lsq_memory_bytes(LlamaConfig(**kwargs), "cpu") > expected


@pytest.mark.parametrize("block", [7, 32, 1024])
def test_blocked_solve_equals_a_dense_solve_and_leaves_the_gram_as_it_was(block, monkeypatch):
    monkeypatch.setattr(lsq, "BLOCK", block)
    generator = torch.Generator().manual_seed(0)
    n, m = 100, 12
    normal = lsq.Normal(n, m, "cpu")
    mixing = torch.randn(n, n, generator=generator) / n**0.5
    for _ in range(3):
        normal.add(torch.randn(2, 40, n, generator=generator) @ mixing, torch.randn(2, 40, m, generator=generator))
    current = torch.randn(m, n, generator=generator)
    solution = normal.solve(current, 0.01)

    z_gram = normal.gram.clone()
    assert torch.equal(z_gram, z_gram.T)  # the lower triangle put back exactly
    strength = 0.01 * float(z_gram.diagonal().mean())
    system = z_gram + strength * torch.eye(n, dtype=torch.float64)
    dense = torch.linalg.solve(system, normal.cross + strength * current.T.double()).T
    torch.testing.assert_close(solution, dense.float(), rtol=1e-5, atol=1e-6)
    assert torch.equal(normal.gram, z_gram)  # a second damping starts from the same Gram
    assert normal.residual(solution) < normal.residual(current)


def test_a_gram_that_is_not_positive_definite_falls_back_to_least_squares():
    torch.manual_seed(0)
    normal = lsq.Normal(64, 3, "cpu")
    normal.add(torch.randn(20, 64), torch.randn(20, 3))  # rank 20 of 64: Cholesky fails with no damping
    before = normal.gram.clone()
    solution = normal.solve(torch.zeros(3, 64), 0.0)
    assert torch.isfinite(solution).all() and torch.equal(normal.gram, before)
    assert normal.residual(solution) < 1e-5  # an exact fit exists (rank 20 < 64): float rounding only
