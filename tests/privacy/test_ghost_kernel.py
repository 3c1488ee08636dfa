"""The fused Triton ghost-norm kernel against the Gram-matrix formula in float64, and the dispatch in
`linear.ghost_sq_norms` (kernel on CUDA, torch elsewhere or when forced).

On CPU the kernel runs under Triton's interpreter, which must be switched on (``TRITON_INTERPRET=1``)
before triton is first imported in the process (see `ghost_kernel`): so one subprocess runs every
interpreted case and saves the outputs, and the tests here compare them. The interpreter is slow;
shapes stay small.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import types

import pytest
import torch

from dpcap.privacy.layers import ghost_kernel, linear
from dpcap.privacy.layers.ghost_kernel import GHOST_KERNEL_ENV, ghost_sq_norms_triton, triton_available


def needs_cuda(test):
    """The `cuda` marker (selected by benchmarks/gpu_check.sh: pytest -m cuda) and a skip without a GPU."""
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")(test))


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
RTOL = {"fp32": 1e-4, "bf16": 1e-2, "fp16": 1e-2}  # against float64 of the inputs as rounded

# (B, T, d, p): T = 1; odd T, d, p on every tile edge; T = 65 and 150 span 2 and 3 position tiles (the
# off-diagonal, doubled tiles); d = 130 spans 5 feature steps; B = 0.
SHAPES = [(3, 1, 5, 7), (2, 17, 33, 9), (4, 65, 24, 40), (1, 40, 130, 3), (2, 150, 20, 18), (0, 4, 6, 8)]
# name → (B, T, d, p, x dtype, g dtype, layout); "strided": x a transposed view, g every other feature.
CASES = {f"{dt}-{'x'.join(map(str, shape))}": (*shape, dt, dt, "contiguous") for shape in SHAPES for dt in DTYPES} | {
    "strided-fp32-bf16": (3, 23, 19, 17, "fp32", "bf16", "strided")
}


def make_inputs(case: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """The case's (x, g), the same in every process (seeded from the shape)."""
    batch, positions, d, p, x_dtype, g_dtype, layout = case
    gen = torch.Generator().manual_seed(batch * 1000003 + positions * 1009 + d * 31 + p)
    if layout == "strided":  # cast first: a cast of a strided view is contiguous
        x = torch.randn(batch, d, positions, generator=gen).to(DTYPES[x_dtype]).transpose(1, 2)
        g = torch.randn(batch, positions, 2 * p, generator=gen).to(DTYPES[g_dtype])[:, :, ::2]
        return x, g
    x = torch.randn(batch, positions, d, generator=gen)
    g = torch.randn(batch, positions, p, generator=gen)
    return x.to(DTYPES[x_dtype]), g.to(DTYPES[g_dtype])


