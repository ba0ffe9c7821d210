"""cachebus: clear every process's in-memory cache at once, and prove each one did.

The source folders ``service/``, ``workers/``, ``bus/`` and ``relay/`` sit beside
``cachebus/`` at the top of the repository, but they install *under* it, as
``cachebus.service``, ``cachebus.workers``, ``cachebus.bus`` and ``cachebus.relay``: a wheel (and an
editable install) exposes one top-level name, so an application with its own
``workers`` or ``service`` package can embed the subscriber without a clash.
"""

from setuptools import find_packages, setup

#: Source folder of each subpackage of the one import root.
SUBPACKAGES = {"service": "service", "workers": "workers", "bus": "bus", "relay": "relay"}


def packages() -> tuple[list[str], dict[str, str]]:
    names = ["cachebus", *(f"cachebus.{p}" for p in find_packages(include=["cachebus.*"]))]
    package_dir = {"cachebus": "cachebus"}
    for name, folder in SUBPACKAGES.items():
        package_dir[f"cachebus.{name}"] = folder
        names.append(f"cachebus.{name}")
        names += [f"cachebus.{name}.{sub}" for sub in find_packages(where=folder)]
    return names, package_dir


PACKAGES, PACKAGE_DIR = packages()

# The service and the reference worker; the subscriber and the cache need none of it.
SERVICE = [
    "tornado>=6.4,<7",
    # bcrypt verifies the $2y$ hashes PHP's password_hash writes for Flextype tokens.
    "bcrypt>=4.1",
    # /metrics in the Prometheus text format, on the service and the reference worker.
    "prometheus-client>=0.20",
]
# `make run`: honcho runs the Procfile.
RUN = [*SERVICE, "honcho>=2.0"]
BENCH = [*SERVICE, "redis>=5", "hiredis>=2", "matplotlib>=3.8"]
# Pinned so that a new release's new rules cannot turn `make test` red on its own.
# import-linter checks the layers (pyproject.toml's [tool.importlinter]).
CHECKS = ["ruff==0.17.6", "mypy==2.4.1", "types-PyYAML==6.0.12.20261122", "sortedcontainers-stubs==2.4.3",
          "import-linter==2.16"]

setup(
    name="cachebus",
    version="0.1.0",
    description="Flextype-compatible cache clear API fanned out over ZeroMQ, with per-worker acks",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    package_data={
        "cachebus.workers": ["demo_content/**/*.yaml"],
        "cachebus.service": ["dashboard/*", "openapi.yaml"],
    },
    zip_safe=False,
    # The base install is what an embedding application needs: the subscriber and the cache.
    install_requires=[
        "pyzmq>=26",
        "pyyaml>=6",
        # The Cache's prefix index (workers/cache.py): a sorted list whose insert and delete are
        # O(log n). bisect.insort on a plain list moves half of it for every new key: 2 µs at
        # 100,000 keys but 165 µs at 1,000,000, where SortedList.add measured 0.9 and 5 µs.
        # Pure Python, no dependencies of its own.
        "sortedcontainers>=2.4,<3",
    ],
    extras_require={
        "service": SERVICE,
        "run": RUN,
        # make bench: the Redis peer's client (with its fast parser) and the plots.
        "bench": BENCH,
        # The test suite runs the service, `make run`'s honcho, a smoke version of the benchmark, and the checks.
        "test": [
            *RUN,
            *BENCH,
            *CHECKS,
            "pytest>=8",
            "pytest-tornado==0.8.1",
            # A per-test timeout (pytest.ini): a test that hangs fails alone instead of stalling the run.
            "pytest-timeout>=2.3",
            # pytest-tornado 0.8.1 still imports pkg_resources, which setuptools 82 removed.
            "setuptools<82",
            # Property tests: the bus decoder meets arbitrary frames (tests/test_protocol.py).
            "hypothesis>=6.100",
            # Real third-party caches as purge targets and behind the lease wrapper.
            "cachetools>=5",
            # A real Django cache backend as a purge target (its clear() takes no arguments).
            "django>=4.2",
            # Validates the OpenAPI 3.1 document served at /api/openapi.json.
            "openapi-spec-validator>=0.7",
            # Fuzzes the served API against that document (tests/test_fuzz_api.py). Pinned: a new
            # release brings new checks and generators, which must not turn `make test` red on their own.
            "schemathesis==4.32.5",
            # Builds the wheel in the packaging test.
            "wheel",
            # Real pre-fork and multi-process servers embedding the subscriber (tests/test_deployments.py):
            # gunicorn for its post_fork hook (25.1 for --no-control-socket: tests run several gunicorns at
            # once, which must not share the one control socket in $HOME), uvicorn for --workers with a
            # supervisor that replaces dead workers (0.30).
            "gunicorn>=25.1",
            "uvicorn>=0.30",
        ],
    },
    entry_points={"console_scripts": ["cachebus=cachebus.cli:main"]},
)
