"""PacsLens, the site as a whole (settings, URLs, staff UI, operations, site configuration).

`__version__` is the one place the version is defined: `manage.py about`, the UI footer,
/healthz and the SR's Software Versions (0018,1020) read it. CHANGELOG.md says what each version
brings and how to upgrade to it.
"""

__version__ = "0.2.0"
