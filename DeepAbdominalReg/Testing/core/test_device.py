"""The heap-reuse setting around the pipeline (:func:`deepabdominalreg.device.reuse_freed_memory`).

Inside the block glibc keeps freed memory in the process heap (no ``mmap`` for big blocks, no trimming), so the next
stage reuses pages it has already touched; outside it glibc's defaults are back.  Checked through glibc's own
accounting (``mallinfo2``: bytes in ``mmap`` blocks and free bytes kept in the heap)."""

from __future__ import annotations

import ctypes
import sys

import pytest
from deepabdominalreg import device
from deepabdominalreg.device import DISABLE_VARIABLE, reuse_freed_memory, supported

BIG = 256 << 20  # above glibc's mmap threshold


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _libc():
    if not sys.platform.startswith("linux") or device._glibc() is None:
        pytest.skip("glibc only")
    libc = ctypes.CDLL("libc.so.6")
    if not hasattr(libc, "mallinfo2"):
        pytest.skip("glibc < 2.33 has no mallinfo2")
    libc.mallinfo2.restype = _MallInfo2
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = (ctypes.c_size_t,)
    libc.free.argtypes = (ctypes.c_void_p,)
    return libc


def _allocate_touch_free(libc) -> tuple[int, int]:
    """Allocate BIG bytes, touch them, free them: (bytes in mmap blocks while held, free heap bytes after free)."""
    pointer = libc.malloc(BIG)
    assert pointer
    ctypes.memset(pointer, 1, BIG)
    held_mmap = libc.mallinfo2().hblkhd
    libc.free(pointer)
    return held_mmap, libc.mallinfo2().fordblks


def test_freed_memory_stays_in_the_heap_inside_the_block_and_not_after(monkeypatch):
    monkeypatch.delenv(DISABLE_VARIABLE, raising=False)
    libc = _libc()
    before_mmap = libc.mallinfo2().hblkhd
    with reuse_freed_memory() as active:
        assert active is True
        held_mmap, free_after = _allocate_touch_free(libc)
        assert held_mmap < before_mmap + BIG, "inside the block a big allocation must come from the heap"
        assert free_after >= BIG, "inside the block freed memory must stay in the heap for reuse"
    held_mmap, _ = _allocate_touch_free(libc)
    assert held_mmap >= before_mmap + BIG, "after the block glibc's default (mmap for big blocks) must be back"


def test_nested_blocks_keep_the_setting_until_the_outermost_ends(monkeypatch):
    monkeypatch.delenv(DISABLE_VARIABLE, raising=False)
    libc = _libc()
    with reuse_freed_memory():
        with reuse_freed_memory() as inner:
            assert inner is True
        before_mmap = libc.mallinfo2().hblkhd
        held_mmap, _ = _allocate_touch_free(libc)
        assert held_mmap < before_mmap + BIG, "leaving an inner block must not restore the defaults"
    held_mmap, _ = _allocate_touch_free(libc)
    assert held_mmap >= libc.mallinfo2().hblkhd + BIG


def test_reuse_freed_memory_can_be_switched_off(monkeypatch):
    monkeypatch.setenv(DISABLE_VARIABLE, "1")
    assert not supported()
    libc = _libc()
    with reuse_freed_memory() as active:
        assert active is False
        before_mmap = libc.mallinfo2().hblkhd
        held_mmap, _ = _allocate_touch_free(libc)
        assert held_mmap >= before_mmap + BIG


def test_the_defaults_are_back_after_an_error(monkeypatch):
    monkeypatch.delenv(DISABLE_VARIABLE, raising=False)
    libc = _libc()
    with pytest.raises(RuntimeError, match="boom"), reuse_freed_memory():
        raise RuntimeError("boom")
    before_mmap = libc.mallinfo2().hblkhd
    held_mmap, _ = _allocate_touch_free(libc)
    assert held_mmap >= before_mmap + BIG
