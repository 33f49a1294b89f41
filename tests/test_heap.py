"""kept_heap: large blocks come from the heap and stay there once freed, then go back on exit."""

import ctypes
import os

import pytest
import torch

from llmopt.heap import kept_heap


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _mallinfo():
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "mallinfo2"):
        pytest.skip("needs glibc >= 2.33 (mallinfo2)")
    libc.mallinfo2.restype = _Mallinfo2
    return libc.mallinfo2


SIZE = 64 * 2**20


def test_large_blocks_are_mapped_outside_and_kept_in_the_heap_inside():
    info = _mallinfo()
    before = info().hblkhd
    big = torch.empty(SIZE, dtype=torch.uint8)
    assert info().hblkhd - before >= SIZE          # glibc's default: its own mapping, unmapped when freed
    del big

    with kept_heap() as on:
        assert on
        mapped = info().hblkhd
        big = torch.ones(SIZE, dtype=torch.uint8)
        assert info().hblkhd - mapped < SIZE       # from the heap now
        del big
        assert info().fordblks >= SIZE             # freed, but kept for the next step
        kept = _resident()
    assert kept - _resident() >= SIZE * 0.9        # its pages given back on exit


def _resident() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_disabled_changes_nothing():
    with kept_heap(enabled=False) as on:
        assert not on
