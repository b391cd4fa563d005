"""luigi-creds' start-up hook for the processes `luigi-creds exec` runs: what Luigi would do in
every task process it forks, done once in the job's scheduling process.

`luigi-creds exec` puts this directory first on the command's PYTHONPATH, so Python's `site`
imports this module at start-up in every Python process of the job. It does two things:

- it runs the `sitecustomize` this one shadows, if any (the next one on `sys.path`), as
  `ddtrace-run` and `opentelemetry-instrument` do;
- it watches for the imports of `luigi` and `boto3`. Once `luigi` has been imported (in full),
  in a process under a job agent (`LUIGI_CREDS_AGENT_URL` set) and not turned off
  (`LUIGI_CREDS_PRELOAD=0`), it calls `luigi_creds.preload.prepare()`, and again once boto3 is
  imported: the scheduling process then holds the modules each task process would import (and
  a default boto3 session for its own S3 checks) before Luigi forks; see luigi_creds/preload.py.

A process that never imports `luigi` pays one set lookup per import; a process without
luigi_creds (another interpreter) or with the hook turned off loads nothing. The hook removes
itself once it is done. Kept to the standard library: it loads nothing else at start-up.
"""

import os
import sys
from typing import Any

_HERE = os.path.dirname(os.path.realpath(__file__))
_WATCHED = frozenset({"luigi", "boto3"})


def _enabled() -> bool:
    return os.environ.get("LUIGI_CREDS_PRELOAD", "1") != "0" and bool(
        os.environ.get("LUIGI_CREDS_AGENT_URL")
    )


def _preload() -> None:
    """Once `luigi` is loaded, `luigi_creds.preload.prepare()`; stop watching when it is done
    (luigi and boto3 both handled), turned off, or luigi_creds is not importable here."""
    if "luigi" not in sys.modules and _enabled():
        return
    done = True
    if _enabled():
        try:
            from luigi_creds.preload import prepare

            done = prepare()
        except ImportError:
            # This interpreter has no luigi_creds (or not this version): Luigi's own import in
            # each task process reports it where it matters.
            pass
        except Exception as exc:  # never break the job's `import luigi` over an optimisation
            sys.stderr.write(f"luigi-creds: preloading for the job failed: {exc!r}\n")
    if done and _WATCH in sys.meta_path:
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


_WATCH = _Watch()
sys.meta_path.insert(0, _WATCH)


def _chain() -> None:
    """Run the sitecustomize this one shadows (the next on sys.path), as Python would have."""
    from importlib.machinery import PathFinder
    from importlib.util import module_from_spec

    # Real paths: this directory reached through a link must not find this module again.
    rest = [p for p in sys.path if os.path.realpath(p or os.curdir) != _HERE]
    spec = PathFinder.find_spec("sitecustomize", rest)
    if spec is None or spec.loader is None or not spec.origin:
        return
    if os.path.dirname(os.path.realpath(spec.origin)) == _HERE:
        return
    module = module_from_spec(spec)
    sys.modules["sitecustomize"] = module
    spec.loader.exec_module(module)


_chain()
