"""cachebus: clear every process's in-memory cache at once, and prove each one did."""

from setuptools import find_packages, setup

BENCH = ["redis>=5", "hiredis>=2", "matplotlib>=3.8"]

setup(
    name="cachebus",
    version="0.1.0",
    description="Flextype-compatible cache clear API fanned out over ZeroMQ, with per-worker acks",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["bus", "bus.*", "cachebus", "cachebus.*",
                                    "service", "service.*", "workers", "workers.*"]),
    package_data={"workers": ["demo_content/*/entry.yaml"], "service": ["dashboard/*", "openapi.yaml"]},
    install_requires=[
        "tornado>=6.4,<7",
        "pyzmq>=26",
        "pyyaml>=6",
        # bcrypt verifies the $2y$ hashes PHP's password_hash writes for Flextype tokens.
        "bcrypt>=4.1",
        # honcho runs the Procfile for `make run`.
        "honcho>=2.0",
        # /metrics in the Prometheus text format, on the service and the reference worker.
        "prometheus-client>=0.20",
    ],
    extras_require={
        # make bench: the Redis peer's client (with its fast parser) and the plots.
        "bench": BENCH,
        # The test suite runs a smoke version of the benchmark, so it needs the same.
        "test": [
            "pytest>=8",
            "pytest-tornado==0.8.1",
            # pytest-tornado 0.8.1 still imports pkg_resources, which setuptools 82 removed.
            "setuptools<82",
            # Validates the OpenAPI 3.1 document served at /api/openapi.json.
            "openapi-spec-validator>=0.7",
            *BENCH,
        ],
    },
    entry_points={"console_scripts": ["cachebus=cachebus.cli:main"]},
)
