"""``MobaCache``: a transformers ``DynamicCache`` that keeps the chunk means MoBA's gate reads, as chunks complete.

transformers is an optional extra, so this module does not import it: :class:`MobaCache` (a subclass of transformers'
``DynamicCache``) is created on first access of the name (the module-level ``__getattr__``), once per process; after
that ``moba_compile.hf.MobaCache`` is that class object, so ``MobaCache()`` and ``isinstance(cache, MobaCache)`` work
as for any class. :func:`cache_keyword` names the keyword a cache object is passed by.
"""

from __future__ import annotations

import functools
import inspect
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .. import ops
from ._deps import _transformers

__all__ = ["MobaCache", "cache_keyword"]  # noqa: F822 (MobaCache: created by __getattr__ on first access)


def _version(tensor: Tensor) -> int | None:
    """The tensor's version counter (bumped by every in-place torch op); None for inference tensors, which have none."""
    return None if tensor.is_inference() else tensor._version


class _MeanTrack:
    """Chunk means of one cache layer for one chunk size, extended as chunks complete.

    The means come from :func:`moba_compile.ops.chunk_means`, the one computation the prefill gate and the decode
    kernels use too, so a decode step scores chunks with the very numbers its own prefill scored them with (issue:
    chunk means were computed four ways and agreed only to fp32 rounding, so near-tied chunks could rank differently).
    A chunk's mean depends on its own keys only: each newly completed chunk is averaged once, from the keys.

    A track describes one keys tensor, the layer's current one. Why identity is safe here: transformers'
    ``DynamicLayer`` never writes its keys in place (``update`` concatenates; ``crop``, ``reorder_cache``, ``batch_*``
    and ``offload`` replace the tensor), :class:`_MobaCacheLayer` drops its tracks on every layer method but
    ``update``, and :meth:`describes` also requires the same version counter, which any in-place torch op on the keys
    bumps. A weak reference that is still alive is the very tensor object the means were computed from. (A write that
    bypasses torch, e.g. through a numpy view of a cache tensor the user reached into, is outside what any of these can
    see; inference tensors have no version counter, and there the layer methods are the guard.)
    """

    def __init__(self, chunk_size: int, impl: str) -> None:
        self.chunk_size = chunk_size
        self.impl = impl  # the attention's impl, so the means come from the path its decode step takes
        self.length = 0
        self.complete: Tensor | None = None  # [B, H, n_complete, D] means of the complete chunks
        self.keys_ref: Callable[[], Tensor | None] = lambda: None
        self.keys_version: int | None = None

    def describes(self, keys: Tensor) -> bool:
        """Whether these means are those of ``keys``: the same live tensor object, length and version counter."""
        return self.keys_ref() is keys and self.length == keys.shape[-2] and self.keys_version == _version(keys)

    def follow(self, keys: Tensor) -> None:
        """Record ``keys`` (whose first ``length`` positions these means cover) as the tensor described."""
        self.keys_ref = weakref.ref(keys)
        self.keys_version = _version(keys)

    def extend(self, keys: Tensor) -> None:
        """Cover ``keys``, whose first ``self.length`` positions are the ones covered so far: average the chunks that
        completed since (``O(new chunks * C)``, not the whole cache)."""
        c = self.chunk_size
        done = 0 if self.complete is None else self.complete.shape[2]
        total = keys.shape[-2] // c
        if total > done:
            fresh = ops.chunk_means(keys[:, :, done * c : total * c], c, impl=self.impl)
            self.complete = fresh if self.complete is None else torch.cat([self.complete, fresh], dim=2)
        self.length = keys.shape[-2]


# Layer methods that may change the cached keys other than by appending: each drops the means (rebuilt on next use).
_LAYER_MUTATORS = (
    "lazy_initialization",
    "reset",
    "crop",
    "reorder_cache",
    "batch_repeat_interleave",
    "batch_select_indices",
    "offload",
    "prefetch",
)


