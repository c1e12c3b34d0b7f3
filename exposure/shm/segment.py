"""A plain numpy array in a named POSIX shared-memory segment (small node tables)."""

from __future__ import annotations

import mmap

import numpy as np
import posix_ipc

__all__ = ["SharedArray", "release"]


def release(mm: mmap.mmap, name: str | None) -> None:
    """Unmap ``mm``, then unlink the segment ``name`` (None: keep it; missing is fine)."""
    try:
        mm.close()
    except BufferError:  # a caller still holds a view; the OS unmaps at exit
        pass
    if name is not None:
        try:
            posix_ipc.unlink_shared_memory(name)
        except posix_ipc.ExistentialError:
            pass


class SharedArray:
    """``SharedArray.create(name, shape, dtype)`` / ``.attach(...)``; ``.array`` is the view."""

    def __init__(self, name: str, mm: mmap.mmap, shape, dtype, owner: bool, readonly: bool):
        self.name = name
        self._map = mm
        self._owner = owner
        arr = np.frombuffer(mm, dtype=np.dtype(dtype), count=int(np.prod(shape)))
        self.array = arr.reshape(shape)
        if readonly:
            self.array.flags.writeable = False

    @classmethod
    def create(cls, name: str, shape, dtype) -> SharedArray:
        size = max(int(np.prod(shape)) * np.dtype(dtype).itemsize, 1)
        try:
            shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=size)
        except posix_ipc.ExistentialError:
            posix_ipc.unlink_shared_memory(name)  # the caller checked no live node owns it
            shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=size)
        mm = mmap.mmap(shm.fd, size)
        shm.close_fd()
        return cls(name, mm, shape, dtype, owner=True, readonly=False)

    @classmethod
    def attach(cls, name: str, shape, dtype, readonly: bool = False) -> SharedArray:
        try:
            shm = posix_ipc.SharedMemory(name, read_only=readonly)
        except posix_ipc.ExistentialError:
            raise FileNotFoundError(f"no shared segment {name}: is the node running?") from None
        need = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if shm.size < need:
            shm.close_fd()
            raise ValueError(f"segment {name} is {shm.size} bytes, expected {need}")
        prot = mmap.PROT_READ | (0 if readonly else mmap.PROT_WRITE)
        mm = mmap.mmap(shm.fd, shm.size, prot=prot)
        shm.close_fd()
        return cls(name, mm, shape, dtype, owner=False, readonly=readonly)

    def close(self) -> None:
        self.array = None  # type: ignore[assignment]
        release(self._map, self.name if self._owner else None)
        self._owner = False
