"""openzaya: an open implementation of the ZAYA1-8B system (see README.md)."""


def package_version() -> str:
    """The installed distribution's version (`openzaya --version`, the server's GET /version)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("openzaya")
    except PackageNotFoundError:   # run from a source tree that was never installed
        return "0+unknown"
