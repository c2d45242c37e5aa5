"""Module attributes that are not apps (bad input)."""

app = {"routes": ["/"]}  # a dict: not callable
settings = "not an app either"
