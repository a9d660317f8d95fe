"""Runs pytest's C++-path tests against the sanitized build in PACKAGE_ROOT (tools/sanitize.sh).

Usage: python tools/sanitized_pytest.py PACKAGE_ROOT [pytest args]"""

import sys


def use_package(package_root: str) -> None:
    # An editable install's import hook would shadow the sanitized build: drop it.
    sys.meta_path = [f for f in sys.meta_path if "editable" not in type(f).__module__]
    sys.path.insert(0, package_root)


if __name__ == "__main__":
    package_root, extra = sys.argv[1], sys.argv[2:]
    use_package(package_root)
    import ncfast
    import pytest

    assert ncfast._C.__file__.startswith(package_root), ncfast._C.__file__
    # --capture=sys: a sanitizer writes its report to file descriptor 2 and exits; captured
    # at the descriptor (pytest's default), the report would be lost with the process.
    sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", "--capture=sys", "-k", "cpp and not compile", *extra]))
