"""Shared fixtures. Everything runs offline on stand-ins built here, through the real loading code.

huggingface_hub reads HF_HOME and HF_HUB_OFFLINE when it is imported, so they are set at the top of this file,
before any test imports it; each test run gets its own throw-away cache.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

_SESSION = Path(tempfile.mkdtemp(prefix="cliplens-tests-"))
atexit.register(shutil.rmtree, _SESSION, ignore_errors=True)
os.environ["HF_HOME"] = str(_SESSION / "hf")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["CLIPLENS_HOME"] = str(_SESSION / "home")
os.environ.pop("CLIPLENS_INDEX_DIR", None)
# Indexing runs keep the torch image tower, so a cache one test's run leaves cannot change what another test
# measures; tests/unit/test_imageonly.py and tests/integration/test_imageonly_cli.py turn the torch-free one on.
os.environ["CLIPLENS_IMAGE_ONLY"] = "0"

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import cifar_fixture  # noqa: E402
import model_fixture  # noqa: E402
from pg_fixture import pg_dsn, pg_server  # noqa: E402,F401  (a real PostgreSQL + pgvector, started once)

HF_HOME = Path(os.environ["HF_HOME"])


@pytest.fixture(scope="session")
def tiny_model() -> str:
    """Model name of a tiny random CLIP in the hub cache (hf-hub:cliplens-test/tiny-clip)."""
    return model_fixture.write_tiny_model(HF_HOME)


@pytest.fixture(scope="session")
def tiny_encoder(tiny_model):
    from cliplens.encoder import load_encoder

    return load_encoder(tiny_model, device="cpu")


@pytest.fixture(scope="session")
def b32_weights() -> Path:
    """Random weights for the real ViT-B-32-quickgelu, where open_clip looks for the ``openai`` tag."""
    return model_fixture.write_openai_b32(HF_HOME)


@pytest.fixture(scope="session")
def b32_encoder(b32_weights):
    from cliplens.encoder import load_encoder

    return load_encoder("ViT-B-32-quickgelu", "openai", device="cpu")


@pytest.fixture(scope="session")
def cifar_root(tmp_path_factory) -> Path:
    """A folder holding a CIFAR-100-format archive and extracted folder (2 test, 5 train images per class)."""
    root = tmp_path_factory.mktemp("cifar")
    cifar_fixture.make_cifar100(root, per_class_test=2, per_class_train=5, seed=0, archive=True, folder=True)
    return root


@pytest.fixture(scope="session")
def cifar_test(cifar_root):
    from cliplens.sources import load_cifar

    return load_cifar("cifar100", "test", data_dir=cifar_root, verify=False, progress=False)


@pytest.fixture(scope="session")
def tiny_index(tmp_path_factory, cifar_test, tiny_encoder) -> Path:
    """A complete index of the fixture's CIFAR-100 test split with the tiny model (read-only for tests)."""
    from cliplens.embed import index_labeled

    out = tmp_path_factory.mktemp("index") / "cifar100-test"
    index_labeled(cifar_test, tiny_encoder, out, batch_size=32, progress=False)
    return out


@pytest.fixture(scope="session")
def train_index(tmp_path_factory, cifar_root, tiny_encoder) -> Path:
    """The fixture's CIFAR-100 train split (5 images per class) indexed with the tiny model (read-only for tests)."""
    from cliplens.sources import load_cifar
    from cliplens.embed import index_labeled

    out = tmp_path_factory.mktemp("train") / "cifar100-train"
    data = load_cifar("cifar100", "train", data_dir=cifar_root, verify=False, progress=False)
    index_labeled(data, tiny_encoder, out, batch_size=100, progress=False)
    return out


@pytest.fixture
def rng():
    return np.random.default_rng(0)


CHROMIUM = "/usr/bin/chromium"  # Debian's; Playwright's own browser download is impossible offline


@pytest.fixture(scope="session")
def playwright_api():
    """Playwright's sync API, driving Debian's Chromium.

    A developer machine without them skips the browser tests and says what to install; in CI (CI=true, where
    .ci/run installs both) their absence fails the run instead, so a skip can never hide a broken page there.
    """
    missing = []
    try:
        from playwright import sync_api
    except ImportError:
        missing.append("pip install playwright")
    if not Path(CHROMIUM).is_file():
        missing.append("apt-get install chromium")
    if missing:
        message = f"browser tests need: {'; '.join(missing)}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return sync_api


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs, for a full disk (mounting needs root: the tests run as root in this project's containers and
    CI). Where it cannot be mounted the test is skipped; each such test has an injected-failure twin covering the
    same clean-up paths (test_index_safety.py, tests/hostile/test_imageonly_cache.py)."""
    import subprocess

    where = tmp_path / "small"
    where.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(where)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip()[:80]}): its injected-failure twin "
                    "covers the same paths")
    yield where
    subprocess.run(["umount", str(where)], check=False)
