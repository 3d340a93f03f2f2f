"""tokred.kernels' dequantize-matmul: the Triton kernels against bf16 torch.matmul and the torch reference, in one run.

CUDA: the linear layers of Qwen2.5-VL-7B's LLM (hidden 3584, intermediate 18944, 28 query / 4 kv heads of 128:
q/o 3584x3584, k/v 512x3584, gate/up 18944x3584, down 3584x18944) at a decode step (1 row: the GEMV path) and a
prefill (2048 rows: the GEMM path), each code width with a float16 scale and zero per `--group` weights. Each
size times x @ W.T for the bf16 weight (torch.matmul), the torch reference (dequantize, then a float32 matmul)
and the Triton kernel (through the public dispatcher), with triton.testing.do_bench (CUDA events, median after
warm-up, L2 flushed in between). Speed-ups are bf16 / triton and reference / triton; weight GB/s is the rate over
the quantized weight's bytes (codes, scales, zeros), which a decode step must read once. CPU: the torch reference
alone on one small shape, to show the script runs; timings need a GPU (the kernels need CUDA, and triton's CPU
interpreter is a correctness tool, tests/test_dequant_matmul.py).

    python benchmarks/weights_kernels.py [--quick] [--bits 2 3 4 8] [--group 64] [--out results/weights_kernels.md]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from tokred.kernels import dispatch
from tokred.kernels.dequant_matmul import GEMV_ROWS, dequant_matmul
from tokred.weights import WEIGHT_WIDTHS, quantize_weight

LAYERS = {"q/o": (3584, 3584), "k/v": (512, 3584), "gate/up": (18944, 3584), "down": (3584, 18944)}  # (out, in)
ROWS = (1, 2048)  # a decode step, a prefill
QUICK = ("q/o", "gate/up")
CPU_LAYER, CPU_ROWS = (256, 512), (1, 64)
# bf16 x on both sides: the reference multiplies the weight's levels in float32, the compiled GEMM rounds them to
# bf16 first, and the output is rounded to bf16 once
AGREES = 1e-2  # the largest relative (Frobenius) difference from the reference that counts as agreement


def cpu_ms(fn, repeats: int = 20) -> float:
    """Median wall time of fn() in ms, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def measure(name: str, shape: tuple[int, int], rows: int, bits: int, group: int, device: str) -> dict[str, Any]:
    """One layer, row count and width: the backends' agreement, and their median times."""
    g = torch.Generator(device).manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    weight = (0.02 * torch.randn(shape, generator=g, device=device)).to(dtype)
    x = torch.randn(rows, shape[1], generator=g, device=device, dtype=dtype)
    q = quantize_weight(weight, bits, group)
    row: dict[str, Any] = {"layer": name, "out": shape[0], "in": shape[1], "rows": rows, "bits": bits}
    row["path"] = "GEMV" if rows <= GEMV_ROWS else "GEMM"
    row["bits_per_value"] = q.bits_per_value
    dense = lambda: torch.matmul(x, weight.T)  # noqa: E731
    reference = lambda: dequant_matmul(x, q, backend="torch")  # noqa: E731
    want = reference().float()
    if device == "cpu":
        return row | {"dense_ms": cpu_ms(dense), "reference_ms": cpu_ms(reference)}
    from triton.testing import do_bench

    kernel = lambda: dequant_matmul(x, q, backend="triton")  # noqa: E731
    err = ((kernel().float() - want).norm() / want.norm()).item()
    row |= {"rel_err": err, "ok": err <= AGREES}
    row |= {key: do_bench(fn, return_mode="median") for key, fn in (("dense_ms", dense), ("reference_ms", reference))}
    row["triton_ms"] = do_bench(kernel, return_mode="median")
    row["weight_gb_s"] = q.nbytes / row["triton_ms"] / 1e6
    return row


def table(rows: list[dict[str, Any]], timed: bool) -> str:
    """The rows as a markdown table."""
    if timed:
        lines = [
            "| layer | out x in | rows | path | bits | bits/value | bf16 ms | reference ms | triton ms "
            "| vs bf16 | vs reference | weight GB/s | rel. err |",
            "|:---|:---|---:|:---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {r['layer']} | {r['out']}x{r['in']} | {r['rows']} | {r['path']} | {r['bits']} "
            f"| {r['bits_per_value']:.2f} | {r['dense_ms']:.3f} | {r['reference_ms']:.3f} | {r['triton_ms']:.3f} "
            f"| {r['dense_ms'] / r['triton_ms']:.2f}x | {r['reference_ms'] / r['triton_ms']:.1f}x "
            f"| {r['weight_gb_s']:,.0f} | {r['rel_err']:.1e} |"
            for r in rows
        ]
    else:
        lines = ["| out x in | rows | bits | bits/value | float32 matmul ms | reference ms |", "|:---|" + "---:|" * 5]
        lines += [
            f"| {r['out']}x{r['in']} | {r['rows']} | {r['bits']} | {r['bits_per_value']:.2f} | {r['dense_ms']:.3f} "
            f"| {r['reference_ms']:.3f} |"
            for r in rows
        ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"the {' and '.join(QUICK)} layers at 4 bits only")
    parser.add_argument("--bits", type=int, nargs="+", choices=WEIGHT_WIDTHS, default=list(WEIGHT_WIDTHS))
    parser.add_argument("--group", type=int, default=64, help="weights per float16 scale and zero (default 64)")
    parser.add_argument("--out", type=Path, default=Path("results/weights_kernels.md"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Measure every size, write the markdown report, print it; exit non-zero if the kernel disagrees."""
    args = parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and (dispatch.triton is None or dispatch.interpreting()):
        sys.exit("timing the kernels needs triton installed and TRITON_INTERPRET unset")
    if device == "cuda":
        layers = {name: LAYERS[name] for name in (QUICK if args.quick else LAYERS)}
        sizes = [(name, shape, rows) for name, shape in layers.items() for rows in ROWS]
        widths = [4] if args.quick else args.bits
    else:
        sizes, widths = [("cpu", CPU_LAYER, rows) for rows in CPU_ROWS], args.bits
    rows = []
    for (name, shape, count), bits in ((size, bits) for size in sizes for bits in widths):
        rows.append(measure(name, shape, count, bits, args.group, device))
        print(f"{name} {shape}, {count} rows, {bits} bits: {rows[-1]}", file=sys.stderr, flush=True)
    if device == "cuda":
        versions = f"torch {torch.__version__}, triton {dispatch.triton.__version__}"
        head = f"{torch.cuda.get_device_name()}, {versions}; bf16 x, group {args.group}, float16 scale and zero."
    else:
        head = (
            f"CPU, torch {torch.__version__}; float32, group {args.group}. The torch reference only: the Triton "
            "kernels need a GPU, and these times are not figures (they show the script runs)."
        )
    report = f"# dequant_matmul\n\n{head}\n\n{table(rows, timed=device == 'cuda')}\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(report)
    if not all(r.get("ok", True) for r in rows):
        sys.exit("the kernel disagrees with the torch reference")
    return rows


if __name__ == "__main__":
    main()
