"""The ``triton.jit`` every MoBA kernel entry point uses: sequence lengths are runtime values, not specialisations.

Triton compiles one binary per combination of "is this int argument 1" and "is it a multiple of 16" over the int
arguments it specialises. For arguments that follow the sequence length (a decode step's ``Lk``, the own chunk's
fill, a mask's row stride, the number of chunks) that means a fresh compile, about a second on an H100, whenever a
call lands in a new class: decode steps 1, 2 and 16 after a prefill each compiled new kernels, and a 128K prefill
compiled what a 48K warm-up had not. Those arguments are listed here and passed as plain runtime ints, so a kernel
compiles once per (dtype, head dim, block configuration). They only bound loops and masks, where a divisibility hint
buys nothing; strides along head dims (multiples of ``D >= 16``) keep their specialisation.

Under the interpreter (``TRITON_INTERPRET=1``) importing this module also installs the interpreter's fast paths
(:func:`moba_compile.kernels.support.speed_up_interpreter`), before any kernel can run.
"""

import triton

from .support import interpreting, speed_up_interpreter

__all__ = ["LENGTH_ARGS", "kernel_jit"]

# Lengths and counts that follow them, and strides of tensors whose shape includes a length (masks [B, H, Lq, Lk],
# the selection [B, H, Lq, K-1], the log-sum-exp [B, H, Lq]). Names absent from a kernel's signature are ignored.
LENGTH_ARGS = (
    "Lq",
    "Lk",
    "N",
    "KM1",
    "n_segments",
    "n_prev",
    "chunks_per_split",
    "n_split",
    "own_chunk",
    "own_len",
    "n_entries",
    "plane_size",
    "smb",
    "smh",
    "smm",
    "stb",
    "sth",
    "slb",
    "slh",
    "s_row",  # the gate's slot-major selection [K-1, B, Hq, Lq]: its slot stride is B * Hq * Lq
    "s_slot",
    "new_tokens",  # a static cache's update: the prompt's length in prefill, 1 in decode
    "lq_magic",  # the dK/dV kernel's multiply-high divisor for Lq, and its shift
    "lq_shift",
)

kernel_jit = triton.jit(do_not_specialize=LENGTH_ARGS)

if interpreting():
    speed_up_interpreter()
