from layerscope.cli.app import main

main()
