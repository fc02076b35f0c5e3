"""The single entry point for development tasks: ``nox -s <session>``."""

from __future__ import annotations

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["tests", "lint", "typecheck", "docs"]

# The CPU build lies on local disk; an unpinned torch would pull a CUDA build.
TORCH = "torch==2.13.0"


def _install(session: nox.Session, extras: str = "dev") -> None:
    session.install(TORCH)
    session.install("-e", f".[{extras}]")


@nox.session
def tests(session: nox.Session) -> None:
    """Run the CPU test suite (GPU-marked tests are deselected)."""
    _install(session)
    session.run("pytest", *session.posargs)


@nox.session
def gpu(session: nox.Session) -> None:
    """Run only the GPU-marked tests (needs CUDA)."""
    _install(session)
    session.run("pytest", "-m", "gpu", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff over the package, tests, examples and benchmarks."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", "src", "tests", "examples", "benchmarks", "noxfile.py")
    session.run("ruff", "format", "--check", "src", "tests", "examples", "benchmarks", "noxfile.py")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict on the package."""
    _install(session)
    session.run("mypy")


@nox.session
def docs(session: nox.Session) -> None:
    """Build the Sphinx site with warnings as errors, then run its doctests."""
    _install(session)
    session.run(
        "sphinx-build", "-W", "--keep-going", "-n", "-b", "html", "docs", "docs/_build/html"
    )
    session.run(
        "sphinx-build", "-W", "--keep-going", "-n", "-b", "doctest", "docs", "docs/_build/doctest"
    )


@nox.session
def quickstart(session: nox.Session) -> None:
    """The main job: the CPU quickstart on the shared arXiv sample."""
    _install(session, "mistral,plots")
    session.run("python", "examples/quickstart.py", *session.posargs)
