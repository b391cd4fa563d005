"""luigi-creds' start-up hook for the processes `luigi-creds exec` runs: Luigi's per-task import,
paid once per job.

`luigi-creds exec` puts this directory first on the command's PYTHONPATH, so Python's `site`
imports this module at start-up in every Python process of the job. It does two things:

- it runs the `sitecustomize` this one shadows, if any (the next one on `sys.path`), as
  `ddtrace-run` and `opentelemetry-instrument` do;
- it watches for the import of `luigi`. Once `luigi` has been imported (in full), and only in a
  process under a job agent (`LUIGI_CREDS_AGENT_URL` set) and not turned off
  (`LUIGI_CREDS_PRELOAD=0`), it imports `luigi_creds.task_process`, the module Luigi imports in
  every task process it forks for `[worker] task_process_context = luigi_creds.TaskCredentials`
  (and `luigi_creds.aws`, the boto3 bridge, once boto3 is imported too). The scheduling process
  then holds them before Luigi forks, and every task process inherits them instead of importing
  them afresh.

Only code is loaded here: importing these modules mints nothing, reads no setting and holds no
per-task state; each task process still gets its own bearer and credentials on entry.

A process that never imports `luigi` pays one string comparison per import; a process without
luigi_creds (another interpreter) or with the hook turned off loads nothing. The hook removes
itself once it has run. Kept to the standard library, and loads nothing at start-up beyond it.
"""

import os
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    # Quoted where used: this module may run in an older interpreter of the job's.
    _Preloads = tuple[tuple[tuple[str, ...], str], ...]

_HERE = os.path.dirname(os.path.abspath(__file__))
# When each watched module has been imported, the modules imported after it, once every
# module in its key is loaded.
_PRELOADS: "_Preloads" = (
    (("luigi",), "luigi_creds.task_process"),
    (("luigi", "boto3"), "luigi_creds.aws"),
)
_WATCHED = frozenset(name for needs, _ in _PRELOADS for name in needs)


def _enabled() -> bool:
    return os.environ.get("LUIGI_CREDS_PRELOAD", "1") != "0" and bool(
        os.environ.get("LUIGI_CREDS_AGENT_URL")
    )


def _preload() -> None:
    """Import every preload whose modules are all loaded; stop watching when all are done."""
    global _pending
    if not _enabled():
        _pending = ()
    for needs, target in _pending:
        if target in sys.modules or not all(n in sys.modules for n in needs):
            continue
        try:
            __import__(target)
        except ImportError:
            # This interpreter has no luigi_creds (or not this version): Luigi's own import in
            # each task process reports it where it matters.
            _pending = ()
            break
        except Exception as exc:  # never break the job over an optimisation
            sys.stderr.write(f"luigi-creds: preloading {target} failed: {exc!r}\n")
    _pending = tuple((n, t) for n, t in _pending if t not in sys.modules)
    if not _pending and _WATCH in sys.meta_path:
        sys.meta_path.remove(_WATCH)


class _ThenPreload:
    """The watched module's own loader, then the preloads."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        # The module keeps its own loader (importlib.resources, reloads, introspection).
        module.__loader__ = self._loader
        if getattr(module, "__spec__", None) is not None:
            module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        _preload()


class _Watch:
    """A meta path finder that finds nothing itself: it wraps the loader of a watched module."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name not in _WATCHED:
            return None
        for finder in sys.meta_path:
            if finder is self:
                continue
            find = getattr(finder, "find_spec", None)
            spec = find(name, path, target) if find is not None else None
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _ThenPreload(spec.loader)
                return spec
        return None


_pending: "_Preloads" = _PRELOADS
_WATCH = _Watch()
sys.meta_path.insert(0, _WATCH)


def _chain() -> None:
    """Run the sitecustomize this one shadows (the next on sys.path), as Python would have."""
    from importlib.machinery import PathFinder
    from importlib.util import module_from_spec

    rest = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
    spec = PathFinder.find_spec("sitecustomize", rest)
    if spec is None or spec.loader is None:
        return
    module = module_from_spec(spec)
    sys.modules["sitecustomize"] = module
    spec.loader.exec_module(module)


_chain()
