"""CPU smoke test of the profiler benchmark (experiments/benchmarks/profile.py): its decoding-loop trace."""

import os

from experiments.benchmarks import profile


def test_record_traces_a_decoding_loop(tmp_path):
    """--decode STEPS: a jitted loop of one-token steps traced, named after the rule, impl, steps and unroll."""
    path = profile.record("eda", "recurrent", False, (2, 1, 2, 8, 8), "float32", str(tmp_path), decode=3)
    assert os.path.basename(path) == "eda-recurrent-decode3-unroll3.xplane.pb" and os.path.getsize(path) > 0
    rolled = profile.record("eda", "recurrent", False, (2, 1, 2, 8, 8), "float32", str(tmp_path), 3, 1)
    assert os.path.basename(rolled) == "eda-recurrent-decode3-unroll1.xplane.pb"
