"""Every `cliplens ...` example in the README runs as written, in README order, against the README's own demo index.

The user's machine is played by a temporary HOME holding what the examples name: `~/data` (and
`$CLIPLENS_HOME/data`) with a CIFAR-100-format archive, `~/Pictures` with a few photos, and the Hugging Face
cache with stand-in ViT-B/32 weights where the `openai` tag is looked up. The archive is the fixture's, not the
official one, so the official md5 sums are replaced by the fixture's for this test only: the verification code
itself runs unchanged, as it would on the real files. Commands run in-process (one interpreter, so the suite stays
quick), except `serve`, which runs as a real server that must answer before it is stopped.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import cifar_fixture
from cliplens.cli import main

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def readme_examples(text: str) -> list[str]:
    """Each line of a ```bash block that runs cliplens (``.venv/bin/cliplens`` too), comments removed."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            code = line.split("  #", 1)[0].strip()
            if code.startswith(("cliplens ", ".venv/bin/cliplens ")):
                lines.append(code)
    return lines


EXAMPLES = readme_examples(README)

# What random stand-in weights cannot give, and the one line each example must then say instead (anything else,
# or success, fails the test): their class-name queries are right about 1% of the time, so no score cut reaches
# `calibrate`'s 90% precision and there is no calibrated threshold to search with.
# Nor can they tell a re-encoded copy from a different picture, so `duplicates` finds no threshold to trust.
ON_STAND_INS = {"--min-score calibrated": "no calibrated threshold for ViT-B-32-quickgelu",
                "cliplens duplicates": "threshold"}


def test_the_readme_has_an_example_of_every_subcommand():
    from cliplens.cli import build_parser

    commands = {shlex.split(line)[1] for line in EXAMPLES}
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    assert set(sub.choices) <= commands, f"no README example for {sorted(set(sub.choices) - commands)}"


@pytest.fixture(scope="module")
def user_home(tmp_path_factory, b32_weights):
    home = tmp_path_factory.mktemp("home")
    archive_dir = home / "data"
    cifar_fixture.make_cifar100(archive_dir, per_class_test=2, per_class_train=3, seed=3, archive=True, folder=False)
    cliplens_data = home / ".cache" / "cliplens" / "data"
    cliplens_data.mkdir(parents=True)
    (cliplens_data / "cifar-100-python.tar.gz").write_bytes((archive_dir / "cifar-100-python.tar.gz").read_bytes())
    rng = np.random.default_rng(0)
    pictures = home / "Pictures"
    for rel in ("2023/beach.jpg", "2023/dog.png", "cat.jpg", "raw/skip.png"):
        (pictures / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(pictures / rel)
    shop = home / "shop"  # a product catalogue: an image list with captions (cliplens index list)
    (shop / "img").mkdir(parents=True)
    rows = ["path,caption"]
    for i, caption in enumerate(("a red mug", "a blue sofa", "a green lamp", "a wooden chair")):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(shop / "img" / f"p{i}.jpg")
        rows.append(f"img/p{i}.jpg,{caption}")
    (shop / "catalogue.csv").write_text("\n".join(rows) + "\n")
    (home / "work").mkdir()
    return home


def fixture_md5s(archive: Path) -> dict[str, str]:
    import tarfile

    sums = {archive.name: hashlib.md5(archive.read_bytes()).hexdigest()}
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            if member.isfile():
                sums[Path(member.name).name] = hashlib.md5(tar.extractfile(member).read()).hexdigest()
    return sums


def _expand(line: str, home: Path) -> list[str]:
    """The shell's part: ~ at the start of a word, then word splitting and quotes."""
    words = shlex.split(line)
    return [str(home) + w[1:] if w == "~" or w.startswith("~/") else w for w in words]


def _serve(argv: list[str], env: dict, cwd: Path) -> None:
    port = argv[argv.index("--port") + 1] if "--port" in argv else "8000"
    proc = subprocess.Popen([str(Path(sys.executable).parent / "cliplens"), *argv[1:]], env=env, cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"serve exited {proc.returncode}: {proc.stderr.read()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
                    assert response.status == 200
                    return
            except OSError:
                time.sleep(0.5)
        raise AssertionError("serve did not answer /healthz within 240 s")
    finally:
        proc.terminate()
        proc.communicate(timeout=60)


@pytest.mark.slow
def test_every_readme_example_runs_as_written(user_home, monkeypatch, capsys):
    import cliplens.sources.cifar as cifar

    assert EXAMPLES, "the README shows no cliplens command"
    sums = fixture_md5s(user_home / "data" / "cifar-100-python.tar.gz")
    monkeypatch.setitem(cifar.OFFICIAL_MD5, "cifar100", {**cifar.OFFICIAL_MD5["cifar100"], **sums})
    monkeypatch.setenv("HOME", str(user_home))
    monkeypatch.delenv("CLIPLENS_HOME")  # the examples' defaults: ~/.cache/cliplens
    monkeypatch.delenv("CLIPLENS_INDEX_DIR", raising=False)
    monkeypatch.chdir(user_home / "work")
    env = {**os.environ}
    failures = []
    for line in EXAMPLES:
        argv = _expand(line, user_home)
        if argv[1] == "serve":
            _serve(argv, env, user_home / "work")
            print(f"README example answered /healthz: {line}", file=sys.__stderr__)
            continue
        code = main(argv[1:])
        out, err = capsys.readouterr()
        print(f"README example exit {code}: {line}", file=sys.__stderr__)  # the run's own record, shown with -s
        expected = next((said for needle, said in ON_STAND_INS.items() if needle in line), None)
        if expected is not None:
            if code != 2 or expected not in err or len(err.strip().splitlines()) != 1:
                failures.append(f"{line}\n  expected exit 2 with {expected!r}, got exit {code}: {err.strip()[-400:]}")
        elif code != 0 or "Traceback" in err:
            failures.append(f"{line}\n  exit {code}: {err.strip()[-400:]}")
    assert not failures, "README examples that fail:\n" + "\n".join(failures)
