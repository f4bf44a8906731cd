"""Where a training step's time goes on this CPU, and what changes it (not part of the test suite).

    python benchmarks/bench_step.py --data-dir ../shared/data [--preset default] [--steps 30]
                                    [--models res-small-relu res-tiny ...] [--profile]
    python benchmarks/bench_step.py --data-dir DIR --recipes res28 lite64 ... [--steps 30]

Times one training step of the preset (augmentation, forward, backward, optimiser) on real
training batches, side by side in one process, median of `--steps` steps after 5 warm-up steps:
the preset as it trains, then one change at a time: NCHW instead of channels_last, batch 128 and
512 (per image), 1 thread, torch.compile, the recipe with each architecture named in `--models`
(for example `res-small-relu`, ReLU instead of GELU, or the narrower `res-tiny`), and the
augmentation alone. Prints the CPU model and
the instruction set PyTorch uses; run it again with ONEDNN_MAX_CPU_ISA=AVX2 on an AVX-512 CPU to
see what CPUs without AVX-512 get. `--profile` adds the share of CPU time per part of the step
(convolutions forward and backward, batch norm, activations, pooling, the rest), from torch.profiler,
and the rate the convolutions reach in GFLOP/s (their floating-point operations per step, counted
by torch.utils.flop_counter, over their profiled time): when that is close to what the CPU's
vector units can do, only a recipe with less arithmetic trains faster.

`--recipes` instead times the multi-lab recipes of `leave_one_lab_out.py` side by side (their
batches, image sizes and pretrained starts), and what a whole run of each costs on this CPU. DIR
holds the BloodMNIST files of their sizes.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

from bloodcell import models
from bloodcell.datasets import bloodmnist
from bloodcell.evaluation.provenance import stamp_line
from bloodcell.training.augment import augment_batch
from bloodcell.training.loop import build_model, make_optimizer, normalization
from bloodcell.training.recipe import PRESETS


def training_step(config, train, compile_model: bool = False, augment_only: bool = False):
    """One training step of `config` on a batch drawn from `train`, as a function to call repeatedly."""
    torch.manual_seed(0)
    model = build_model(config, train.images.shape[-1]).train()
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    forward = torch.compile(model) if compile_model else model
    optimizer = make_optimizer(model, config)
    mean, std, target = normalization(config, train)
    generator = torch.Generator().manual_seed(0)

    def step() -> None:
        index = torch.randint(len(train), (config.batch_size,), generator=generator)
        x = augment_batch(train.images[index], mean, std, config.augment, generator, target)
        if augment_only:
            return
        if config.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        loss = F.cross_entropy(forward(x), train.labels[index], label_smoothing=config.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def time_steps(config, train, steps: int, compile_model: bool = False, augment_only: bool = False) -> float:
    """Median seconds per step for `config` on batches drawn from `train`."""
    step = training_step(config, train, compile_model, augment_only)
    timings = []
    for i in range(steps + 5):
        start = time.perf_counter()
        step()
        if i >= 5:
            timings.append(time.perf_counter() - start)
    return statistics.median(timings)


# operator name -> the part of the step it belongs to (first match wins)
OPERATOR_GROUPS = {
    "convolution_backward": "convolutions, backward",
    "convolution": "convolutions, forward",
    "batch_norm": "batch norm, forward and backward",
    "gelu": "GELU, forward and backward",
    "max_pool": "max pooling, forward and backward",
    "fill_": "zero-filling buffers",
}


def convolution_flops(config, train) -> float:
    """Floating-point operations of one step's convolutions, forward and backward."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build_model(config, train.images.shape[-1]).train()
    x = torch.zeros(config.batch_size, 3, *train.images.shape[-2:])
    if config.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), train.labels[: config.batch_size]).backward()
    counts = counter.get_flop_counts()["Global"]
    return float(sum(n for op, n in counts.items() if "convolution" in str(op)))


def matmul_gflops(size: int = 2048, repeats: int = 10) -> float:
    """GFLOP/s of a large float32 matrix product: about the most this CPU's vector units give PyTorch."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    timings = []
    for _ in range(repeats + 2):
        start = time.perf_counter()
        torch.mm(a, b)
        timings.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(timings[2:]) / 1e9


def profile_steps(config, train, steps: int) -> dict[str, float]:
    """Share of the step's CPU time per part (torch.profiler, self time of each operator)."""
    from torch.profiler import ProfilerActivity, profile

    step = training_step(config, train)
    for _ in range(5):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        for _ in range(steps):
            step()
    shares: dict[str, float] = {}
    events = [e for e in profiler.key_averages() if e.key.startswith("aten::")]
    total = sum(e.self_cpu_time_total for e in events)
    for event in events:
        name = event.key.removeprefix("aten::")
        group = next((g for k, g in OPERATOR_GROUPS.items() if k in name), "everything else")
        shares[group] = shares.get(group, 0.0) + event.self_cpu_time_total / total
    return dict(sorted(shares.items(), key=lambda item: -item[1]))


