"""The `kit` command line: thin typed commands, one module per noun (kit.cli.main is the entry point)."""
