"""The error every artifact problem raises: one line naming the file and the problem."""


class ArtifactError(ValueError):
    """An artifact that cannot be used; the message names the file and the problem."""
