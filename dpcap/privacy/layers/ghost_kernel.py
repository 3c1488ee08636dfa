"""A fused Triton kernel for the ghost norm ‖Σ_t g_t x_tᵀ‖²_F = Σ_{t,s}(x_t·x_s)(g_t·g_s), per sample.

The torch path (`linear.ghost_sq_norms`) writes two B×T×T Gram matrices to memory and reads them back;
at a ViT-B shape (B, T, d, p) = (32, 197, 768, 3072) that is 2·B·T² floats of traffic for a result of B
floats. Here one program handles one sample b and one pair of position tiles (i, j): it accumulates the
x-Gram tile X_i X_jᵀ over d and the g-Gram tile G_i G_jᵀ over p in registers (`tl.dot`, float32
accumulation), multiplies them elementwise and reduces to one float. Both Gram matrices are symmetric,
so only tiles j ≤ i are computed, off-diagonal ones counted twice. Each program writes its partial to
its own slot of a (B, nT, nT) buffer, summed by torch afterwards: no atomics, so the result is
deterministic (bitwise reproducible run to run), which a float32 `atomic_add` would not be.

Every tile edge is masked (loads beyond T, d or p read 0), so any T, d, p ≥ 1 works; block sizes are
powers of two of at least 16, the minimum `tl.dot` accepts. Inputs may be float32, bfloat16 or float16
(x and g need not match) and non-contiguous (strides are passed). float32 operands are multiplied at
full precision (``input_precision="ieee"``) unless ``torch.backends.cuda.matmul.allow_tf32`` is set,
matching what the torch path's matmuls would do. The result is float32 and not differentiable.

Triton is imported, and the kernel decorated, lazily on first use, so importing dpcap never needs triton
and a CPU-only run never imports it. On CPU tensors the kernel runs under Triton's interpreter, for tests:
``TRITON_INTERPRET=1`` must be in the environment before triton is first imported in the process, since
Triton decorates its own helpers (``tl.sum``, ...) at import and the interpreter refuses compiled ones
("Cannot call @triton.jit'd outside of the scope of a kernel"); setting it later in process does not
work. The tests therefore run the interpreted kernel in a subprocess. The interpreter runs programs
serially in numpy, slow, so only small shapes; and its ``tl.dot`` multiplies bfloat16's raw uint16 bits,
so under it the operands are cast to float32 first (exact: the compiled kernel's bf16 products are exact
in its float32 accumulator too).
"""

from __future__ import annotations

import contextlib
import functools

import torch

# Bound by `_triton_imports` on first use; module globals because the kernel's body resolves `tl` here.
triton = None
tl = None

# How `linear.ghost_sq_norms` computes: auto (the kernel on CUDA, torch elsewhere), torch, or triton.
GHOST_KERNEL_ENV = "DPCAP_GHOST_KERNEL"
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Tile sizes, from ptxas -v on sm_90a (no GPU timing yet): 64 positions × 32 features per step at 8 warps
# (and the smaller tiles of short T at 4) compile without register spills for float32 (ieee, tf32),
# bfloat16 and float16 operands; 64 × 64 at 4 warps spilled (the two float32 accumulators live together).
_MAX_TILE_T = 64  # positions per tile
_MAX_TILE_K = 32  # features per step of the d and p loops


def triton_available(x: torch.Tensor) -> bool:
    """Whether the compiled kernel can run on `x`: `x` is on a CUDA (or ROCm) device and triton imports.

    False under Triton's interpreter (it would run the kernel serially on the host), and for CPU tensors:
    there the kernel runs only under the interpreter, for tests (call `ghost_sq_norms_triton` directly, or
    set ``DPCAP_GHOST_KERNEL=triton``).
    """
    return bool(x.is_cuda) and _triton_imports() and not interpreting()


def interpreting() -> bool:
    """Whether the kernel runs in Triton's CPU interpreter: whether ``triton.jit`` made it interpreted.

    That follows ``TRITON_INTERPRET`` when the kernel is first used, and it must agree with the variable
    when triton was first imported in the process (Triton decorates its own helpers, e.g. ``tl.sum``, then),
    so the mode is fixed per process: set ``TRITON_INTERPRET=1`` before anything imports triton.
    """
    return _triton_imports() and not isinstance(_kernel(), triton.JITFunction)


@functools.cache
def _triton_imports() -> bool:
    """Whether triton imports (tried on the first CUDA call: a CPU-only run never imports it)."""
    try:
        import triton as _triton
        import triton.language as _tl
    except ImportError:
        return False
    global triton, tl
    triton, tl = _triton, _tl
    return True


