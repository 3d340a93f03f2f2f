"""tokred.kernels: each Triton kernel against its torch reference, and the dispatcher's backend choice.

Kernels run compiled on a CUDA GPU, or on the CPU in triton's interpreter. Triton reads TRITON_INTERPRET once,
at its first import, so it cannot be switched inside a test: tests/conftest.py sets TRITON_INTERPRET=1 when
there is no GPU (unless it is already set), and tests that need the kernel to run skip when it cannot.
"""

from __future__ import annotations

import importlib.util
import sys
import textwrap
from types import ModuleType

import pytest
import torch
from conftest import compile_for_hopper

from tokred.kernels import dispatch, last_query
from tokred.kernels.last_query import (
    last_query_attention,
    last_query_attention_reference,
    last_query_attention_triton,
)

TOLERANCE = {torch.float32: {"rtol": 1e-5, "atol": 1e-6}, torch.bfloat16: {"rtol": 1e-4, "atol": 1e-5}}
TOLERANCE[torch.float16] = TOLERANCE[torch.bfloat16]
INTERPRETED = dispatch.interpreting()
KERNEL_DEVICE = "cpu" if INTERPRETED else "cuda"  # where the kernels run in this process, if anywhere
needs_triton = pytest.mark.skipif(dispatch.triton is None, reason="needs triton")
needs_kernel = pytest.mark.skipif(
    dispatch.triton is None or not (INTERPRETED or torch.cuda.is_available()),
    reason="needs triton, and a CUDA GPU or TRITON_INTERPRET=1 for its CPU interpreter, set before triton's first "
    "import (tests/conftest.py sets it without a GPU, unless TRITON_INTERPRET is already set, e.g. to 0)",
)
needs_cuda = pytest.mark.skipif(
    dispatch.triton is None or not torch.cuda.is_available() or INTERPRETED,
    reason="needs triton and a CUDA GPU, with TRITON_INTERPRET unset (the compiled kernels)",
)


