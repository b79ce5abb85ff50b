"""
C{python -m sslshare}: the C{sslshare} command.
"""

from sslshare.cli import main

main()
