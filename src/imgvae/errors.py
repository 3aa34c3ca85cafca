"""The base of every error a user can act on (a bad key, a missing file, a wrong checkpoint, a run
that cannot go on): the command line says it in one line and exits with 2. Each kind is defined
where it arises (config.ConfigError, data.sources.SourceError, rundir.CheckpointError, ...)."""


class ImgvaeError(Exception):
    """An error with a message meant for the user, in one line."""


class ImgvaeWarning(UserWarning):
    """Something a user should know that does not stop the run (a skipped file, images without a
    label, a prior left out of an export): the command line says it in one line."""
