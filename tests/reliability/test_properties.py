"""Property-based tests (hypothesis): the budget math and the manifest reader."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from grip_loop.budget import (
    _waterfill,
    allocate,
    apportion,
    baseline_budget,
    probe_allocation,
    replay_multiplier,
)
from grip_loop.manifest import SCHEMA_VERSION, ClusterInfo, Manifest, ManifestError, ShardInfo, load_manifest

SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

weight = st.floats(0, 1e6, allow_nan=False, allow_infinity=False)
weights = st.lists(weight, min_size=1, max_size=16)
sizes_st = st.lists(st.integers(0, 10_000), min_size=1, max_size=16)


# ------------------------------------------------------------------ apportion / allocate


@SETTINGS
@given(w=weights, total=st.integers(0, 10**7), data=st.data())
def test_apportion_is_exact_bounded_within_one_and_deterministic(w, total, data):
    k = len(w)
    lower = np.array(data.draw(st.lists(st.integers(0, 50), min_size=k, max_size=k)), float)
    extra = data.draw(st.lists(st.one_of(st.integers(0, 10**6), st.just(None)), min_size=k, max_size=k))
    upper = np.array([np.inf if e is None else lo + e for lo, e in zip(lower, extra, strict=True)])
    assume(lower.sum() <= total <= upper.sum())
    n = apportion(w, total, lower=lower, upper=upper)
    assert n.dtype == np.int64 and int(n.sum()) == total
    assert np.all(n >= lower) and np.all(n <= upper)
    target = _waterfill(np.asarray(w), total, lower, upper)
    assert np.all(np.abs(n - target) < 1 + 1e-6)
    assert np.array_equal(n, apportion(w, total, lower=lower, upper=upper))


@SETTINGS
@given(base=weights, data=st.data(), b=st.integers(0, 10**7))
def test_allocate_sums_exactly_and_gives_zero_base_nothing(base, data, b):
    k = len(base)
    r = np.array(data.draw(st.lists(st.floats(1, 3), min_size=k, max_size=k)))
    assume(sum(base) > 0)
    n = allocate(base, r, b)
    assert int(n.sum()) == b and np.all(n >= 0)
    assert np.all(n[np.asarray(base) == 0] == 0)
    u = np.asarray(base) * r
    assert np.all(np.abs(n - b * u / u.sum()) < 1 + 1e-6)  # the quota property


@SETTINGS
@given(base=weights, data=st.data(), b=st.integers(1, 10**6))
def test_allocate_is_monotone_in_one_clusters_replay(base, data, b):
    """Raising r_k alone never lowers n_k (Hamilton rounding has no population paradox when
    a single weight grows)."""
    k = len(base)
    r = np.array(data.draw(st.lists(st.floats(1, 3), min_size=k, max_size=k)))
    j = data.draw(st.integers(0, k - 1))
    bump = data.draw(st.floats(0, 2))
    assume(sum(base) > 0)
    r2 = r.copy()
    r2[j] += bump
    assert allocate(base, r2, b)[j] >= allocate(base, r, b)[j]


# ------------------------------------------------------------------ Eq. 4, 5, 7


@SETTINGS
@given(sizes=sizes_st, data=st.data())
def test_probe_allocation_invariants(sizes, data):
    k = len(sizes)
    sigma = data.draw(st.lists(st.floats(0, 2), min_size=k, max_size=k))
    b = data.draw(st.integers(0, sum(sizes)))
    n = probe_allocation(sizes, sigma, b)
    sizes = np.asarray(sizes)
    assert int(n.sum()) == b and np.all(n >= 0) and np.all(n <= sizes)
    if b >= np.count_nonzero(sizes):
        assert np.all(n[sizes > 0] >= 1)


@SETTINGS
@given(sizes=sizes_st, data=st.data(), b=st.floats(0, 1e9))
def test_baseline_budget_is_finite_sums_to_b_and_grows_with_quality(sizes, data, b):
    assume(sum(sizes) > 0)
    k = len(sizes)
    sigma = np.array(data.draw(st.lists(st.floats(0, 2), min_size=k, max_size=k)))
    q = np.array(data.draw(st.lists(st.floats(0, 1), min_size=k, max_size=k)))
    tau = data.draw(st.floats(0, 1))
    t = data.draw(st.floats(0.05, 10))
    n = baseline_budget(sizes, sigma, q, b, tau=tau, temperature=t)
    assert np.all(np.isfinite(n)) and np.all(n >= 0)
    assert n.sum() == pytest.approx(b, rel=1e-9, abs=1e-6)
    assert np.all(n[np.asarray(sizes) == 0] == 0)
    j = int(np.argmax(n))
    q2 = q.copy()
    q2[j] += 0.5
    # the same absolute slack as the sum above: a subnormal b (5e-324) underflows to 0 either way
    assert baseline_budget(sizes, sigma, q2, b, tau=tau, temperature=t)[j] >= n[j] * (1 - 1e-12) - 1e-6


delta_value = st.one_of(
    st.floats(-10, 10), st.just(float("nan")), st.just(float("inf")), st.just(-float("inf"))
)


@SETTINGS
@given(data=st.data(), k=st.integers(1, 16), alpha=st.floats(0, 10), th=st.floats(-1, 2))
def test_replay_multiplier_is_bounded_and_never_nan(data, k, alpha, th):
    delta = np.array(data.draw(st.lists(delta_value, min_size=k, max_size=k)))
    q = np.array(data.draw(st.lists(st.floats(0, 1), min_size=k, max_size=k)))
    r = replay_multiplier(delta, q, alpha=alpha, quality_threshold=th)
    assert np.all(np.isfinite(r))
    assert np.all(r >= 1) and np.all(r <= 1 + alpha + 1e-12)
    assert np.all(r[q <= th] == 1)
    assert np.array_equal(r, replay_multiplier(delta, q, alpha=alpha, quality_threshold=th))


# ------------------------------------------------------------------ the manifest reader

name = st.text("abcdefghij0123456789-_", min_size=1, max_size=8)


@st.composite
def manifests(draw):
    orders = draw(
        st.lists(st.sampled_from(["grip", "diversity", "random"]), min_size=1, max_size=3, unique=True)
    )
    k = draw(st.integers(1, 5))
    clusters = []
    for c in range(k):
        shards = {}
        counts = draw(st.lists(st.integers(0, 50), min_size=1, max_size=3))
        for o in orders:
            shards[o] = [ShardInfo(f"shards/{o}/c{c}/s{i}.tar", n, 3 * n) for i, n in enumerate(counts)]
        clusters.append(
            ClusterInfo(
                id=c,
                n_docs=sum(counts),
                n_tokens=3 * sum(counts),
                mean_length=3.0,
                sigma=draw(st.floats(0, 2)),
                quality=draw(st.floats(0, 1)),
                quality_scores={"syntax": draw(st.floats(0, 10))},
                probe_ids=draw(st.lists(name, max_size=3)),
                probe_shards=[ShardInfo(f"probe/c{c}.tar", 1, 3)],
                shards=shards,
                examples=draw(st.lists(name, max_size=2)),
            )
        )
    vocab = draw(st.integers(1, 1 << 17))
    return Manifest(
        schema_version=SCHEMA_VERSION,
        corpus_fingerprint=draw(name),
        tokenizer={
            "vocab_size": vocab,
            "eos_id": 0,
            "token_dtype": "uint16" if vocab <= 1 << 16 else "uint32",
        },
        encoder={"name": draw(name)},
        k=k,
        seed=draw(st.integers(0, 2**31)),
        orders=orders,
        clusters=clusters,
        config={"k": k},
        stats={"n_docs": sum(c.n_docs for c in clusters)},
    )


def _touch_files(root, m: Manifest) -> None:
    for c in m.clusters:
        for s in [s for ss in c.shards.values() for s in ss] + c.probe_shards:
            p = root / s.path
            p.parent.mkdir(parents=True, exist_ok=True)
            p.touch()


@SETTINGS
@given(m=manifests())
def test_valid_manifests_round_trip(tmp_path_factory, m):
    root = tmp_path_factory.mktemp("m")
    _touch_files(root, m)
    m.save(root)
    assert load_manifest(root) == m


json_value = st.recursive(
    st.one_of(
        st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(allow_nan=True), st.text(max_size=5)
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for key, v in obj.items():
            yield from _paths(v, (*prefix, key))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, (*prefix, i))


@SETTINGS
@given(m=manifests(), data=st.data())
def test_corrupted_manifest_json_raises_manifest_error_only(tmp_path_factory, m, data):
    """Replace any value, delete any key, or cut the text anywhere: the reader either accepts
    the result (when it is still a consistent manifest) or raises ManifestError, never
    another exception type."""
    root = tmp_path_factory.mktemp("m")
    _touch_files(root, m)
    d = m.to_dict()
    kind = data.draw(st.sampled_from(["replace", "delete", "truncate"]))
    if kind == "truncate":
        text = json.dumps(d)
        text = text[: data.draw(st.integers(0, len(text) - 1))]
    else:
        paths = [p for p in _paths(d) if p]
        path = data.draw(st.sampled_from(paths))
        parent = d
        for key in path[:-1]:
            parent = parent[key]
        if kind == "replace":
            parent[path[-1]] = data.draw(json_value)
        else:
            del parent[path[-1]]
        text = json.dumps(d)
    (root / "manifest.json").write_text(text)
    try:
        back = load_manifest(root)
    except ManifestError as exc:
        assert "manifest.json" in str(exc) or "shard" in str(exc)
        return
    # accepted: then it is internally consistent
    assert back.k == len(back.clusters)
    for c in back.clusters:
        for o in back.orders:
            assert sum(s.n_docs for s in c.shards[o]) == c.n_docs
