"""Pallas kernels behind `edarnn.rules`' impl="pallas": GPU (Triton lowering) in gpu/, TPU to come in tpu/."""
