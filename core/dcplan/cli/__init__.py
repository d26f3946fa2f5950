"""The ``dcplan`` command line: one module per subcommand, :mod:`dcplan.cli.main` dispatches."""
