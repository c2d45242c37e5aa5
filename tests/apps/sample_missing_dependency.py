"""An app module whose own import fails: a dependency is missing (bad input).

The error must blame the dependency, not claim the app module itself is missing.
"""

import sample_no_such_dependency  # noqa: F401

app = None
