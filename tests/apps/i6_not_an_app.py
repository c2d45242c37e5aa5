"""Module attributes that are not apps (issue 6, bad input)."""

app = {"routes": ["/"]}  # a dict: not callable
settings = "not an app either"
