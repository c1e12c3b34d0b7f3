"""A stage's arrays bound once: a :class:`Handle` crosses the Python-to-numba boundary as
one argument whatever it holds, where each array argument costs numba's runtime a MemInfo
made and freed per call (``NRT_adapt_ndarray_from_python``, ``malloc``/``free``). Compute's
step with its 23 members as arguments: 2.7 us through the compiled entry; with one handle:
0.46-0.73 us (``perf/bench_handle.py``, docs/performance.md).

A handle is made once, when a stage starts, from the arrays it passes on every call (the
state's named tuple of arrays and plain integers too). It keeps them alive and writes a
**descriptor**: one u8 array holding a type tag, then each array's data address, shape and
strides (a named tuple's arrays in order; an integer's value). Its numba type
(:class:`HandleType`) is derived at run time from ``numba.typeof`` of what it holds, so a
state named tuple that gains fields flows through with no edit here. Inside jitted code
:func:`members` rebuilds the tuple of what the handle holds from the descriptor (plain
loads: no runtime calls), so a stage's step is::

    @njit(cache=True)
    def _step_h(h, now):
        return _step(*members(h), now)   # _step: the plain @njit function over arrays

**The pointer argument** (why the raw addresses are safe). The handle holds a reference to
every array it describes, and each array to its buffer (a numpy allocation or a shared
memory mapping), so no address in the descriptor is freed while the handle lives; the
jitted code receives the handle only as an argument of a call, during which the caller
holds it. Arrays rebuilt by :func:`members` have no MemInfo (as ``numba.carray``'s): numba
never frees or counts them, and nothing may keep them beyond the call (a stage's step
returns scalars). A shared-memory mapping cannot be unmapped under a live handle either:
the handle's arrays are buffer exports of the ``mmap``, whose ``close`` then refuses
(``BufferError``; :func:`exposure.shm.segment.release` leaves it mapped until exit).
Memory ordering is unchanged: the rebuilt views are the same memory with the same types, so
every cross-process hand-off still goes through :mod:`exposure.shm.intrinsics`.

**Checks at the boundary.** The unboxing (numba's conversion of the Python argument, before
any jitted code runs) reads the handle's ``_word`` (the descriptor's address) and the tag
in the descriptor's first word, and raises ``TypeError`` for a closed handle
(:meth:`Handle.close`) or one whose members' types are not those the function was
compiled for (a stale compiled entry, or a handle of other arrays): a mismatch is refused,
never read. :func:`bind` refuses a closed handle and returns the entry compiled for
exactly the types of its arguments.

The numba on-disk cache (``cache=True``) works: :class:`HandleType` pickles by its members'
types, so a cached function over a handle loads in a fresh process like any other.
"""

from __future__ import annotations

import hashlib

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import (
    NativeValue,
    intrinsic,
    models,
    register_model,
    typeof_impl,
    unbox,
)

__all__ = ["Handle", "HandleType", "members", "bind"]


def _words(t) -> int:
    """How many descriptor words a value of numba type ``t`` takes; TypeError if a handle
    cannot hold it."""
    if isinstance(t, types.Array):
        return 1 + 2 * t.ndim
    if isinstance(t, types.BaseTuple):
        return sum(_words(m) for m in t.types)
    if isinstance(t, (types.Integer, types.Boolean, types.Float)):
        return 1
    raise TypeError(f"a Handle holds arrays, tuples of them and numbers, not {t}")


def _tag(name: str) -> int:
    """The type tag: 63 bits of a hash of the type's name (stable across processes)."""
    h = hashlib.blake2b(name.encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 1 | 1  # never 0 (a zeroed descriptor)


class HandleType(types.Type):
    """The numba type of a :class:`Handle`: the types of what it holds, in order."""

    def __init__(self, member_types: tuple):
        self.members = tuple(member_types)
        self.nwords = 1 + sum(_words(t) for t in self.members)
        super().__init__(name=f"Handle({', '.join(str(t) for t in self.members)})")
        self.tag = _tag(self.name)

    @property
    def key(self):
        return self.members


def _flatten(v, t, out: list) -> None:
    if isinstance(t, types.Array):
        a = v
        out.append(a.ctypes.data)
        out.extend(int(s) for s in a.shape)
        out.extend(int(s) for s in a.strides)
    elif isinstance(t, types.BaseTuple):
        for x, xt in zip(v, t.types, strict=True):
            _flatten(x, xt, out)
    elif isinstance(t, types.Float):
        out.append(int(np.array(v, np.float64).view(np.uint64)))
    else:
        out.append(int(v) & 0xFFFF_FFFF_FFFF_FFFF)


class Handle:
    """``values`` (arrays, named tuples of arrays, integers) bound once for jitted calls.

    ``h.values`` is what it holds, in order; ``h.nbtype`` its numba type; ``h.desc`` the
    descriptor (u8). An array's shape and data address are fixed at binding: a stage that
    replaces an array makes a new handle."""

    __slots__ = ("values", "nbtype", "desc", "_word")

    def __init__(self, *values):
        nbtype = HandleType(tuple(numba.typeof(v) for v in values))
        words: list[int] = [nbtype.tag]
        for v, t in zip(values, nbtype.members, strict=True):
            _flatten(v, t, words)
        self.values = values
        self.nbtype = nbtype
        self.desc = np.array(words, np.uint64)
        self._word = int(self.desc.ctypes.data)

    @property
    def _numba_type_(self) -> HandleType:
        """(numba's dispatcher reads this: a cached type code, not a typeof per call)"""
        return self.nbtype

    def close(self) -> None:
        """Refuse every later call with this handle (TypeError at the boundary)."""
        self._word = 0

    @property
    def closed(self) -> bool:
        return self._word == 0


@typeof_impl.register(Handle)
def _typeof_handle(val, c):
    return val.nbtype


@register_model(HandleType)
class _HandleModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, ir.IntType(64).as_pointer())


