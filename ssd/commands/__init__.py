"""The command-line handlers: ``ssd <command>`` runs ``ssd.commands.<module>.run(args)``, one module per
command, imported only when its command runs (the parser is :mod:`ssd.cli`)."""
