"""The `layerscope` command line: the app (`cli.app`), shared parsers and one module per verb (`cli.commands`)."""
