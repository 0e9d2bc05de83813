"""The error of a bad recipe value, command-line key or input file: scripts print its message, which names the key
or file, the value and the fix, as one line (`simmim.cli.run_cli`)."""


class ConfigError(ValueError):
    """A recipe or command-line problem, with the fix in its message."""
