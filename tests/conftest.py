"""Shared fixtures: tiny shards of real images, built once per test session."""

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CIFAR_TAR = SHARED_DATA / "cifar10-10k.tar"


@pytest.fixture(scope="session")
def cifar_shards(tmp_path_factory) -> Path:
    """256 real CIFAR-10 training images (32 px) in 4 shards with an index.json."""
    if not CIFAR_TAR.exists():
        pytest.skip(f"real data not found at {CIFAR_TAR} (see shared/data/README.md)")
    from vitcore.data.shards import write_shards

    out = tmp_path_factory.mktemp("cifar-shards")
    write_shards(str(CIFAR_TAR), out, split="train", limit=256, samples_per_shard=64, shuffle_seed=0, progress=False)
    return out
