"""Training metrics: one writer for the console, a JSONL file and TensorBoard; model FLOPs utilisation.

Files in the work dir: `metrics.jsonl` (one JSON object per line: {"step": int, <name>: float | None, ...}; a
resumed run appends, so a step after the resumed checkpoint may appear twice: the later record is the run that
went on) and `tensorboard/` (scalars, `tensorboard --logdir <workdir>/tensorboard`).
"""

import json
import os

import tqdm

PEAK_BF16_FLOPS = {
    # device_kind substring (lower case) -> dense bf16 peak FLOP/s per device (vendor data sheets); the first
    # match counts, so a name that contains another comes before it ("l40s" before "l4")
    "h200": 989e12,  # also GH200
    "h100 pcie": 756e12,
    "h100": 989e12,
    "a100": 312e12,
    "l40s": 362e12,
    "l4": 121e12,
    "a10g": 70e12,
    "tpu v6": 918e12,
    "tpu v5p": 459e12,
    "tpu v5 lite": 197e12,
    "tpu v5e": 197e12,
    "tpu v5": 459e12,  # v5p reports "TPU v5"
    "tpu v4": 275e12,
}
"""Peak dense bf16 FLOP/s per device by device kind; MFU is measured against it (whatever the compute dtype)."""


def peak_flops(device_kind: str) -> float | None:
    """The dense bf16 peak FLOP/s of one device of `device_kind` (jax.Device.device_kind), or None where unknown
    (the CPU)."""
    kind = device_kind.lower()
    for name, flops in PEAK_BF16_FLOPS.items():
        if name in kind:
            return flops
    return None


def mfu(flops_per_token: float, tokens_per_second: float, device_kind: str, n_devices: int) -> float | None:
    """Model FLOPs utilisation in [0, 1]: achieved model FLOP/s over the devices' peak; None where the peak is not
    known."""
    peak = peak_flops(device_kind)
    return None if peak is None else flops_per_token * tokens_per_second / (peak * n_devices)


def _format(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, int):
        return str(value)
    return f"{value:.4g}"


class Writer:
    """Writes {name: number} records per step to the console, `<workdir>/metrics.jsonl` and TensorBoard.

    Only the writing process writes (pass `enabled=False` on the other hosts). Values that are None (e.g. MFU
    on the CPU) print as "n/a", are null in JSONL and are left out of TensorBoard; a NaN loss stays NaN.
    """

    def __init__(self, workdir: str, *, enabled: bool = True):
        self.enabled = enabled
        if not enabled:
            return
        from tensorboardX import SummaryWriter  # noqa: PLC0415  (heavy import, only on the writing process)

        path = os.path.join(workdir, "metrics.jsonl")
        _drop_partial_last_line(path)
        self._jsonl = open(path, "a")  # noqa: SIM115  (closed in close())
        self._tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: dict[str, float | None]):
        if not self.enabled:
            return
        metrics = {name: None if v is None else float(v) for name, v in metrics.items()}
        self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self._jsonl.flush()
        for name, value in metrics.items():
            if value is not None:
                self._tensorboard.add_scalar(name, value, step)
        self._tensorboard.flush()
        tqdm.tqdm.write(f"step {step}: " + ", ".join(f"{name} {_format(v)}" for name, v in metrics.items()))

    def close(self):
        if self.enabled:
            self._jsonl.close()
            self._tensorboard.close()


def _drop_partial_last_line(path: str):
    """Truncates `path` after its last newline: a run killed while writing a line leaves half of it."""
    if not os.path.exists(path):
        return
    with open(path, "rb+") as f:
        content = f.read()
        f.truncate(content.rfind(b"\n") + 1)


def read_jsonl(path: str) -> list[dict]:
    """The records of a metrics.jsonl file, in the order written."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
