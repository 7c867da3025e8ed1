"""hamgr: high availability for unmodified network functions."""

from setuptools import find_packages, setup

setup(
    name="hamgr",
    version="0.1.0",
    description="Epoch checkpoints and output commit for unmodified network functions",
    python_requires=">=3.11",
    packages=find_packages(include=["hamgr*", "shim*", "dpdk_vhost*", "policies*"]),
    package_data={"dpdk_vhost": ["src/*.c", "src/*.h", "Makefile"]},
    install_requires=[
        "attrs>=23.1",
        "click>=8.1",
        "pyzmq>=25",
        "protobuf>=4.21",
        "prometheus-client>=0.20",
        "paramiko>=5,<6",
    ],
    extras_require={
        "dev": [
            "pytest>=8",
            "pytest-timeout>=2.2",
            "ruff>=0.6",
            "mypy>=1.10",
            "tox>=4",
        ],
    },
    entry_points={"console_scripts": ["hamgr=hamgr.cli:main"]},
)
