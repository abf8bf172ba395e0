from cellpuzzle_cli.cli import main

main()
