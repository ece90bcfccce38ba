"""pokestudy: hyperparameter studies of image classifiers, run by Ray Tune and kept in Optuna."""

__version__ = "0.1.0"


class UserError(Exception):
    """A mistake the user can fix (bad flag, bad spec, missing data): shown as one line, exit code 2."""
