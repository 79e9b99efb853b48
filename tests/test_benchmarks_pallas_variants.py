"""CPU smoke test of experiments/benchmarks/pallas_variants.py (the Pallas kernels in interpret mode)."""

import json

from experiments.benchmarks import pallas_variants
from pallas_kernels import forms
from pallas_kernels.gpu import chunk_bwd, chunk_fwd


def test_variants_are_timed_with_their_memory_and_the_defaults_restored(tmp_path):
    """A forward and a forward + backward variant (the forward's chunk states kept; T = 80: two chunks of the
    kernels): one case each, with its time and XLA's compiled memory; the kernels' configurations are the defaults
    again afterwards."""
    out = tmp_path / "v.json"
    argv = ["--shape", "1", "80", "2", "16", "16", "--rules", "kda", "--variants", "bf16", "--dtype", "float32"]
    argv += ["--backward", "fwd", "kernels_recompute", "--repeats", "1", "--warmup", "1", "--input-sets", "1"]
    pallas_variants.main([*argv, "--out", str(out)])
    cases = json.loads(out.read_text())["cases"]
    assert [(c["rule"], c["variant"]) for c in cases] == [("kda", "bf16"), ("kda", "bf16/kernels_recompute")]
    assert all(c["median_ms"] > 0 and c["temp_bytes"] >= 0 and c["output_bytes"] > 0 for c in cases)
    assert chunk_fwd.DEFAULT_CONFIG == chunk_fwd.Config() and chunk_bwd.DEFAULT_CONFIG == chunk_bwd.Config()
    assert forms.BACKWARD_KERNELS["gpu"] is True
