"""One place that says which devices tests may use (after OLMo-core's testing utils)."""

from __future__ import annotations

import pytest

from grip_loop.devices import cuda_available, faiss_gpu_available, megablocks_available

requires_gpu = pytest.mark.skipif(not cuda_available(), reason="needs a CUDA GPU")
requires_faiss_gpu = pytest.mark.skipif(not faiss_gpu_available(), reason="needs faiss-gpu and a GPU")
requires_megablocks = pytest.mark.skipif(not megablocks_available(), reason="needs megablocks (CUDA only)")
