"""Gaussian noise from the secret generator: independence, distribution, dtypes, devices."""

import types

import pytest
import torch
from scipy import stats

from dpcap.errors import ConfigError, PrivacyError
from dpcap.privacy.noise import NOISE_CHUNK_ELEMENTS, add_gaussian_noise_, secret_generator


def test_secret_generators_differ():
    a, b = secret_generator(), secret_generator()
    assert a.initial_seed() != b.initial_seed()
    assert not torch.equal(torch.randn(64, generator=a), torch.randn(64, generator=b))


def _draws(generator: torch.Generator, std: float, *sizes: int) -> torch.Tensor:
    """The documented draw: consecutive ``normal_(0, std)`` chunks from the plain generator."""
    return torch.cat([torch.empty(n).normal_(0.0, std, generator=generator) for n in sizes])


def test_insecure_seed_is_reproducible_and_matches_plain_draws():
    x, y = torch.zeros(3, 5), torch.zeros(3, 5)
    add_gaussian_noise_([x], std=0.7, generator=secret_generator(insecure_seed=123))
    add_gaussian_noise_([y], std=0.7, generator=secret_generator(insecure_seed=123))
    assert torch.equal(x, y)
    assert torch.equal(x, _draws(torch.Generator().manual_seed(123), 0.7, 15).view(3, 5))
    # For 16 elements or more, the same bits as randn() · std.
    z = torch.zeros(40)
    add_gaussian_noise_([z], std=0.7, generator=secret_generator(insecure_seed=4))
    assert torch.equal(z, torch.randn(40, generator=torch.Generator().manual_seed(4)) * 0.7)


def test_tensors_larger_than_a_chunk_get_consecutive_independent_draws():
    n = 2 * NOISE_CHUNK_ELEMENTS + 100
    x, small = torch.zeros(n), torch.zeros(7)
    add_gaussian_noise_([x, small], std=1.3, generator=secret_generator(insecure_seed=11))
    oracle = torch.Generator().manual_seed(11)
    expected = _draws(oracle, 1.3, NOISE_CHUNK_ELEMENTS, NOISE_CHUNK_ELEMENTS, 100, 7)
    assert torch.equal(torch.cat([x, small]), expected)
    first, second = x[:NOISE_CHUNK_ELEMENTS], x[NOISE_CHUNK_ELEMENTS : 2 * NOISE_CHUNK_ELEMENTS]
    assert not torch.equal(first, second)  # the scratch buffer is redrawn, never re-added
    assert abs(torch.corrcoef(torch.stack([first, second]))[0, 1].item()) < 0.02
    ratio = (n - 1) * x.double().var().item() / 1.3**2
    assert stats.chi2.ppf(1e-6, n - 1) < ratio < stats.chi2.ppf(1 - 1e-6, n - 1)


def test_non_contiguous_tensor_gets_noise_in_its_own_layout():
    base = torch.zeros(6, 40)
    view = base.t()  # (40, 6), not contiguous
    add_gaussian_noise_([view], std=0.5, generator=secret_generator(insecure_seed=2))
    expected = torch.empty(40, 6).normal_(0.0, 0.5, generator=torch.Generator().manual_seed(2))
    assert torch.equal(view, expected)


def test_each_tensor_gets_fresh_noise():
    x, y = torch.zeros(100), torch.zeros(100)
    add_gaussian_noise_([x, y], std=1.0, generator=secret_generator(insecure_seed=1))
    assert not torch.equal(x, y)


def test_noise_distribution_matches_std():
    """Sample variance of n draws: (n-1)s²/std² ~ χ²(n-1); the mean ~ N(0, std²/n)."""
    n, std = 400_000, 0.37
    x = torch.full((n,), 2.0)
    add_gaussian_noise_([x], std=std, generator=secret_generator(insecure_seed=7))
    noise = (x - 2.0).double()
    ratio = (n - 1) * noise.var().item() / std**2
    assert stats.chi2.ppf(1e-6, n - 1) < ratio < stats.chi2.ppf(1 - 1e-6, n - 1)
    assert abs(noise.mean().item()) < 5 * std / n**0.5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes_draw_float32_then_cast(dtype):
    base = torch.linspace(-1, 1, 257, dtype=torch.float64).to(dtype)
    x = base.clone()
    add_gaussian_noise_([x], std=0.25, generator=secret_generator(insecure_seed=5))
    assert x.dtype == dtype
    draw = _draws(torch.Generator().manual_seed(5), 0.25, 257)
    if dtype == torch.float64:
        expected = base + draw.double()
    else:  # added in float32, rounded once
        expected = (base.float() + draw).to(dtype)
    assert torch.equal(x, expected)


def test_zero_std_is_a_no_op_and_bad_std_rejected():
    x = torch.ones(4)
    add_gaussian_noise_([x], std=0.0, generator=secret_generator())
    assert torch.equal(x, torch.ones(4))
    for bad in (-0.1, float("nan"), float("inf"), True):
        with pytest.raises(ConfigError, match="std"):
            add_gaussian_noise_([x], std=bad, generator=secret_generator())


def test_non_float_tensor_rejected_before_any_change():
    x, y = torch.zeros(3), torch.zeros(3, dtype=torch.int64)
    with pytest.raises(PrivacyError, match="dtype"):
        add_gaussian_noise_([x, y], std=1.0, generator=secret_generator())
    assert torch.equal(x, torch.zeros(3))


def test_generator_on_another_device_rejected_before_any_change():
    x = torch.zeros(3)
    fake_cuda_generator = types.SimpleNamespace(device=torch.device("cuda", 0))
    with pytest.raises(PrivacyError, match="device"):
        add_gaussian_noise_([x], std=1.0, generator=fake_cuda_generator)
    assert torch.equal(x, torch.zeros(3))


def test_parameters_requiring_grad_can_be_noised():
    p = torch.nn.Parameter(torch.zeros(6))
    add_gaussian_noise_([p], std=1.0, generator=secret_generator(insecure_seed=0))
    assert p.requires_grad and p.abs().sum() > 0


def test_insecure_seed_validation():
    for bad in (-1, 2**64, 1.5, True):
        with pytest.raises(ConfigError, match="insecure_seed"):
            secret_generator(insecure_seed=bad)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_noise_matches_cuda_generator():
    x = torch.zeros(1000, device="cuda")
    add_gaussian_noise_([x], std=2.0, generator=secret_generator("cuda", insecure_seed=9))
    oracle = torch.Generator(device="cuda").manual_seed(9)
    assert torch.equal(x, torch.empty(1000, device="cuda").normal_(0.0, 2.0, generator=oracle))
    with pytest.raises(PrivacyError, match="device"):
        add_gaussian_noise_([torch.zeros(2)], std=1.0, generator=secret_generator("cuda"))
