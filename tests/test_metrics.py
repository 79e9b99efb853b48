"""edarnn.metrics: the JSONL and TensorBoard writer, MFU."""

import math
import struct

import pytest
from tensorboardX.proto import event_pb2

from edarnn import metrics


def _tensorboard_scalars(directory) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} from the event files under `directory` (TFRecord framing: length u64, its crc
    u32, the Event proto, its crc u32)."""
    scalars = {}
    for path in sorted(directory.iterdir()):
        content, offset = path.read_bytes(), 0
        while offset < len(content):
            (length,) = struct.unpack("<Q", content[offset : offset + 8])
            event = event_pb2.Event.FromString(content[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_writer(tmp_path, capsys):
    writer = metrics.Writer(str(tmp_path))
    writer.write(10, {"loss": 2.5, "mfu": None})
    writer.write(20, {"loss": 1.25, "mfu": 0.5, "eval_accuracy": 0.75})
    writer.close()

    assert metrics.read_jsonl(tmp_path / "metrics.jsonl") == [
        {"step": 10, "loss": 2.5, "mfu": None},
        {"step": 20, "loss": 1.25, "mfu": 0.5, "eval_accuracy": 0.75},
    ]
    assert _tensorboard_scalars(tmp_path / "tensorboard") == {
        "loss": [(10, 2.5), (20, 1.25)],
        "mfu": [(20, 0.5)],
        "eval_accuracy": [(20, 0.75)],
    }
    console = capsys.readouterr().out
    assert "step 10: loss 2.5, mfu n/a" in console
    assert "step 20: loss 1.25, mfu 0.5, eval_accuracy 0.75" in console


def test_writer_appends_after_a_cut_line(tmp_path):
    """A resumed run appends; half a line left by a killed run is dropped first."""
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "lo')
    writer = metrics.Writer(str(tmp_path))
    writer.write(2, {"loss": float("nan")})
    writer.close()
    records = metrics.read_jsonl(tmp_path / "metrics.jsonl")
    assert records[0] == {"step": 1, "loss": 3.0}
    assert records[1]["step"] == 2 and math.isnan(records[1]["loss"])  # a diverged loss stays visible
    assert len(records) == 2


def test_disabled_writer_writes_nothing(tmp_path):
    writer = metrics.Writer(str(tmp_path), enabled=False)
    writer.write(1, {"loss": 1.0})
    writer.close()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("device_kind", "peak"),
    [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H200", 989e12), ("TPU v5 lite", 197e12), ("cpu", None)],
)
def test_peak_flops(device_kind, peak):
    assert metrics.peak_flops(device_kind) == peak


def test_mfu():
    # 1e9 FLOPs per token at 1e5 tokens/s on 2 H100s: 1e14 / (2 * 989e12)
    assert metrics.mfu(1e9, 1e5, "NVIDIA H100 80GB HBM3", 2) == pytest.approx(1e14 / (2 * 989e12))
    assert metrics.mfu(1e9, 1e5, "cpu", 1) is None