def _ghost_tile(
    x_ptr, g_ptr, out_ptr,
    T, D, P, N_TILES,
    sxb, sxt, sxd, sgb, sgt, sgp,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
    PRECISION_X: tl.constexpr, PRECISION_G: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """One (sample b, tile pair i ≥ j) program: Σ over the tile of (X_i X_jᵀ) ⊙ (G_i G_jᵀ), ×2 off the diagonal."""
    b = tl.program_id(0)
    i = tl.program_id(1)
    j = tl.program_id(2)
    if j > i:
        return  # the mirrored tile (i, j) counts this one; its slot stays 0
    b64 = b.to(tl.int64)  # B·T·d may pass 2³¹ elements
    rows = i * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = j * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    col_ok = cols < T

    x_base = x_ptr + b64 * sxb
    acc_x = tl.zeros((BLOCK_T, BLOCK_T), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_D):
        ks = k0 + tl.arange(0, BLOCK_D)
        k_ok = ks < D
        xa = tl.load(x_base + rows[:, None] * sxt + ks[None, :] * sxd, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        xb = tl.load(x_base + cols[:, None] * sxt + ks[None, :] * sxd, mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        if UPCAST:  # interpreter only (see the module docstring)
            xa, xb = xa.to(tl.float32), xb.to(tl.float32)
        acc_x = tl.dot(xa, tl.trans(xb), acc_x, input_precision=PRECISION_X)

    g_base = g_ptr + b64 * sgb
    acc_g = tl.zeros((BLOCK_T, BLOCK_T), dtype=tl.float32)
    for k0 in range(0, P, BLOCK_P):
        ks = k0 + tl.arange(0, BLOCK_P)
        k_ok = ks < P
        ga = tl.load(g_base + rows[:, None] * sgt + ks[None, :] * sgp, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        gb = tl.load(g_base + cols[:, None] * sgt + ks[None, :] * sgp, mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        if UPCAST:
            ga, gb = ga.to(tl.float32), gb.to(tl.float32)
        acc_g = tl.dot(ga, tl.trans(gb), acc_g, input_precision=PRECISION_G)

    # Rows/columns past T are 0 in both accumulators (masked loads), so they add nothing.
    partial = tl.sum(tl.sum(acc_x * acc_g, axis=1), axis=0)
    if i != j:
        partial = partial * 2.0
    tl.store(out_ptr + (b64 * N_TILES + i) * N_TILES + j, partial)


@functools.cache
def _kernel():
    """The kernel, decorated on first use (so that importing dpcap never imports triton)."""
    if not _triton_imports():
        raise ImportError("the ghost kernel needs triton")
    return triton.jit(_ghost_tile)


def _block(n: int, cap: int) -> int:
    """Smallest power of two ≥ n, clamped to [16, cap] (16: the least `tl.dot` operand dimension)."""
    return max(16, min(cap, 1 << max(n - 1, 0).bit_length()))


def _precision(t: torch.Tensor) -> str:
    """tf32 for float32 operands only where torch's own CUDA matmuls would use it; exact otherwise."""
    tf32 = t.dtype == torch.float32 and t.is_cuda and torch.backends.cuda.matmul.allow_tf32
    return "tf32" if tf32 else "ieee"


def ghost_sq_norms_triton(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Σ_{t,s}(x_t·x_s)(g_t·g_s) per sample for x (B,T,d), g (B,T,p), float32, without the Gram matrices.

    Needs CUDA tensors, or CPU tensors with ``TRITON_INTERPRET=1`` set (Triton's interpreter).
    """
    if x.dim() != 3 or g.dim() != 3 or x.shape[:2] != g.shape[:2]:
        raise ValueError(f"expected x (B, T, d) and g (B, T, p); got {tuple(x.shape)} and {tuple(g.shape)}")
    for name, t in (("x", x), ("g", g)):
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} is {t.dtype}; the ghost kernel takes {SUPPORTED_DTYPES}")
    if x.device != g.device:
        raise ValueError(f"x is on {x.device} and g on {g.device}")
    batch, positions, d = x.shape
    p = g.shape[-1]
    if batch == 0 or positions == 0 or d == 0 or p == 0:
        return torch.zeros(batch, dtype=torch.float32, device=x.device)
    kernel = _kernel()
    if not x.is_cuda and not interpreting():
        raise RuntimeError("the Triton ghost kernel runs on CUDA tensors, or on CPU only with TRITON_INTERPRET=1")
    block_t = _block(positions, _MAX_TILE_T)
    n_tiles = triton.cdiv(positions, block_t)
    partials = torch.zeros(batch, n_tiles, n_tiles, dtype=torch.float32, device=x.device)
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        kernel[(batch, n_tiles, n_tiles)](
            x, g, partials,
            positions, d, p, n_tiles,
            *x.stride(), *g.stride(),
            BLOCK_T=block_t, BLOCK_D=_block(d, _MAX_TILE_K), BLOCK_P=_block(p, _MAX_TILE_K),
            PRECISION_X=_precision(x), PRECISION_G=_precision(g), UPCAST=interpreting(),
            num_warps=8 if block_t == 64 else 4,
        )  # fmt: skip
    return partials.sum(dim=(1, 2))
