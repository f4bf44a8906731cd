"""Ways of running one trained model on 28 px tensors, side by side (not part of the test suite).

    python benchmarks/bench_inference.py RUN_DIR --data-dir ../shared/data [--bf16]

Batch 1024, 2 threads, the test split passed 3 times; median of 5 timed passes after a warm-up
pass (which also compiles). The bfloat16 ways are timed only on CPUs with native bfloat16
(emulated, they take many minutes), or with --bf16. Agreement is the share of argmax predictions
equal to float32 eager; the last column is the largest |logit difference| from it (the ONNX
parity figure). With the `export` extra installed, the run is also exported to ONNX (in a
temporary folder) and timed on onnxruntime (2 intra-op threads; pixels in, normalisation inside
the graph).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

import bloodcell
from bloodcell.datasets import bloodmnist
from bloodcell.errors import BloodcellError
from bloodcell.evaluation.provenance import stamp_line
from bloodcell.inference.network import normalize


def images_per_second(run: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, repeats: int = 5) -> float:
    run(images)
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(images)
        timings.append(time.perf_counter() - start)
    return len(images) / statistics.median(timings)


def main() -> None:
    print(stamp_line(), flush=True)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--data-dir")
    parser.add_argument("--bf16", action="store_true", help="time the bfloat16 ways even without native bfloat16")
    args = parser.parse_args()
    torch.set_num_threads(2)
    classifier = bloodcell.load(args.run_dir)
    mean, std = classifier.record.preprocessing.mean, classifier.record.preprocessing.std
    images = bloodmnist.load(args.data_dir).test.images.repeat(3, 1, 1, 1)
    example = torch.zeros(1024, 3, 28, 28).contiguous(memory_format=torch.channels_last)

    def runner(model, dtype=torch.float32, channels_last=True, autocast=False):
        memory_format = torch.channels_last if channels_last else torch.contiguous_format

        @torch.no_grad()
        def run(batch_of_images: torch.Tensor) -> torch.Tensor:
            out = []
            for start in range(0, len(batch_of_images), 1024):
                x = normalize(batch_of_images[start : start + 1024], mean, std).to(dtype)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                    out.append(model(x.contiguous(memory_format=memory_format)).float())
            return torch.cat(out)

        return run

    nchw = copy.deepcopy(classifier.model).to(memory_format=torch.contiguous_format)
    last = classifier.model
    with torch.no_grad():
        script = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(last, example)))
    ways = {
        "eager float32, NCHW": runner(nchw, channels_last=False),
        "eager float32, channels_last (bloodcell.load default)": runner(last),
        "TorchScript freeze, float32": runner(script),
        "torch.compile, float32, frozen weights": runner(torch.compile(last, options={"freezing": True})),
    }
    if args.bf16 or torch.ops.mkldnn._is_mkldnn_bf16_supported():
        bf16 = copy.deepcopy(last).to(torch.bfloat16)
        with torch.no_grad():
            script_bf16 = torch.jit.optimize_for_inference(
                torch.jit.freeze(torch.jit.trace(bf16, example.to(torch.bfloat16)))
            )
        ways |= {
            "eager, bfloat16 autocast": runner(last, autocast=True),
            "eager, bfloat16 weights": runner(bf16, torch.bfloat16),
            "TorchScript freeze, bfloat16": runner(script_bf16, torch.bfloat16),
            "torch.compile, bfloat16, frozen weights (precision=bfloat16, compile=True)": runner(
                torch.compile(copy.deepcopy(bf16), options={"freezing": True}), torch.bfloat16
            ),
        }
    else:
        print("(no bfloat16 rows: this CPU has no native bfloat16 (AVX512-BF16 or AMX); --bf16 times them anyway)")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            from bloodcell.inference.export import export_onnx
            from bloodcell.inference.network import OnnxNetwork

            path = Path(tmp) / "model.onnx"
            export_onnx(args.run_dir, path)
            onnx = OnnxNetwork(path, threads=2)
            ways["onnxruntime, float32 (backend='onnx')"] = lambda batch: onnx.logits(batch, batch_size=1024)
        except BloodcellError as exc:
            print(f"(no onnxruntime row: {exc})")
        _print_table(ways, images)


def _print_table(ways: dict[str, Callable[[torch.Tensor], torch.Tensor]], images: torch.Tensor) -> None:
    reference = ways["eager float32, channels_last (bloodcell.load default)"](images).float()
    print("| way | images/s | argmax agreement with float32 | max abs logit difference |")
    print("|---|---|---|---|")
    for name, run in ways.items():
        speed = images_per_second(run, images)
        logits = run(images).float()
        agreement = (logits.argmax(1) == reference.argmax(1)).float().mean().item()
        difference = (logits - reference).abs().max().item()
        print(f"| {name} | {speed:,.0f} | {agreement:.2%} | {difference:.1e} |", flush=True)


if __name__ == "__main__":
    main()
