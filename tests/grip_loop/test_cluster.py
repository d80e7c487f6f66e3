import numpy as np
import pytest

from grip_loop.cluster import assign, spherical_kmeans
from tests.conftest import unit_rows
from tests.devices import requires_faiss_gpu


def _blobs(seed, k=5, per=60, d=16):
    rng = np.random.default_rng(seed)
    centers = unit_rows(rng.normal(size=(k, d)))
    x = np.repeat(centers, per, axis=0) + 0.05 * rng.normal(size=(k * per, d))
    return unit_rows(x), np.repeat(np.arange(k), per)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recovers_separated_clusters_from_a_sample(seed):
    x, truth = _blobs(seed)
    centroids, labels = spherical_kmeans(x, 5, seed=seed, sample_size=150, nredo=5)
    assert np.allclose(np.linalg.norm(centroids, axis=1), 1, atol=1e-5)
    # same partition up to relabelling
    pairs = set(zip(truth.tolist(), labels.tolist(), strict=True))
    assert len(pairs) == 5 and len({p[1] for p in pairs}) == 5
    # labels are the naive argmax of inner products
    assert np.array_equal(labels, np.argmax(x @ centroids.T, axis=1))


def test_deterministic_for_a_seed_and_assign_streams_in_blocks():
    x, _ = _blobs(7)
    c1, l1 = spherical_kmeans(x, 4, seed=3)
    c2, l2 = spherical_kmeans(x, 4, seed=3)
    assert np.array_equal(c1, c2) and np.array_equal(l1, l2)
    assert np.array_equal(assign(x, c1, block=7), l1)


def test_k_larger_than_corpus_is_an_error():
    with pytest.raises(ValueError, match="k:"):
        spherical_kmeans(np.eye(3, dtype=np.float32), 4)


@pytest.mark.gpu
@requires_faiss_gpu
def test_gpu_assignment_matches_cpu():
    x, _ = _blobs(4)
    centroids, labels = spherical_kmeans(x, 5, seed=0, use_gpu=True)
    assert np.array_equal(labels, assign(x, centroids, use_gpu=False))
