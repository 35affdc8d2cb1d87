"""Run a script in a process where `import pipeline` fails, as on a machine where this package is not
installed: `python tests/without_pipeline.py SCRIPT [ARGS...]` (used by the export tests and bench)."""

import runpy
import sys


class _Block:
    def find_spec(self, name, path=None, target=None):
        if name == "pipeline" or name.startswith("pipeline."):
            raise ImportError("pipeline is not installed here")


sys.meta_path.insert(0, _Block())
sys.path = [p for p in sys.path if p not in ("", ".")]
try:
    import pipeline  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("pipeline is importable: the check would prove nothing")
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
