"""Integration tests of the HTTP service: a package, so that its app fixture is package-scoped."""
