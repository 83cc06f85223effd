"""Root conftest: load the labs plugin when running from a checkout.

When labs is installed the pytest11 entry point registers the same module
under the same name, so it is loaded exactly once either way.
"""

pytest_plugins = ["labs.plugin"]
