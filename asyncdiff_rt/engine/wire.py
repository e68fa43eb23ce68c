"""Pytrees of tensors as messages between processes: a picklable skeleton (structure,
non-tensor leaves, each tensor's shape, dtype and strides) and one flat byte buffer
holding every tensor, so a message costs one send whatever the pytree.

A tensor's bytes start at a 16-byte aligned offset, so that the receiver's tensors are
views of the buffer (`dtype` views need aligned offsets); a tensor the sender held with
other strides (channels-last, a transpose) is rebuilt with those strides, since kernels
may round differently on another memory format.
"""
from dataclasses import dataclass

import torch
import torch.utils._pytree as pytree

ALIGN = 16


@dataclass(frozen=True)
class TensorMeta:
    shape: tuple
    dtype: torch.dtype
    stride: tuple
    offset: int  # byte offset in the message buffer

    @property
    def nbytes(self):
        n = self.dtype.itemsize
        for size in self.shape:
            n *= size
        return n

    @property
    def contiguous(self):
        return self.stride == _contiguous_strides(self.shape)


@dataclass(frozen=True)
class Skeleton:
    """What a receiver needs to rebuild a pytree from a message buffer."""

    template: object  # the pytree with TensorMeta leaves (it pickles; a TreeSpec may not)
    nbytes: int

    @property
    def leaves(self):
        return pytree.tree_leaves(self.template)

    @property
    def spec(self):
        return pytree.tree_structure(self.template)

    def metas(self):
        return [m for m in self.leaves if isinstance(m, TensorMeta)]


def describe(tree):
    """The Skeleton of `tree` (tensors must be dense: contiguous or permuted)."""
    leaves, spec = pytree.tree_flatten(tree)
    described, offset = [], 0
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            if not _dense(leaf):
                leaf = leaf.contiguous()
            described.append(TensorMeta(tuple(leaf.shape), leaf.dtype, tuple(leaf.stride()), offset))
            offset += -(-leaf.numel() * leaf.element_size() // ALIGN) * ALIGN
        else:
            described.append(leaf)
    return Skeleton(pytree.tree_unflatten(described, spec), offset)


def empty_buffer(skeleton, device):
    return torch.empty(max(skeleton.nbytes, ALIGN), dtype=torch.uint8, device=device)


def pack(tree, skeleton, buffer):
    """Copy `tree`'s tensors (laid out as `skeleton` says) into `buffer`; returns it."""
    leaves = [leaf for leaf in pytree.tree_leaves(tree) if isinstance(leaf, torch.Tensor)]
    for leaf, meta in zip(leaves, skeleton.metas()):
        _bytes(buffer, meta).copy_(_memory_order(leaf).reshape(-1).view(torch.uint8))
    return buffer


def views(skeleton, buffer):
    """The pytree of `skeleton` whose contiguous tensors are views of `buffer` and whose
    strided ones are new tensors (fill them with `refresh` after each receive)."""
    leaves = []
    for meta in skeleton.leaves:
        if not isinstance(meta, TensorMeta):
            leaves.append(meta)
        elif meta.contiguous:
            leaves.append(_bytes(buffer, meta).view(meta.dtype).view(meta.shape))
        else:
            leaves.append(torch.empty_strided(meta.shape, meta.stride, dtype=meta.dtype, device=buffer.device))
    return pytree.tree_unflatten(leaves, skeleton.spec)


def refresh(tree, skeleton, buffer):
    """Copy the received bytes into the strided tensors of `views(skeleton, buffer)`."""
    tensors = [leaf for leaf in pytree.tree_leaves(tree) if isinstance(leaf, torch.Tensor)]
    for leaf, meta in zip(tensors, skeleton.metas()):
        if not meta.contiguous:
            _memory_order(leaf).reshape(-1).copy_(_bytes(buffer, meta).view(meta.dtype))


def zeros(skeleton, device):
    """The pytree of `skeleton` with zero tensors of its shapes, dtypes and strides."""
    leaves = [torch.empty_strided(m.shape, m.stride, dtype=m.dtype, device=device).zero_()
              if isinstance(m, TensorMeta) else m for m in skeleton.leaves]
    return pytree.tree_unflatten(leaves, skeleton.spec)


def _bytes(buffer, meta):
    return buffer[meta.offset:meta.offset + meta.nbytes]


def _contiguous_strides(shape):
    strides, n = [], 1
    for size in reversed(shape):
        strides.append(n)
        n *= max(size, 1)
    return tuple(reversed(strides))


def _dense(t):
    """Whether `t` covers its storage span exactly (some permutation of it is contiguous)."""
    return _memory_order(t).is_contiguous()


def _memory_order(t):
    """`t` permuted so that its strides decrease: a contiguous view for dense tensors."""
    order = sorted(range(t.dim()), key=lambda i: (-t.stride(i), -t.shape[i]))
    return t.permute(order)
