"""The one exception type for mistakes a user can fix."""


class LlamaError(ValueError):
    """A user-fixable problem: a bad path, argument, file or value.

    The message always names the offending file/argument/value and says what to do.
    It subclasses ValueError so code written against Meta's reference (which raised
    AssertionError/ValueError) can still catch it broadly.
    """
