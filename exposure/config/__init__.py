"""Node configuration: a TOML file over a complete, commented built-in default.

    from exposure.config import load_config
    cfg = load_config("node.toml")

The implementation is :mod:`exposure.config.node`; this package's ``__init__`` is the
public module users import.
"""

from exposure.config.node import (
    DEFAULT_TOML,
    RELEASE_POLICIES,
    STAGES,
    ConfigError,
    NodeConfig,
    Partition,
    ProcessSpec,
    load_config,
    resolve_cpu,
)

__all__ = ["NodeConfig", "Partition", "ProcessSpec", "ConfigError", "load_config",
           "resolve_cpu", "DEFAULT_TOML", "STAGES", "RELEASE_POLICIES"]
