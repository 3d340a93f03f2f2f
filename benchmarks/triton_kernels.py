"""tokred.kernels' last-query attention (FastV's score): the Triton kernel against the torch reference, in one run.

CUDA: Qwen2.5-VL-7B's attention shape (28 query heads, 4 kv heads, head dim 128), bf16, batches of 1-8
samples (half of them left-padded) with 1k-32k keys, scored from the last row as at FastV's prefill. Both
backends run through the public dispatcher and are timed with triton.testing.do_bench (median over CUDA-event
timed runs after warm-up, L2 flushed in between); speed-up = torch / triton, and key GB/s is the kernel's
rate over the keys it must read once. CPU: triton's interpreter on small shapes, a correctness check only.

    python benchmarks/triton_kernels.py [--quick] [--out results/kernels.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch  # imports no triton

# Without a GPU the kernels run in triton's CPU interpreter, which triton picks when it is first imported (here,
# through tokred), so the variable is set before that.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from tokred.kernels import dispatch, last_query_attention  # noqa: E402

HEADS, KV_HEADS, DIM, DTYPE = 28, 4, 128, torch.bfloat16
GPU_SIZES = [(batch, keys) for batch in (1, 4, 8) for keys in (1024, 4096, 16384, 32768)]
GPU_QUICK = [(1, 1024), (4, 4096)]
CPU_SIZES = [(1, 1), (2, 130), (3, 300)]
CPU_QUICK = [(2, 130)]
TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}  # tests/test_kernels.py's for bf16


def inputs(batch: int, keys: int, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """query, key (transformers' transposed views), last row and padding mask of a prefill FastV scores."""
    g = torch.Generator(device).manual_seed(0)
    query = torch.randn(batch, keys, HEADS, DIM, generator=g, device=device, dtype=DTYPE).transpose(1, 2)
    key = torch.randn(batch, keys, KV_HEADS, DIM, generator=g, device=device, dtype=DTYPE).transpose(1, 2)
    last = torch.full((batch,), keys - 1, device=device)
    valid = torch.ones(batch, keys, dtype=torch.bool, device=device)
    for b in range(1, batch, 2):
        valid[b, : keys // 8] = False  # left padding
    return query, key, last, valid


def measure(batch: int, keys: int, device: str) -> dict[str, Any]:
    """One size: the backends' agreement, and on CUDA their median times."""
    args = (*inputs(batch, keys, device), DIM**-0.5)
    want = last_query_attention(*args, backend="torch")
    got = last_query_attention(*args, backend="triton")
    row: dict[str, Any] = {
        "batch": batch,
        "keys": keys,
        "max_abs_err": (got - want).abs().max().item(),
        "ok": torch.allclose(got, want, **TOLERANCE),
    }
    if device == "cuda":
        from triton.testing import do_bench

        torch_ms = do_bench(lambda: last_query_attention(*args, backend="torch"), return_mode="median")
        triton_ms = do_bench(lambda: last_query_attention(*args, backend="triton"), return_mode="median")
        key_bytes = batch * KV_HEADS * keys * DIM * DTYPE.itemsize
        row |= {
            "torch_ms": torch_ms,
            "triton_ms": triton_ms,
            "speedup": torch_ms / triton_ms,
            "key_gb_s": key_bytes / triton_ms / 1e6,
        }
    return row


def table(rows: list[dict[str, Any]], timed: bool) -> str:
    """The rows as a markdown table."""
    if timed:
        lines = ["| batch | keys | torch ms | triton ms | speed-up | key GB/s | max abs err |", "|" + "---:|" * 7]
        lines += [
            f"| {r['batch']} | {r['keys']:,} | {r['torch_ms']:.3f} | {r['triton_ms']:.3f} | {r['speedup']:.2f}x"
            f" | {r['key_gb_s']:,.0f} | {r['max_abs_err']:.1e} |"
            for r in rows
        ]
    else:
        lines = ["| batch | keys | max abs err | agrees |", "|---:|---:|---:|:---|"]
        lines += [f"| {r['batch']} | {r['keys']:,} | {r['max_abs_err']:.1e} | {r['ok']} |" for r in rows]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="two sizes only")
    parser.add_argument("--out", type=Path, default=Path("results/kernels.json"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Measure every size, write the JSON report, print the table; exit non-zero if the backends disagree."""
    args = parse_args(argv)
    if dispatch.triton is None:
        sys.exit("triton is not installed: there is no kernel to compare")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and dispatch.interpreting():
        sys.exit("unset TRITON_INTERPRET to time the compiled kernel")
    if device == "cpu" and not dispatch.interpreting():  # triton was imported before this module could set it
        sys.exit("without a GPU the kernel needs TRITON_INTERPRET=1 set before triton's first import")
    sizes = {"cuda": GPU_QUICK if args.quick else GPU_SIZES, "cpu": CPU_QUICK if args.quick else CPU_SIZES}[device]
    rows = []
    for batch, keys in sizes:
        rows.append(measure(batch, keys, device))
        print(f"batch {batch}, {keys} keys: {rows[-1]}", file=sys.stderr, flush=True)
    report = {
        "op": "last_query_attention",
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (triton interpreter)",
        "torch": torch.__version__,
        "triton": dispatch.triton.__version__,
        "shape": {"heads": HEADS, "kv_heads": KV_HEADS, "dim": DIM, "dtype": str(DTYPE)},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{report['device']}, {HEADS} heads / {KV_HEADS} kv heads, head dim {DIM}, {DTYPE}\n")
    print(table(rows, timed=device == "cuda"))
    if device == "cpu":
        print("\nCPU: a correctness check through triton's interpreter; timings need a CUDA GPU.")
    if not all(r["ok"] for r in rows):
        sys.exit("the kernel disagrees with the torch reference")
    return report


if __name__ == "__main__":
    main()
