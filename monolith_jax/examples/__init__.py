"""Example jobs: users of the public API, the way a user's own job is.
Nothing in the rest of the package imports them."""
