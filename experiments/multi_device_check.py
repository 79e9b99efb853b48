"""Data x fsdp check: the training job on one device and on meshes of two devices gives the same loss curve.

    python -m experiments.multi_device_check                                   # configs/default.py, 50 steps
    python -m experiments.multi_device_check --steps 50 --tolerance 2e-2 -- \\
        --config=configs/lm_125m.py:eda --config.data.bytes.path=edarnn \\
        --config.data.bytes.eval_fraction=0.3                                    # the 125M model, 2 GPUs
    XLA_FLAGS=--xla_force_host_platform_device_count=2 JAX_PLATFORMS=cpu python -m experiments.multi_device_check

Runs `python -m edarnn.train` (the arguments after `--` go to it: config file and overrides) three times from the
same seed, hence the same parameters and the same batches, for --steps steps with the loss logged at every step:
  1 device     CUDA_VISIBLE_DEVICES=0 and --xla_force_host_platform_device_count=1 (the first device only)
  fsdp=2       mesh data=1, fsdp=2, tensor=1 (parameters and optimizer state sharded over both devices)
  data=2       mesh data=2, fsdp=1, tensor=1 (parameters replicated)
The two-device runs need two devices (two GPUs, or two simulated CPU devices as above). For each, it prints the
largest relative difference of its per-step training loss from the one-device run's, |a - b| / |b|, and exits
with status 1 if one exceeds --tolerance (float32 compute agrees to rounding; bf16 drifts more). Writes the
curves and differences as JSON to --out.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from edarnn import metrics

ROOT = Path(__file__).resolve().parents[1]
MESHES = {  # run name -> (mesh overrides, devices it needs)
    "1 device": ({"data": 1, "fsdp": 1, "tensor": 1}, 1),
    "fsdp=2": ({"data": 1, "fsdp": 2, "tensor": 1}, 2),
    "data=2": ({"data": 2, "fsdp": 1, "tensor": 1}, 2),
}


def environment(devices: int) -> dict[str, str]:
    """The environment of a run on `devices` devices: with one device only the first GPU (or one CPU device)."""
    env = dict(os.environ)
    if devices == 1:
        env["CUDA_VISIBLE_DEVICES"] = "0"
        flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
        env["XLA_FLAGS"] = " ".join([*flags, "--xla_force_host_platform_device_count=1"])
    return env


def run(name: str, workdir: Path, steps: int, train_args: list[str]) -> list[float]:
    """One training run of `steps` steps on MESHES[name]; its training loss at every step."""
    mesh, devices = MESHES[name]
    command = [
        sys.executable,
        "-m",
        "edarnn.train",
        *train_args,
        f"--workdir={workdir}",
        f"--config.train.steps={steps}",
        "--config.train.warmup_steps=0",
        "--config.train.log_every=1",
        "--config.train.eval_every=0",
        "--config.train.eval_batches=1",
        "--config.train.checkpoint_every=0",
        "--config.train.keep_best=",
        *(f"--config.mesh.{axis}={size}" for axis, size in mesh.items()),
    ]
    result = subprocess.run(command, cwd=ROOT, env=environment(devices), capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{name}: `{' '.join(command)}` failed:\n{(result.stdout + result.stderr)[-3000:]}")
    losses = {r["step"]: r["loss"] for r in metrics.read_jsonl(workdir / "metrics.jsonl") if "loss" in r}
    if sorted(losses) != list(range(1, steps + 1)):
        raise RuntimeError(f"{name}: logged steps {sorted(losses)}, expected 1..{steps}")
    return [losses[step] for step in range(1, steps + 1)]


def max_relative_difference(losses: list[float], reference: list[float]) -> float:
    return max(abs(a - b) / max(abs(b), 1e-30) for a, b in zip(losses, reference, strict=True))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--tolerance", type=float, default=1e-3, help="largest allowed relative loss difference")
    p.add_argument("--workdir", default=None, help="where the runs write (default: a temporary directory)")
    p.add_argument("--out", default="multi_device_check.json")
    p.add_argument("train_args", nargs="*", help="after --: arguments of edarnn.train (--config=..., overrides)")
    args = p.parse_args(argv)
    if args.steps < 1 or args.tolerance < 0:
        p.error("--steps must be positive and --tolerance >= 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        workdir = Path(args.workdir or scratch)
        curves = {}
        for i, name in enumerate(MESHES):
            curves[name] = run(name, workdir / f"run{i}", args.steps, args.train_args)
            print(f"{name:9} losses: first {curves[name][0]:.6g}, last {curves[name][-1]:.6g}", flush=True)
    reference = curves["1 device"]
    differences = {name: max_relative_difference(c, reference) for name, c in curves.items() if c is not reference}
    failed = [name for name, d in differences.items() if not d <= args.tolerance]
    for name, difference in differences.items():
        verdict = "FAILED" if name in failed else "ok"
        print(f"{name:9} vs 1 device: max relative loss difference {difference:.3e} ({verdict}, <= {args.tolerance:g})")
    report = {"steps": args.steps, "train_args": args.train_args, "tolerance": args.tolerance, "losses": curves,
              "max_relative_difference": differences, "passed": not failed}  # fmt: skip
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
