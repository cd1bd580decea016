"""Benchmark tests: one tiny model's generation service shared by every benchmark's fixture."""

import pytest


@pytest.fixture(scope="session")
def bench_service(tiny_shapes_export):
  from lvlm_jax.generate import generation_service
  from lvlm_jax.models import hf
  return generation_service(tiny_shapes_export, hf.load_model(tiny_shapes_export), batch_size=4,
                            pad_to=16)

