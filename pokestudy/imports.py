"""User code a spec names as `package.module:function` (an arch, a data source): found and imported here.

A spec that names such a path runs that code, as any Python configuration does: import it only from specs
you trust. `pokestudy run` says which modules a spec imports (`notice`) before the study starts.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from pokestudy import UserError

if TYPE_CHECKING:
    from pokestudy.study.spec import Study

PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")
OWN = {"pokestudy", "torch", "torchvision"}  # what pokestudy imports anyway: not user code


def is_path(text: str) -> bool:
    """Whether `text` has the form `package.module:function` (names only: no path separators, no options)."""
    return PATH.fullmatch(text) is not None


def is_user_code(text: str) -> bool:
    """Whether `text` names a callable outside pokestudy, torch and torchvision (whose versions the provenance
    records): the user's code."""
    return is_path(text) and text.partition(":")[0].split(".")[0] not in OWN


def resolve(path: str, what: str) -> Callable:
    """The callable at `package.module:function`, importable from the current directory or the installed
    packages (Ray adds the driver's current directory to its workers' path too); `what` names the use
    (`arch`, `data`) in the one-line error."""
    module_name, _, name = path.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())  # after the installed packages: a local file never shadows one of them
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 — any failure of the user's module is a one-line error
        raise UserError(f"{what} {path}: cannot import {module_name} ({failure(e)}); "
                        "it must be importable from the current directory or an installed package") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise UserError(f"{what} {path}: module {module_name} has no function {name}")
    return fn


def code_digest(path: str) -> str:
    """A hash of the bytes of the file that defines the callable at `path` (after `functools.wraps`; the
    named module's file for a callable object), which a study's identity holds for each builder it names.

    The whole file, not `inspect.getsource` of the function: the blocks, classes and constants a builder
    uses usually live beside it and change the model as much as its own lines do. The price is that any
    edit of that file, a comment or another builder, makes a stored study a different experiment: a
    refusal that `--study-name`/`--restart` answers, where a missed edit would silently mix two models in
    one study. Code the file imports from other modules of the user's is not covered."""
    fn = inspect.unwrap(resolve(path, "arch"))
    try:
        file = inspect.getfile(fn)
    except TypeError:  # an object with __call__, a functools.partial: its module's file
        file = inspect.getfile(sys.modules[path.partition(":")[0]])
    return hashlib.sha256(Path(file).read_bytes()).hexdigest()[:12]


def failure(e: Exception) -> str:
    """What the user's code raised, in one line: its type and the first line of its message."""
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def modules(study: Study, data: str | None = None) -> list[str]:
    """The modules outside pokestudy, torch and torchvision that `study` imports (its archs and its data
    source, or `data` where it overrides the spec's), in the order they appear."""
    archs = [str(study.settings(c).get("arch", "")) for c in study.conditions()]
    return list(dict.fromkeys(p.partition(":")[0] for p in [*archs, data or study.data.source] if is_user_code(p)))


def notice(study: Study, data: str | None = None) -> str | None:
    """The line `pokestudy run` prints before a study that imports user code; None when it imports none."""
    found = modules(study, data)
    if not found:
        return None
    return (f"study {study.name} runs code from {', '.join(found)} "
            "(a spec runs the code it names: run only specs you trust)")
