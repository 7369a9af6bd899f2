"""merv inside other tools.

- :mod:`merv.integrations.lmms_eval`: a model for lmms-eval (``--model merv``), registered through lmms-eval's
  ``lmms_eval.models`` entry-point group by :func:`lmms_eval_manifest`;
- ``lmms_tasks/``: lmms-eval tasks over MERV ``eval_data`` benchmarks (``--include_path``);
- :mod:`merv.integrations.install_lmms_eval`: installs that release next to merv's test dependencies.

Nothing here is imported by merv itself: lmms-eval is an optional dependency (``pip install 'merv[lmms-eval]'``).
"""

from __future__ import annotations

from pathlib import Path

LMMS_MODEL_NAME = "merv"
LMMS_EVAL_REQUIREMENT = "lmms-eval==0.6.1"  # the release the tests run (pyproject's extra `lmms-eval` says the same)
LMMS_TASKS_DIR = Path(__file__).with_name("lmms_tasks")


def lmms_eval_manifest():
    """The entry point lmms-eval (0.7) loads from the ``lmms_eval.models`` group: which class ``--model merv`` is.

    Kept import-light (only lmms-eval's manifest type), since lmms-eval loads every plugin's entry point at start."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=LMMS_MODEL_NAME, simple_class_path="merv.integrations.lmms_eval.MervLmms")
