"""Run a module from a source snapshot, without the editable install's fallback.

    python -m bench.isolated MODULE [ARGS...]      (cwd = the snapshot)

``pip install -e .`` registers a finder that maps every ``gateway.*`` module to the
working tree; a module missing from the snapshot would then load silently from the
working tree, mixing two revisions in one measurement. This removes that finder before
running MODULE as ``__main__``, so a snapshot imports only itself.
"""

from __future__ import annotations

import runpy
import sys


def _not_editable(obj: object) -> bool:
    owner = getattr(obj, "__module__", "") or ""
    qual = getattr(obj, "__qualname__", "") or ""
    return "__editable__" not in owner and "_Editable" not in qual


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit("usage: python -m bench.isolated MODULE [ARGS...]")
    sys.meta_path[:] = [f for f in sys.meta_path if _not_editable(f)]
    sys.path_hooks[:] = [h for h in sys.path_hooks if _not_editable(h)]
    sys.path[:] = [p for p in sys.path if "__editable__" not in p]
    sys.path_importer_cache.clear()
    module = sys.argv[1]
    sys.argv = sys.argv[1:]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
