"""The error a caller's inputs get when they would give a wrong answer (a ValueError naming the problem)."""


class InputError(ValueError):
    """Model inputs that would give a wrong answer; the message says what is wrong."""
