import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from prefixpo.logprobs import scored_token_logprobs


def plain_logprobs(hidden, weight, bias, targets, softcap=None, scale=None):
    """Textbook oracle: full logits, transform, log_softmax, pick the target."""
    logits = hidden @ weight.T + (bias if bias is not None else 0)
    if scale is not None:
        logits = logits * scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return F.log_softmax(logits, dim=-1)[torch.arange(len(targets)), targets]


@pytest.mark.parametrize("softcap, scale, with_bias", [(None, None, False), (30.0, None, False),
                                                       (None, 0.25, True), (5.0, 2.0, True)])
@pytest.mark.parametrize("chunk_size", [1, 3, 7, 100])
def test_matches_textbook_log_softmax_and_gradient(softcap, scale, with_bias, chunk_size):
    gen = torch.Generator().manual_seed(chunk_size)
    hidden = torch.randn(7, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    weight = torch.randn(11, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    bias = torch.randn(11, dtype=torch.float64, generator=gen, requires_grad=True) if with_bias else None
    targets = torch.randint(0, 11, (7,), generator=gen)
    got = scored_token_logprobs(hidden, weight, targets, bias=bias, softcap=softcap, scale=scale,
                                chunk_size=chunk_size)
    assert got.dtype == torch.float64
    want = plain_logprobs(hidden, weight, bias, targets, softcap, scale)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)

    inputs = (hidden, weight) + ((bias,) if with_bias else ())
    seed = torch.randn(7, dtype=torch.float64, generator=gen)
    got_grads = torch.autograd.grad((got.double() * seed).sum(), inputs)
    want_grads = torch.autograd.grad((want * seed).sum(), inputs)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_gradcheck_in_float64():
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(4, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    weight = torch.randn(6, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    targets = torch.randint(0, 6, (4,), generator=gen)
    from prefixpo.logprobs import _ScoredTokenLogprobs

    torch.autograd.gradcheck(lambda h, w: _ScoredTokenLogprobs.apply(h, w, None, targets, 2, 3.0, 0.5, False),
                             (hidden, weight))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_kernels_match_the_plain_path(dtype):
    """The compiled (fused) chunk kernels, used on the GPU, against the same math run op by op;
    compiled here on CPU, with a softcap and a scale, a ragged last chunk and a bias."""
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(37, 16, generator=gen).to(dtype).requires_grad_()
    weight = torch.randn(300, 16, generator=gen).to(dtype).requires_grad_()
    bias = torch.randn(300, generator=gen).to(dtype).requires_grad_()
    targets = torch.randint(0, 300, (37,), generator=gen)
    seed = torch.randn(37, generator=gen)
    results = []
    for fused in (False, True):
        logps = scored_token_logprobs(hidden, weight, targets, bias=bias, softcap=5.0, scale=0.7, chunk_size=16,
                                      fused=fused)
        results.append((logps, *torch.autograd.grad((logps * seed).sum(), (hidden, weight, bias))))
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, **tol)


def test_low_precision_weights_give_fp32_logprobs():
    weight = torch.randn(11, 5).bfloat16()
    got = scored_token_logprobs(torch.randn(4, 5).bfloat16(), weight, torch.tensor([0, 1, 2, 3]), chunk_size=3)
    assert got.dtype == torch.float32


def test_bad_chunk_size():
    with pytest.raises(ValueError, match="logps_chunk_size"):
        scored_token_logprobs(torch.zeros(2, 3), torch.zeros(4, 3), torch.zeros(2, dtype=torch.long), chunk_size=0)


def test_never_allocates_full_logits():
    """vocab 128k, 4096 scored tokens: one fp32 [4096 x 128k] tensor alone is 2 GiB. Forward and
    backward in chunks of 256 must stay far below that (measured as peak RSS in a fresh process)."""
    script = textwrap.dedent("""
        import resource, torch
        from prefixpo.logprobs import scored_token_logprobs
        torch.manual_seed(0)
        hidden = torch.randn(4096, 64, requires_grad=True)
        weight = (torch.randn(128256, 64) * 0.02).requires_grad_()
        targets = torch.randint(0, 128256, (4096,))
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        logps = scored_token_logprobs(hidden, weight, targets, chunk_size=256)
        logps.sum().backward()
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        assert torch.isfinite(hidden.grad).all() and torch.isfinite(weight.grad).all()
        print((after - before) / 1024)  # MiB
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    growth_mib = float(out.stdout.strip().splitlines()[-1])
    # weight.grad (32 MiB) plus a few [256 x 128k] fp32 chunk buffers (128 MiB each)
    assert growth_mib < 1024, f"peak memory grew by {growth_mib:.0f} MiB"


def test_response_sums_of_bf16_token_logprobs_are_fp32():
    """Token log-probs that arrive in bf16 (a wrapper's output cast) are summed in fp32: a bf16 sum
    of -7-nat tokens stops growing at -4096 (the spacing there is 32)."""
    from prefixpo.layout import Group, collate_groups
    from prefixpo.logprobs import reduce_per_response

    batch = collate_groups([Group([1], [[2] * 3000, [3] * 10])])
    tokens = torch.full((3010,), -7.0, dtype=torch.bfloat16)
    out = reduce_per_response(tokens, batch)
    assert out.sums.dtype == torch.float32
    assert out.sums.tolist() == [-21000.0, -70.0]  # exact: every partial sum is an fp32 integer
    in_bf16 = torch.zeros(1, dtype=torch.bfloat16).index_add(0, torch.zeros(3000, dtype=torch.long), tokens[:3000])
    assert in_bf16.item() > -4100  # what a bf16 accumulator gives