def reference(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Σ_{t,s}(x_t·x_s)(g_t·g_s) in float64, of the inputs exactly as given (e.g. already bf16-rounded)."""
    x, g = x.double(), g.double()
    return ((x @ x.transpose(1, 2)) * (g @ g.transpose(1, 2))).sum(dim=(1, 2))


# Run with TRITON_INTERPRET=1: every case through the kernel, plus the forced dispatch and the checks
# that only hold in an interpreting process.
CHILD = """
import os, sys, torch
from dpcap.privacy.layers import ghost_kernel, linear
from tests.privacy.test_ghost_kernel import CASES, make_inputs
assert ghost_kernel.interpreting()
assert not ghost_kernel.triton_available(torch.ones(1))  # CPU: never the compiled kernel
out = {name: ghost_kernel.ghost_sq_norms_triton(*make_inputs(case)) for name, case in CASES.items()}
x, g = make_inputs(CASES["fp32-2x17x33x9"])
os.environ[ghost_kernel.GHOST_KERNEL_ENV] = "triton"
out["dispatch-triton"] = linear.ghost_sq_norms(x, g)
os.environ[ghost_kernel.GHOST_KERNEL_ENV] = "auto"
out["dispatch-auto"] = linear.ghost_sq_norms(x, g)
for bad in (torch.zeros(1, 2, 3, dtype=torch.float64), torch.zeros(1, 3, 4)):
    try:
        ghost_kernel.ghost_sq_norms_triton(bad, torch.zeros(1, 2, 4))
    except (TypeError, ValueError) as e:
        out[f"refused-{type(e).__name__}"] = str(e)
torch.save(out, sys.argv[1])
"""


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    """The outputs of `CHILD`, run once in a subprocess under Triton's interpreter."""
    pytest.importorskip("triton")
    path = tmp_path_factory.mktemp("ghost_kernel") / "out.pt"
    env = {k: v for k, v in os.environ.items() if k != GHOST_KERNEL_ENV} | {"TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return torch.load(path)


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_float64_reference(interpreted, name):
    case = CASES[name]
    x, g = make_inputs(case)
    assert case[-1] == "contiguous" or not (x.is_contiguous() or g.is_contiguous())
    out = interpreted[name]
    assert out.dtype == torch.float32 and out.shape == (case[0],)
    rtol = max(RTOL[case[4]], RTOL[case[5]])
    torch.testing.assert_close(out.double(), reference(x, g), rtol=rtol, atol=0)


def test_interpreted_dispatch_and_refusals(interpreted):
    x, g = make_inputs(CASES["fp32-2x17x33x9"])
    assert torch.equal(interpreted["dispatch-triton"], interpreted["fp32-2x17x33x9"])  # forced: the kernel
    torch.testing.assert_close(interpreted["dispatch-auto"].double(), reference(x, g), rtol=1e-5, atol=0)
    assert "float64" in interpreted["refused-TypeError"]
    assert "expected x" in interpreted["refused-ValueError"]


def test_kernel_refuses_cpu_without_interpreter():
    if ghost_kernel.interpreting():
        pytest.skip("this process interprets Triton")
    with pytest.raises((RuntimeError, ImportError), match="TRITON_INTERPRET|triton"):
        ghost_sq_norms_triton(torch.ones(1, 2, 3), torch.ones(1, 2, 4))


@pytest.fixture
def spy(monkeypatch):
    """Replaces the kernel as `linear` sees it; records the calls."""
    calls = []

    def fake(x, g):
        calls.append((x, g))
        return torch.zeros(x.shape[0])

    monkeypatch.setattr(linear, "ghost_sq_norms_triton", fake)
    return calls


def test_dispatch_uses_torch_on_cpu(monkeypatch, spy):
    monkeypatch.delenv(GHOST_KERNEL_ENV, raising=False)
    x, g = torch.randn(2, 5, 3), torch.randn(2, 5, 4)
    assert not triton_available(x)
    torch.testing.assert_close(linear.ghost_sq_norms(x, g).double(), reference(x, g), rtol=1e-5, atol=0)
    assert spy == []


def test_dispatch_env_forces_torch_or_kernel(monkeypatch, spy):
    x, g = torch.randn(2, 5, 3), torch.randn(2, 5, 4)
    monkeypatch.setattr(linear, "triton_available", lambda t: True)  # as for a CUDA tensor
    monkeypatch.delenv(GHOST_KERNEL_ENV, raising=False)
    linear.ghost_sq_norms(x, g)
    assert len(spy) == 1  # auto: the kernel where available
    linear.ghost_sq_norms(x.double(), g.double())
    assert len(spy) == 1  # float64 stays on torch
    monkeypatch.setenv(GHOST_KERNEL_ENV, "torch")
    torch.testing.assert_close(linear.ghost_sq_norms(x, g).double(), reference(x, g), rtol=1e-5, atol=0)
    assert len(spy) == 1
    monkeypatch.setattr(linear, "triton_available", lambda t: False)
    monkeypatch.setenv(GHOST_KERNEL_ENV, "triton")
    linear.ghost_sq_norms(x, g)
    assert len(spy) == 2
    monkeypatch.setenv(GHOST_KERNEL_ENV, "cuda")
    with pytest.raises(ValueError, match=GHOST_KERNEL_ENV):
        linear.ghost_sq_norms(x, g)


def test_not_available_without_triton_or_under_interpreter(monkeypatch):
    cuda_like = types.SimpleNamespace(is_cuda=True)
    monkeypatch.setattr(ghost_kernel, "interpreting", lambda: False)
    monkeypatch.setattr(ghost_kernel, "_triton_imports", lambda: False)
    assert not triton_available(cuda_like)
    monkeypatch.setattr(ghost_kernel, "_triton_imports", lambda: True)
    assert triton_available(cuda_like)
    monkeypatch.setattr(ghost_kernel, "interpreting", lambda: True)
    assert not triton_available(cuda_like)


def test_import_and_cpu_path_without_triton(monkeypatch):
    """With triton unimportable (None in sys.modules), the module imports afresh, reports the kernel
    unavailable even for a CUDA tensor, and the CPU dispatch still computes."""
    monkeypatch.setitem(sys.modules, "triton", None)
    # Both restored afterwards (the import rebinds the package attribute too); `linear` keeps the original.
    monkeypatch.delitem(sys.modules, ghost_kernel.__name__)
    monkeypatch.setattr(sys.modules["dpcap.privacy.layers"], "ghost_kernel", ghost_kernel)
    fresh = importlib.import_module(ghost_kernel.__name__)
    assert fresh is not ghost_kernel and fresh.tl is None
    assert not fresh.triton_available(types.SimpleNamespace(is_cuda=True))
    with pytest.raises(ImportError, match="needs triton"):
        fresh.ghost_sq_norms_triton(torch.ones(1, 2, 3), torch.ones(1, 2, 4))
    monkeypatch.delenv(GHOST_KERNEL_ENV, raising=False)
    assert linear.ghost_sq_norms(torch.ones(2, 3, 4), torch.ones(2, 3, 5)).tolist() == [3.0 * 3 * 4 * 5] * 2


@needs_cuda
@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-4), (torch.bfloat16, 1e-3)], ids=["fp32", "bf16"])
def test_cuda_kernel_matches_reference_at_vit_shape(monkeypatch, dtype, rtol):
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv(GHOST_KERNEL_ENV, raising=False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(32, 197, 768, device="cuda", generator=gen).to(dtype)
    g = torch.randn(32, 197, 3072, device="cuda", generator=gen).to(dtype)
    assert triton_available(x)
    out = ghost_sq_norms_triton(x, g)
    torch.testing.assert_close(out.double(), reference(x, g), rtol=rtol, atol=0)
    assert torch.equal(out, ghost_sq_norms_triton(x, g))  # no atomics: bitwise reproducible
    calls = []
    monkeypatch.setattr(linear, "ghost_sq_norms_triton", lambda *a: calls.append(a) or ghost_sq_norms_triton(*a))
    torch.testing.assert_close(linear.ghost_sq_norms(x.float(), g.float()), out, rtol=rtol, atol=0)
    assert len(calls) == 1  # auto: the kernel on CUDA
