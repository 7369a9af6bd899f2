"""Max abs difference of each merv encoder against its reference implementation, from one run (docs/encoders.md).

    python benchmarks/encoder_parity.py        # needs the LanguageBind venv: make reference-venvs

The same comparisons as tests/models/test_reference_parity.py (small random models saved in the real checkpoints'
layouts, float32), printed as JSON.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.reference import parity  # noqa: E402
from tests.reference.venvs import reference_python  # noqa: E402


def main() -> None:
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        lb = parity.languagebind(reference_python("languagebind"), tmp / "languagebind_work")
        result.update({f"languagebind ({frames} frames)": diff for frames, diff in lb.items()})
        for name in ("vivit", "dinov2", "siglip", "hiera"):
            (tmp / name).mkdir()
            result[name] = getattr(parity, name)(tmp / name)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