_I64 = ir.IntType(64)


@unbox(HandleType)
def _unbox_handle(typ, obj, c):
    """``obj._word`` as the descriptor pointer, after checking the address is set and the
    descriptor's tag is this type's."""
    builder = c.builder
    ok = cgutils.alloca_once_value(builder, cgutils.false_bit)
    ptr = cgutils.alloca_once_value(builder, cgutils.get_null_value(_I64.as_pointer()))
    word = c.pyapi.object_getattr_string(obj, "_word")
    with cgutils.if_likely(builder, cgutils.is_not_null(builder, word)):
        addr = c.pyapi.long_as_ulonglong(word)
        c.pyapi.decref(word)
        with builder.if_else(builder.icmp_unsigned("!=", addr, _I64(0))) as (live, dead):
            with live:
                p = builder.inttoptr(addr, _I64.as_pointer())
                good = builder.icmp_unsigned("==", builder.load(p), _I64(typ.tag))
                with builder.if_else(good) as (yes, no):
                    with yes:
                        builder.store(cgutils.true_bit, ok)
                        builder.store(p, ptr)
                    with no:
                        c.pyapi.err_set_string(
                            "PyExc_TypeError", f"a Handle whose members are not {typ.name} "
                            "(a stale compiled entry, or another stage's handle)")
            with dead:
                c.pyapi.err_set_string("PyExc_TypeError", "a closed Handle")
    # (a NULL word: getattr already set AttributeError)
    is_error = builder.not_(builder.load(ok))
    return NativeValue(builder.load(ptr), is_error=is_error)


def _build(context, builder, t, base, k: int):
    """The value of numba type ``t`` from descriptor words ``base[k:]``; returns (value,
    next k)."""
    def word(i):
        return builder.load(builder.gep(base, [_I64(i)]))

    if isinstance(t, types.Array):
        ary = context.make_array(t)(context, builder)
        dty = context.get_data_type(t.dtype)
        data = builder.inttoptr(word(k), dty.as_pointer())
        shape = [word(k + 1 + d) for d in range(t.ndim)]
        strides = [word(k + 1 + t.ndim + d) for d in range(t.ndim)]
        itemsize = context.get_constant(types.intp, context.get_abi_sizeof(dty))
        context.populate_array(ary, data=data,
                               shape=cgutils.pack_array(builder, shape),
                               strides=cgutils.pack_array(builder, strides),
                               itemsize=itemsize, meminfo=None)
        return ary._getvalue(), k + 1 + 2 * t.ndim
    if isinstance(t, types.BaseTuple):
        vals = []
        for m in t.types:
            v, k = _build(context, builder, m, base, k)
            vals.append(v)
        return context.make_tuple(builder, t, vals), k
    w = word(k)
    if isinstance(t, types.Boolean):
        return builder.icmp_unsigned("!=", w, _I64(0)), k + 1
    if isinstance(t, types.Float):
        d = builder.bitcast(w, ir.DoubleType())
        return context.cast(builder, d, types.float64, t), k + 1
    lt = context.get_value_type(t)
    return (builder.trunc(w, lt) if lt.width < 64 else w), k + 1


@intrinsic
def members(typingctx, h):
    """The tuple of what handle ``h`` holds (its arrays rebuilt from the descriptor)."""
    if not isinstance(h, HandleType):
        return None
    tup = types.Tuple(h.members)

    def codegen(context, builder, signature, args):
        v, _ = _build(context, builder, tup, args[0], 1)
        return v

    return tup(h), codegen


def bind(dispatcher, *args):
    """The compiled entry of ``dispatcher`` for ``args`` (typically a :class:`Handle` and
    scalar prototypes), like :func:`exposure.core.jit.entry`, after checking that each
    Handle among ``args`` is open. The entry skips numba's typing on every call; a
    handle's own check (its tag, at unboxing) still refuses a handle of other types."""
    for a in args:
        if isinstance(a, Handle) and a.closed:
            raise TypeError("bind: a closed Handle")
    sig = tuple(numba.typeof(a) for a in args)
    dispatcher.compile(sig)
    for s, cres in dispatcher.overloads.items():
        if tuple(s) == sig:
            return cres.entry_point
    raise TypeError(f"bind: no compiled overload of {dispatcher} for {sig}")
