"""Install the lmms-eval release merv's plugin is tested with, keeping this environment's PyAV and everything else
already installed: ``python -m merv.integrations.install_lmms_eval`` (``make`` runs it before the tests).

Why not ``pip install 'merv[lmms-eval]'`` there: lmms-eval requires ``av<16``. merv decodes the same frames with
PyAV 15 and 18 (so the extra is fine for using the plugin), but merv's test helpers write rotated videos with
PyAV 16's API. So the release is installed without its dependencies, then its own requirements except PyAV, with
every installed distribution pinned as a constraint: pip backtracks to versions that fit (e.g. a latex2sympy2 that
accepts the ANTLR runtime DVC's Hydra needs) instead of replacing what other tools depend on.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from importlib import metadata

from merv.integrations import LMMS_EVAL_REQUIREMENT

KEEP = frozenset({"av"})  # requirements of lmms-eval left to this environment


def _name(dist_or_req: str) -> str:
    return dist_or_req.lower().replace("_", "-").replace(".", "-")


def requirements(dist: str = "lmms-eval") -> list[str]:
    """The installed ``dist``'s unconditional requirements (no extras), except those in KEEP."""
    from packaging.requirements import Requirement

    out = set()
    for line in metadata.requires(dist) or []:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        if _name(req.name) not in KEEP:
            out.add(str(req))
    return sorted(out)


def installed_pins() -> list[str]:
    """``name==version`` of every installed distribution (merv itself aside)."""
    pins = {_name(d.metadata["Name"]): d.version for d in metadata.distributions() if d.metadata["Name"]}
    return sorted(f"{name}=={version}" for name, version in pins.items() if name != "merv")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="print the pip commands instead of running them")
    args = parser.parse_args(argv)
    pip = [sys.executable, "-m", "pip", "install", "-q"]

    def run(cmd: list[str]) -> None:
        print(" ".join(cmd), flush=True)
        if not args.dry_run:
            subprocess.run(cmd, check=True)

    with tempfile.NamedTemporaryFile("w", suffix=".txt") as constraints:
        constraints.write("\n".join(installed_pins()) + "\n")
        constraints.flush()
        run([*pip, "--no-deps", LMMS_EVAL_REQUIREMENT])
        try:
            needed = requirements()
        except metadata.PackageNotFoundError:  # a dry run before the release is installed
            needed = ["<lmms-eval's requirements>"]
        run([*pip, "-c", constraints.name, *needed])
    return 0


if __name__ == "__main__":
    sys.exit(main())
