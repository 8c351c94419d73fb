"""The README's Quick start, read as commands: ``python3 tests/readme/quickstart.py setup|main|test``.

`.ci/run` runs the set-up and test lines it prints, and ``test_quickstart.py`` checks that this is so, so the
README's two commands and what CI runs can never drift apart. Standard library only: it runs before any install.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"
STEPS = {"setup": "# 1. set up", "main": "# 2. the main job", "test": "# 3. the tests"}


def quickstart_block(text: str) -> str:
    """The first ```bash block under the '## Quick start' heading."""
    section = text.split("\n## Quick start", 1)
    if len(section) < 2:
        raise ValueError("README.md has no '## Quick start' section")
    match = re.search(r"```bash\n(.*?)```", section[1], flags=re.S)
    if not match:
        raise ValueError("README.md's Quick start has no ```bash block")
    return match.group(1)


def commands(text: str) -> dict[str, str]:
    """{"setup": ..., "main": ..., "test": ...}: the command line that follows each numbered comment."""
    lines = quickstart_block(text).splitlines()
    found = {}
    for step, marker in STEPS.items():
        for i, line in enumerate(lines):
            if line.startswith(marker):
                following = [s for s in lines[i + 1:] if s.strip()]
                if not following or following[0].startswith("#"):
                    raise ValueError(f"README.md's Quick start has no command after {marker!r}")
                found[step] = following[0].strip()
                break
        else:
            raise ValueError(f"README.md's Quick start has no {marker!r} comment")
    return found


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in STEPS:
        print(f"usage: quickstart.py {'|'.join(STEPS)}", file=sys.stderr)
        return 2
    try:
        print(commands(README.read_text(encoding="utf-8"))[argv[0]])
    except ValueError as exc:
        print(f"quickstart.py: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