class _MobaCacheLayer:
    """Mixin over transformers' ``DynamicLayer``: keeps per-chunk-size key means as chunks complete."""

    def _tracks(self) -> dict[int, _MeanTrack]:
        if not hasattr(self, "_moba_tracks"):
            self._moba_tracks: dict[int, _MeanTrack] = {}
        return self._moba_tracks

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        previous = self.keys if getattr(self, "is_initialized", False) else None
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        for chunk_size, track in list(self._tracks().items()):
            if (
                previous is not None
                and track.describes(previous)
                and keys.shape[-2] == track.length + key_states.shape[-2]
            ):
                track.extend(keys)
                track.follow(keys)
            else:  # anything but an append of key_states: rebuild on next use
                del self._tracks()[chunk_size]
        # Which layer returned these keys, for the attention function (the cache object is not handed to it): only a
        # pointer, as chunk_means checks that the tensor is the one its means describe and rebuilds them otherwise.
        keys._moba_cache_layer = weakref.ref(self)
        return keys, values

    def chunk_means(self, chunk_size: int, keys: Tensor, impl: str = "auto") -> Tensor:
        """Means ``[B, H, n, D]`` (fp32; fp64 for fp64 keys on the reference path) of the complete chunks of ``keys``
        (this layer's current keys), by :func:`moba_compile.ops.chunk_means` with the attention's ``impl``."""
        track = self._tracks().get(chunk_size)
        if track is None or not track.describes(keys) or track.impl != impl:
            track = _MeanTrack(chunk_size, impl)
            track.extend(keys)
            track.follow(keys)
            self._tracks()[chunk_size] = track
        if track.complete is None:
            b, h, _, d = keys.shape
            return keys.new_zeros((b, h, 0, d), dtype=torch.float32)
        return track.complete


def _dropping_tracks(name: str) -> Callable[..., Any]:
    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        self._tracks().clear()
        return getattr(super(_MobaCacheLayer, self), name)(*args, **kwargs)

    method.__name__ = name
    return method


_MOBA_CACHE_DOC = """A transformers ``DynamicCache`` that also keeps the chunk means MoBA's gate needs, as chunks
    complete.

    With it, a decode step of an ``attn_implementation="moba"`` layer reads the means of complete chunks (fp32,
    ``[B, Hkv, n, D]``; each chunk averaged once, when it completes, by :func:`moba_compile.ops.chunk_means`, the
    computation the prefill gate and the decode kernels use) instead of averaging every cached key. Cropping,
    beam reordering or offloading the cache makes the means rebuild once on the next step. Means are kept per chunk
    size that a layer asks for. ``MobaCache()`` takes no arguments: its layers are created on first use, one per
    attention layer, as a ``DynamicCache`` without a config does.

    The class is created on first access (``moba_compile.hf.MobaCache``), which imports transformers; the access raises
    ImportError when transformers is not installed. Pass an instance to ``generate`` or the model as ``cache=``
    (transformers 5.24; ``past_key_values=`` on versions before the rename, such as 5.17: :func:`cache_keyword` says
    which).

    Example:
        >>> cache = moba_compile.hf.MobaCache()  # doctest: +SKIP
        >>> out = model.generate(ids, cache=cache, max_new_tokens=32)  # doctest: +SKIP
        >>> isinstance(cache, moba_compile.hf.MobaCache)  # doctest: +SKIP
        True
    """


@functools.cache
def _moba_cache_class() -> type:
    """Create :class:`MobaCache` (once): transformers' ``DynamicCache`` over layers that keep chunk means."""
    _transformers()  # the ImportError naming the extra, when transformers is missing
    from transformers.cache_utils import DynamicCache, DynamicLayer

    overrides = {name: _dropping_tracks(name) for name in _LAYER_MUTATORS if hasattr(DynamicLayer, name)}
    MobaCacheLayer = type("MobaCacheLayer", (_MobaCacheLayer, DynamicLayer), overrides)
    MobaCacheLayer.__module__ = __name__

    def __init__(self: Any) -> None:
        # Layers are created on first use, one per attention layer, as a DynamicCache without a config does.
        super(DynamicCache, self).__init__(layer_class_to_replicate=MobaCacheLayer)

    cls = type("MobaCache", (DynamicCache,), {"__init__": __init__, "__doc__": _MOBA_CACHE_DOC, "__module__": __name__})
    # Reachable by module and qualified name, as pickle looks classes up: moba_compile.hf.cache.MobaCache.Layer.
    cls.Layer = MobaCacheLayer
    MobaCacheLayer.__qualname__ = "MobaCache.Layer"
    return cls


