"""pokestudy: hyperparameter studies of image classifiers, run by Ray Tune and kept in Optuna.

`pokestudy.load_study`, `pokestudy.run`, `pokestudy.results`, `pokestudy.export_study` and
`pokestudy.import_study` are the Python API (`pokestudy.api`).
"""

__version__ = "0.1.0"


class UserError(Exception):
    """A mistake the user can fix (bad flag, bad spec, missing data): shown as one line, exit code 2."""


API = ("load_study", "run", "results", "Results", "export_study", "import_study")


def __getattr__(name: str):
    """The Python API, imported on first use: `import pokestudy` stays as light as the command line needs."""
    if name in API:
        from pokestudy import api

        return getattr(api, name)
    raise AttributeError(f"module 'pokestudy' has no attribute {name!r}")
