"""User-facing errors: printed as one clear message by the entry point, never as a traceback."""


class UserError(Exception):
    """Bad input from the user (recipe, data, checkpoint, flags). Exit code 2."""

    exit_code = 2


class RecipeError(UserError):
    """The recipe (or a --cfg-options override) is malformed or names something unknown."""


class DataError(UserError):
    """The dataset cannot be found, read or does not match the recipe."""


class CheckpointError(UserError):
    """A checkpoint cannot be fetched, read or mapped onto the model."""


class TrainingError(UserError):
    """Training cannot continue (non-finite loss, unwritable output, incompatible resume)."""

    exit_code = 1