def __getattr__(name: str) -> Any:
    # MobaCache subclasses a transformers class: created when first asked for, so that importing this module (and
    # moba_compile.hf) does not import transformers.
    if name == "MobaCache":
        return _moba_cache_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.cache
def cache_keyword() -> str:
    """The keyword that ``generate`` and transformers' models take for a cache object on the installed version.

    transformers renamed ``past_key_values`` to ``cache`` (5.24 has ``cache``, and warns that ``past_key_values`` is
    deprecated; 5.17 has only ``past_key_values``); the name is read from ``prepare_inputs_for_generation``'s
    signature, which both ``generate`` and the model forwards follow. Answered once per process: decode loops call it
    every step.

    Returns:
        ``"cache"`` or ``"past_key_values"``.

    Raises:
        ImportError: transformers is not installed.

    Example:
        >>> out = model.generate(ids, **{cache_keyword(): MobaCache()}, max_new_tokens=8)  # doctest: +SKIP
    """
    _transformers()
    from transformers.generation.utils import GenerationMixin

    parameters = inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def __dir__() -> list[str]:
    # MobaCache is listed although it is created on first access (see __getattr__).
    return sorted({*globals(), "MobaCache"})


class StaticMeans:
    """The chunk-means buffers of one static-cache layer (transformers' ``StaticLayer``), one per chunk size.

    Kept on the layer's key buffer itself (``keys._moba_static``): transformers hands the attention function the
    buffer, not the cache, and the buffer is the same tensor object at every step of a generation (it is written in
    place). Dynamo reads the attribute while tracing, so a compiled decode step finds the same buffers; each is marked
    as a static address, as transformers marks the key/value buffers, so a CUDA graph replays over them.

    A buffer is ``ready`` once an eager step filled it for the cache's current length (rows of every complete chunk;
    see :func:`moba_compile.ops.static_chunk_means_buffer`); from there each step through the attention function keeps
    it current with ``moba::update_static_chunk_means_`` for its own new keys, which is what a compiled step relies on.
    A step that does not run it (a dense call) marks the buffer stale, and the next eager step refills it.
    """

    def __init__(self) -> None:
        self.buffers: dict[int, Tensor] = {}
        self.ready: set[int] = set()

    def buffer(self, keys: Tensor, chunk_size: int) -> Tensor:
        """The buffer for ``chunk_size``, allocated (zeros) on first use; call outside torch.compile tracing."""
        buf = self.buffers.get(chunk_size)
        if buf is None:
            buf = ops.static_chunk_means_buffer(keys, chunk_size)
            torch._dynamo.mark_static_address(buf)  # a CUDA graph then replays over this very buffer
            self.buffers[chunk_size] = buf
        return buf

    def fill(self, keys: Tensor, length: int, chunk_size: int, impl: str) -> Tensor:
        """Average every complete chunk of the first ``length`` keys into the buffer (eager: O(length) once)."""
        buf = self.buffer(keys, chunk_size)
        rows = min(length // chunk_size, buf.shape[2])
        if rows:
            buf[:, :, :rows].copy_(ops.chunk_means(keys[:, :, : rows * chunk_size], chunk_size, impl=impl))
        self.ready.add(chunk_size)
        return buf


def static_means(keys: Tensor, create: bool = False) -> StaticMeans | None:
    """The :class:`StaticMeans` kept on a static cache's key buffer (created when ``create``), else None."""
    state = getattr(keys, "_moba_static", None)
    if state is None and create:
        state = keys._moba_static = StaticMeans()
    return state