def main() -> None:
    print(stamp_line(), flush=True)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir")
    parser.add_argument("--preset", default="default", choices=list(PRESETS))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--models", nargs="+", default=[], choices=models.names(), help="also time these architectures in the recipe"
    )
    parser.add_argument("--profile", action="store_true", help="also print where the step's time goes, per operator")
    parser.add_argument("--recipes", nargs="+", help="time these multi-lab recipes of leave_one_lab_out.py instead")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.recipes:
        return time_recipes(args)
    config = PRESETS[args.preset]
    train = bloodmnist.load(args.data_dir, size=config.image_size).train
    print(f"preset {args.preset} ({config.model})")
    steps_per_run = -(-len(train) // config.batch_size) * config.epochs
    variants = {
        "as trained (channels_last)": lambda: time_steps(config, train, args.steps),
        "NCHW": lambda: time_steps(replace(config, channels_last=False), train, args.steps),
        "batch 128": lambda: 2 * time_steps(replace(config, batch_size=128), train, args.steps),
        "batch 512": lambda: time_steps(replace(config, batch_size=512), train, args.steps) / 2,
        "torch.compile": lambda: time_steps(config, train, args.steps, compile_model=True),
    }
    for name in args.models:
        variants[f"model {name}"] = lambda name=name: time_steps(replace(config, model=name), train, args.steps)
    variants["augmentation alone"] = lambda: time_steps(config, train, args.steps, augment_only=True)
    results = {}
    for name, run in variants.items():
        results[name] = run()
        print(f"  {name}: {results[name]:.3f} s per {config.batch_size} images", flush=True)
    torch.set_num_threads(1)
    results["1 thread"] = time_steps(config, train, args.steps)
    torch.set_num_threads(args.threads)
    base = results["as trained (channels_last)"]
    print()
    print(f"| variant | s per {config.batch_size} images | vs as trained | {args.preset} run ({steps_per_run} steps) |")
    print("|---|---|---|---|")
    for name, seconds in results.items():
        print(f"| {name} | {seconds:.3f} | {seconds / base:.2f}x | {seconds * steps_per_run / 60:.1f} min |")
    if args.profile:
        print(f"\n| part of a step (as trained, {args.steps} steps profiled) | share of CPU time |\n|---|---|")
        shares = profile_steps(config, train, args.steps)
        for group, share in shares.items():
            print(f"| {group} | {share:.0%} |")
        flops = convolution_flops(config, train)
        convolution_seconds = base * (shares.get("convolutions, forward", 0) + shares.get("convolutions, backward", 0))
        print(
            f"\nConvolutions: {flops / 1e9:.1f} GFLOP per step (forward and backward) in about "
            f"{convolution_seconds:.3f} s of the {base:.3f} s step: {flops / 1e9 / convolution_seconds:.0f} GFLOP/s "
            f"on {args.threads} threads; a 2048x2048 matrix product reaches {matmul_gflops():.0f} GFLOP/s"
        )


def time_recipes(args) -> None:
    """One step of each multi-lab recipe, and a whole run's cost (an epoch: one pass over BloodMNIST's
    share of the batches)."""
    try:
        from leave_one_lab_out import VARIANTS
    except ImportError:  # run from another folder
        from benchmarks.leave_one_lab_out import VARIANTS
    from bloodcell.training import sampling

    print("| recipe | model | px | s per step | images per step | ms per image | steps per run | run (min) |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.recipes:
        config = VARIANTS[name]
        train = bloodmnist.load(args.data_dir, size=config.image_size).train
        seconds = time_steps(config, train, args.steps)
        first = sampling.per_batch(sampling.shares(2, config.lab_share, True), config.batch_size)[0]
        steps = -(-len(train) // first) * config.epochs
        per_image = 1000 * seconds / config.batch_size
        print(f"| {name} | {config.model} | {config.image_size} | {seconds:.3f} | {config.batch_size} | "
              f"{per_image:.2f} | {steps} | {seconds * steps / 60:.1f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
