"""fitcustom's version (one place: setup.cfg reads it from here).

May import: nothing.
"""

__version__ = "0.1.0"
