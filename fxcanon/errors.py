"""Exception types raised by fxcanon."""


class CanonizationError(ValueError):
    """A model cannot be canonized as given; the message names the node and the reason."""