def make_case(
    batch: int,
    heads: int,
    kv_heads: int,
    n: int,
    dim: int,
    dtype: torch.dtype = torch.float32,
    *,
    padded: bool = True,
    contiguous: bool = False,
    device: str = "cpu",
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """query, key, last, key_valid as the FastV stage sees them: left padding, `last` differing per sample."""
    g = torch.Generator().manual_seed(seed)
    # (B, N, H, D) transposed to (B, H, N, D), the views transformers' attention layers pass on
    query = (3 * torch.randn(batch, n, heads, dim, generator=g)).to(device, dtype).transpose(1, 2)
    key = torch.randn(batch, n, kv_heads, dim, generator=g).to(device, dtype).transpose(1, 2)
    if contiguous:
        query, key = query.contiguous(), key.contiguous()
    last = torch.randint(0, n, (batch,), generator=g)
    last[0] = n - 1
    valid = None
    if padded:
        valid = torch.ones(batch, n, dtype=torch.long)
        for b in range(1, batch):
            valid[b, : int(torch.randint(0, int(last[b]) + 1, (), generator=g))] = 0  # never past the query row
        valid = valid.to(device, torch.bool if seed % 2 else torch.long)
    return query, key, last.to(device), valid


CASES = [  # batch, heads, kv_heads, n, dim, dtype, key chunks, padded, contiguous
    (2, 4, 2, 37, 64, torch.float32, None, True, False),
    (3, 8, 1, 130, 80, torch.float32, 3, True, False),
    (2, 4, 4, 130, 64, torch.float32, None, False, True),
    (3, 4, 2, 1, 64, torch.float32, None, True, False),
    (2, 4, 2, 130, 64, torch.bfloat16, 2, True, False),
    (2, 8, 1, 37, 80, torch.bfloat16, None, True, True),
    (2, 2, 2, 130, 80, torch.float16, 5, False, False),
]


def case_id(case: tuple) -> str:
    """A readable test id for a CASES row."""
    batch, heads, kv_heads, n, dim, dtype, splits, padded, contiguous = case
    layout = ("padded-" if padded else "") + ("contiguous" if contiguous else "strided")
    return f"b{batch}-h{heads}-kv{kv_heads}-n{n}-d{dim}-{str(dtype)[6:]}-chunks{splits or 1}-{layout}"


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize(
    ("batch", "heads", "kv_heads", "n", "dim", "dtype", "splits", "padded", "contiguous"),
    CASES,
    ids=map(case_id, CASES),
)
@needs_kernel
def test_kernel_matches_reference(batch, heads, kv_heads, n, dim, dtype, splits, padded, contiguous, seed):
    """Interpreted on the CPU, compiled on a GPU."""
    query, key, last, valid = make_case(
        batch, heads, kv_heads, n, dim, dtype, padded=padded, contiguous=contiguous, device=KERNEL_DEVICE, seed=seed
    )
    got = last_query_attention_triton(query, key, last, valid, dim**-0.5, splits=splits)
    want = last_query_attention_reference(query, key, last, valid, dim**-0.5)
    torch.testing.assert_close(got, want, **TOLERANCE[dtype])
    assert torch.all(got[torch.arange(n, device=last.device)[None, :] > last[:, None]] == 0)


@needs_cuda
@pytest.mark.parametrize(
    ("batch", "heads", "kv_heads", "n", "dim", "dtype"),
    [(2, 28, 4, 4099, 128, torch.bfloat16), (3, 8, 1, 130, 80, torch.float16), (2, 4, 4, 1000, 64, torch.float32)],
)
def test_compiled_kernel_matches_reference(batch, heads, kv_heads, n, dim, dtype):
    query, key, last, valid = make_case(batch, heads, kv_heads, n, dim, dtype, device="cuda")
    assert dispatch.resolve("auto", query, key, last, valid) == "triton"
    got = last_query_attention(query, key, last, valid, dim**-0.5)
    want = last_query_attention_reference(query, key, last, valid, dim**-0.5)
    torch.testing.assert_close(got, want, **TOLERANCE[dtype])


# Run in a fresh process without TRITON_INTERPRET: there `@triton.jit` gives compilable kernels (and triton's own
# tl.max, tl.sum, ...), whichever mode this process's triton is in. The kernels' launches are recorded, not run.
COMPILE_FOR_HOPPER = textwrap.dedent(
    """
    import inspect
    from unittest import mock

    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import mangle_type

    from tokred.kernels import last_query

    kernels = {name: getattr(last_query, name) for name in ("_logits_kernel", "_normalize_kernel")}
    assert all(isinstance(kernel, triton.JITFunction) for kernel in kernels.values())
    query = torch.randn(2, 300, 28, 128, dtype=torch.bfloat16).transpose(1, 2)
    key = torch.randn(2, 300, 4, 128, dtype=torch.bfloat16).transpose(1, 2)
    last, valid = torch.tensor([299, 120]), torch.ones(2, 300, dtype=torch.bool)
    with mock.patch.multiple(last_query, **dict.fromkeys(kernels, mock.DEFAULT)) as launchers:
        last_query.last_query_attention_triton(query, key, last, valid, 128**-0.5)
    for name, kernel in kernels.items():
        args, meta = launchers[name].__getitem__.return_value.call_args  # kernel[grid](*args, **meta)
        names = [param for param in inspect.signature(kernel.fn).parameters if param not in meta]
        signature = dict(zip(names, map(mangle_type, args), strict=True)) | dict.fromkeys(meta, "constexpr")
        compiled = triton.compile(ASTSource(kernel, signature, meta), target=GPUTarget("cuda", 90, 32))
        assert compiled.asm["cubin"], name
        print(name, len(compiled.asm["cubin"]), "bytes of sm_90 cubin")
    """
)


@needs_triton
def test_kernels_compile_for_hopper():
    """The compiled path builds to an sm_90 binary without a GPU (triton ships ptxas), as launched for bf16 GQA."""
    assert compile_for_hopper(COMPILE_FOR_HOPPER).count("bytes of sm_90 cubin") == 2


@pytest.fixture
def kernel_calls(monkeypatch) -> list[int]:
    """Counts calls of the Triton path through the public dispatcher."""
    calls: list[int] = []

    def counted(*args, **kwargs):
        calls.append(1)
        return last_query_attention_triton(*args, **kwargs)

    monkeypatch.setattr(last_query, "last_query_attention_triton", counted)
    return calls


def test_auto_falls_back_to_reference_without_gpu_or_interpreter(monkeypatch, kernel_calls):
    monkeypatch.setattr(dispatch, "interpreting", lambda: False)  # as if triton had been imported without it
    query, key, last, valid = make_case(2, 4, 2, 37, 64)
    got = last_query_attention(query, key, last, valid, 0.125)
    assert torch.equal(got, last_query_attention_reference(query, key, last, valid, 0.125))
    assert kernel_calls == []


@needs_kernel
def test_auto_runs_kernel_where_it_can_and_torch_forces_reference(kernel_calls):
    query, key, last, valid = make_case(2, 4, 2, 37, 64, device=KERNEL_DEVICE)
    last_query_attention(query, key, last, valid, 0.125)
    assert kernel_calls == [1]
    last_query_attention(query, key, last, valid, 0.125, backend="torch")
    assert kernel_calls == [1]


def test_unknown_backend_raises():
    query, key, last, valid = make_case(1, 2, 2, 5, 16)
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        last_query_attention(query, key, last, valid, 0.25, backend="cuda")


@needs_triton
def test_forced_triton_without_gpu_or_interpreter_raises(monkeypatch):
    monkeypatch.setattr(dispatch, "interpreting", lambda: False)
    query, key, last, valid = make_case(1, 2, 2, 5, 16)
    with pytest.raises(RuntimeError, match="backend='triton' cannot run here: tensors on cpu.*TRITON_INTERPRET=1"):
        last_query_attention(query, key, last, valid, 0.25, backend="triton")


def _fresh(name: str) -> ModuleType:
    """A new copy of module `name`, executed now and not registered in sys.modules."""
    spec = importlib.util.find_spec(name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_imports_and_falls_back_without_triton(monkeypatch):
    for name in ("triton", "triton.language"):
        monkeypatch.setitem(sys.modules, name, None)  # `import triton` now raises ImportError
    fresh_dispatch = _fresh("tokred.kernels.dispatch")
    monkeypatch.setitem(sys.modules, "tokred.kernels.dispatch", fresh_dispatch)
    fresh = _fresh("tokred.kernels.last_query")
    assert fresh_dispatch.triton is None and not hasattr(fresh, "_logits_kernel")
    monkeypatch.setattr(fresh_dispatch, "interpreting", lambda: True)  # even where the interpreter is asked for
    query, key, last, valid = make_case(2, 4, 2, 37, 64)
    got = fresh.last_query_attention(query, key, last, valid, 0.125)
    assert torch.equal(got, last_query_attention_reference(query, key, last, valid, 0.125))
    with pytest.raises(RuntimeError, match="triton is not installed"):
        fresh.last_query_attention(query, key, last, valid, 0.125, backend="triton")


def test_rows_attention_is_each_rows_causal_softmax_averaged_over_heads():
    """The torch-only op SparseVLM's raters use, against one row at a time (grouped-query heads repeated)."""
    from tokred.kernels import rows_attention

    g = torch.Generator().manual_seed(5)
    query, key = torch.randn(2, 4, 9, 8, generator=g), torch.randn(2, 2, 9, 8, generator=g)
    valid = torch.ones(2, 9, dtype=torch.bool)
    valid[1, :3] = False  # left padding
    rows = torch.tensor([[8, 2, 5], [8, 6, -1]])
    got = rows_attention(query, key, rows, valid, 0.3)
    keys = key.repeat_interleave(2, dim=1)
    for b in range(2):
        for t, row in enumerate(rows[b].tolist()):
            if row < 0:
                assert not got[b, t].any()
                continue
            logits = (keys[b] @ query[b, :, row, :, None])[..., 0] * 0.3  # (H, N)
            logits[:, row + 1 :] = float("-inf")
            logits[:, ~valid[b]] = float("-inf")
            torch.testing.assert_close(got[b, t], logits.softmax(-1).mean(0))
