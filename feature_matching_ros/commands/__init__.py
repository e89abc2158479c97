"""Subcommands of ``fmr``: one module each, registered in :mod:`feature_matching_ros.cli`."""
