"""The heap-reuse setting around the pipeline (:mod:`deepabdominalreg.allocator`)."""

from __future__ import annotations

import sys

import pytest
import torch
from deepabdominalreg import allocator


def test_reuse_freed_memory_is_reentrant_and_gives_memory_back(monkeypatch):
    monkeypatch.delenv(allocator.DISABLE_VARIABLE, raising=False)
    expected = sys.platform.startswith("linux") and allocator._glibc() is not None
    with allocator.reuse_freed_memory() as outer:
        assert outer is expected
        with allocator.reuse_freed_memory() as inner:
            assert inner is expected
            assert allocator._depth == (2 if expected else 0)
            big = torch.ones(64, 1024, 1024)  # 256 MiB from the heap, not mmap
            assert float(big[-1, -1, -1]) == 1.0
            del big
        assert allocator._depth == (1 if expected else 0)
    assert allocator._depth == 0


def test_reuse_freed_memory_can_be_switched_off(monkeypatch):
    monkeypatch.setenv(allocator.DISABLE_VARIABLE, "1")
    assert not allocator.supported()
    with allocator.reuse_freed_memory() as active:
        assert active is False
        assert allocator._depth == 0


def test_reuse_freed_memory_restores_the_depth_after_an_error(monkeypatch):
    monkeypatch.delenv(allocator.DISABLE_VARIABLE, raising=False)
    with pytest.raises(RuntimeError, match="boom"), allocator.reuse_freed_memory():
        raise RuntimeError("boom")
    assert allocator._depth == 0
