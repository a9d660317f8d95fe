"""Pure-torch references of every ncfast op: the ``"torch"`` backend, and what the tests
compare against in float64."""
