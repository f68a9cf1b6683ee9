"""The one error loading raises for anything wrong with a model file or directory."""


class ModelLoadError(ValueError):
    """A model file or directory cannot be loaded.

    The message names the file and says what is wrong with it in words a user can act on; loading
    never lets a struct, index or torch error from a malformed file escape in its place.
    """
