"""Every pointer, fence and cache trick of the project, as numba intrinsics.

Names say the memory semantics. Nothing else in the code base emits raw LLVM.

* :func:`prefetch` - ``llvm.prefetch`` of an array element's cache line: a hint, never a
  fault (the address is computed without a load, and an index outside the array is
  clamped by the caller). Used by the kernel to pipeline hash-table lookups across a batch.
* :func:`load_acquire` / :func:`store_release` - an atomic 8-byte load with acquire
  ordering and store with release ordering of an array element. On x86-64 both are a plain
  ``mov``; what they buy is that the *compiler* may not hoist the load out of a spin loop,
  sink the store out of a producer loop, or move other memory accesses across them
  (shared/NOTES.md shows numba doing all three to plain array accesses).
* :func:`fence_seq_cst` - a full fence, needed only for store-then-load ordering ("I am
  going to sleep" then "is there work?"); about 5 ns.

The ordering argument of a single-producer single-consumer ring: the producer writes the
payload, then ``store_release(tail)``; the consumer ``load_acquire(tail)``, then reads the
payload. Release/acquire on the same word makes every payload write that precedes the
release visible to every read that follows the acquire. The same pair in the other
direction (``store_release(head)`` after reading, ``load_acquire(head)`` before writing)
keeps the producer from overwriting a slot the consumer has not finished reading.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

__all__ = ["prefetch", "load_acquire", "store_release", "fence_seq_cst"]


@intrinsic
def prefetch(typingctx, arr, idx):
    """Hint the CPU to fetch the cache line of ``arr[idx]`` (read, keep in all levels); of
    an N-d array, the first line of ``arr[idx, 0, ...]``."""
    if not isinstance(arr, types.Array) or not isinstance(idx, types.Integer):
        return None
    sig = types.void(arr, idx)

    def codegen(context, builder, signature, args):
        aryty, idxty = signature.args
        ary = context.make_array(aryty)(context, builder, args[0])
        first = context.cast(builder, args[1], idxty, types.intp)
        zeros = [context.get_constant(types.intp, 0)] * (aryty.ndim - 1)
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [first, *zeros],
                                       wraparound=False)
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        # (address, rw = 0 read, locality = 3 keep in all levels, cache type = 1 data)
        builder.call(fn, [builder.bitcast(ptr, i8p), i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return sig, codegen


def _elem_ptr(context, builder, aryty, ary_val, idx_val):
    ary = context.make_array(aryty)(context, builder, ary_val)
    return cgutils.get_item_pointer(context, builder, aryty, ary, [idx_val], wraparound=False)


def _is_word_array(arr) -> bool:
    return (isinstance(arr, types.Array) and arr.ndim == 1
            and arr.dtype in (types.uint64, types.int64))


@intrinsic
def load_acquire(typingctx, arr, idx):
    """``arr[idx]`` (8-byte integer) as an atomic load with acquire ordering."""
    if not _is_word_array(arr) or not isinstance(idx, types.Integer):
        return None
    sig = arr.dtype(arr, idx)

    def codegen(context, builder, signature, args):
        ptr = _elem_ptr(context, builder, signature.args[0], args[0], args[1])
        return builder.load_atomic(ptr, "acquire", 8)

    return sig, codegen


@intrinsic
def store_release(typingctx, arr, idx, val):
    """``arr[idx] = val`` (8-byte integer) as an atomic store with release ordering."""
    if not _is_word_array(arr) or not isinstance(idx, types.Integer):
        return None
    if not isinstance(val, types.Integer):
        return None
    sig = types.void(arr, idx, val)

    def codegen(context, builder, signature, args):
        aryty, _, valty = signature.args
        ptr = _elem_ptr(context, builder, aryty, args[0], args[1])
        v = context.cast(builder, args[2], valty, aryty.dtype)
        builder.store_atomic(v, ptr, "release", 8)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def fence_seq_cst(typingctx):
    """A full (sequentially consistent) memory fence."""
    sig = types.void()

    def codegen(context, builder, signature, args):
        builder.fence("seq_cst")
        return context.get_dummy_value()

    return sig, codegen
