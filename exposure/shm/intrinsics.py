"""Every pointer, fence and cache trick of the project, as numba intrinsics.

Names say the memory semantics. Nothing else in the code base emits raw LLVM.

* :func:`prefetch` - ``llvm.prefetch`` of every cache line of an array element (of a 1-d
  array; the first line of an N-d array's row): a hint, never a fault (the address is
  computed without a load, and an index outside the array is clamped by the caller). Used
  by the kernel to pipeline hash-table lookups across a batch, and by publishing to fetch
  the rows a batch moved ahead of writing them.
* :func:`load_acquire` / :func:`store_release` - an atomic 8-byte load with acquire
  ordering and store with release ordering of an array element. On x86-64 both are a plain
  ``mov``; what they buy is that the *compiler* may not hoist the load out of a spin loop,
  sink the store out of a producer loop, or move other memory accesses across them
  (shared/NOTES.md shows numba doing all three to plain array accesses).
* :func:`fence_release` - every earlier access before every later store: a seqlock
  writer's edge between a row's odd version and its data (Linux's ``smp_wmb``). On x86-64,
  whose stores become visible in program order, no instruction: only the compiler's
  barrier.
* :func:`fence_seq_cst` - a full fence, needed only for store-then-load ordering ("I am
  going to sleep" then "is there work?"); about 5 ns.
* :func:`clock_realtime_ns`, :func:`sys_send`, :func:`sys_sendmmsg`, :func:`errno` - libc
  called by name from jitted code, so that a hot stage's one call per pass can read the
  clock and end in its system call (the fan-out's send) without a return to Python.

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

__all__ = ["prefetch", "load_acquire", "store_release", "fence_release", "fence_seq_cst",
           "clock_realtime_ns", "sys_send", "sys_sendmmsg", "errno"]


_LINE = 64  # bytes of a cache line


def _line_offsets(size: int) -> list[int]:
    """Byte offsets, within an element of ``size`` bytes, that touch every cache line the
    element can span wherever it starts: one per line's worth, and its last byte."""
    return sorted({*range(0, size, _LINE), size - 1})


@intrinsic
def prefetch(typingctx, arr, idx):
    """Hint the CPU to fetch ``arr[idx]`` (read, keep in all levels): of a 1-d array, every
    cache line the element spans (a 96- or 112-byte row straddles two or three, and a miss
    on the one not fetched costs what the prefetch saved); of an N-d array, the first line
    of ``arr[idx, 0, ...]``."""
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
        base = builder.bitcast(ptr, i8p)
        size = context.get_abi_sizeof(context.get_data_type(aryty.dtype))
        for off in _line_offsets(size) if aryty.ndim == 1 else [0]:
            at = builder.gep(base, [ir.IntType(64)(off)]) if off else base
            # (address, rw = 0 read, locality = 3 keep in all levels, cache type = 1 data)
            builder.call(fn, [at, i32(0), i32(3), i32(1)])
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
def fence_release(typingctx):
    """A release fence: every load and store before it is ordered before every store after
    it (a seqlock writer's edge between the odd version and the row's data). On x86-64
    (whose stores become visible in program order) it emits no instruction and only stops
    the compiler moving memory accesses across it; on a weaker CPU, its barrier."""
    sig = types.void()

    def codegen(context, builder, signature, args):
        builder.fence("release")
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


# ------------------------------------------------------------------ system calls
# A hot stage's one jitted call per pass may end in the system call it exists for (the
# fan-out's send) and read the clock, without going back to Python for either: these
# call libc by name (the symbols resolve in the process when the code is loaded, so the
# functions cache like any other). Linux with glibc or musl (``__errno_location``).

_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
_I8P = ir.IntType(8).as_pointer()


def _libc(builder, name: str, ret, args):
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, args), name)


@intrinsic
def clock_realtime_ns(typingctx):
    """``clock_gettime(CLOCK_REALTIME)`` in ns: what ``time.time_ns()`` returns (the vDSO,
    no system call)."""
    sig = types.int64()

    def codegen(context, builder, signature, args):
        ts = cgutils.alloca_once(builder, ir.LiteralStructType([_I64, _I64]))
        builder.call(_libc(builder, "clock_gettime", _I32, [_I32, ts.type]), [_I32(0), ts])
        sec = builder.load(cgutils.gep_inbounds(builder, ts, 0, 0))
        nsec = builder.load(cgutils.gep_inbounds(builder, ts, 0, 1))
        return builder.add(builder.mul(sec, _I64(1_000_000_000)), nsec)

    return sig, codegen


def _fd_call(name: str, nbits: int, doc: str):
    """An intrinsic calling libc's ``name(int fd, void *addr, n, int flags)``, ``n`` and
    the result ``nbits`` wide (``size_t``/``ssize_t``: 64; ``unsigned int``/``int``: 32),
    the result sign-extended to int64; any integer arguments."""
    nty = ir.IntType(nbits)
    ntype = types.int64 if nbits == 64 else types.int32

    def typer(typingctx, fd, addr, n, flags):
        if not all(isinstance(t, types.Integer) for t in (fd, addr, n, flags)):
            return None
        sig = types.int64(fd, addr, n, flags)

        def codegen(context, builder, signature, args):
            fdt, at, nt, ft = signature.args
            vals = [context.cast(builder, args[0], fdt, types.int32),
                    builder.inttoptr(context.cast(builder, args[1], at, types.uint64), _I8P),
                    context.cast(builder, args[2], nt, ntype),
                    context.cast(builder, args[3], ft, types.int32)]
            r = builder.call(_libc(builder, name, nty, [_I32, _I8P, nty, _I32]), vals)
            return r if nbits == 64 else builder.sext(r, _I64)

        return sig, codegen

    typer.__name__ = typer.__qualname__ = f"sys_{name}"
    typer.__doc__ = doc
    return intrinsic(typer)


sys_send = _fd_call("send", 64, """``send(fd, (void *) addr, length, flags)``: bytes sent, or
    -1 (see :func:`errno`).""")
sys_sendmmsg = _fd_call("sendmmsg", 32, """``sendmmsg(fd, (struct mmsghdr *) addr, count,
    flags)``: messages sent, or -1.""")


@intrinsic
def errno(typingctx):
    """The calling thread's ``errno`` (read right after the call that failed)."""
    sig = types.int64()

    def codegen(context, builder, signature, args):
        loc = builder.call(_libc(builder, "__errno_location", _I32.as_pointer(), []), [])
        return builder.sext(builder.load(loc), _I64)

    return sig, codegen
