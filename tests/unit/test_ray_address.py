"""An unreachable ``ray://`` address fails in seconds with one line, not after Ray Client's 30 s of retries.

Nothing here starts Ray: the TCP check runs before ``ray.init`` (and, on the command line, before the data set
and the model are loaded).
"""

from __future__ import annotations

import socket
import time

import pytest

from cliplens.distributed import RayOptions, check_ray_address, connect_ray
from cliplens.errors import EngineError


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: nobody listens on it


def test_closed_port_fails_fast_with_one_line():
    address = f"ray://127.0.0.1:{_closed_port()}"
    t0 = time.perf_counter()
    with pytest.raises(EngineError, match=f"cannot reach the Ray cluster at {address}") as info:
        check_ray_address(address, timeout=2.0)
    assert time.perf_counter() - t0 < 5
    message = str(info.value)
    assert "\n" not in message and "ray start --head" in message and "Ray address" in message
    assert "--" not in message.split("ray start")[0] and info.value.fix == {"ray_address": None}  # data, not flags
    from cliplens.cli.common import word_error

    assert word_error(info.value).endswith("(--ray-address ADDR)")  # the CLI words it as its flag


def test_listening_port_and_other_addresses_pass():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        check_ray_address(f"ray://127.0.0.1:{server.getsockname()[1]}")  # something answers: left to Ray
    for address in (None, "", "auto", "127.0.0.1:6379"):  # not Ray Client: Ray itself resolves these
        check_ray_address(address)


@pytest.mark.parametrize("address", ["ray://", "ray://:10001", "ray://head:notaport"])
def test_malformed_ray_address(address):
    with pytest.raises(EngineError, match="bad Ray address") as info:
        check_ray_address(address)
    assert "\n" not in str(info.value)


def test_connect_ray_checks_before_ray_init():
    ray = pytest.importorskip("ray")
    if ray.is_initialized():  # another test module's Ray is still up: connect_ray would reuse it
        pytest.fail("a Ray from another test is still running")
    t0 = time.perf_counter()
    with pytest.raises(EngineError, match="cannot reach the Ray cluster"):
        connect_ray(RayOptions(address=f"ray://127.0.0.1:{_closed_port()}"))
    assert time.perf_counter() - t0 < 10 and not ray.is_initialized()


def test_cli_unreachable_ray_address(cifar_root, tiny_model, tmp_path, capsys):
    from cliplens.cli import main

    address = f"ray://127.0.0.1:{_closed_port()}"
    t0 = time.perf_counter()
    code = main(["index", "cifar100", "--data-dir", str(cifar_root), "--no-verify", "--index-dir",
                 str(tmp_path / "idx"), "--model", tiny_model, "--device", "cpu", "-q", "--engine", "ray",
                 "--ray-address", address])
    seconds = time.perf_counter() - t0
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.startswith(f"cliplens: error: cannot reach the Ray cluster at {address}")
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert seconds < 10  # Ray Client alone would wait 30 s
    assert not (tmp_path / "idx").exists()  # failed before anything was embedded
